"""Count-min sketch and W-TinyLFU admission logic (pure Python, no I/O)."""

from __future__ import annotations

from caches.admission import (
    COUNTER_MAX,
    CountMinSketch,
    WTinyLFU,
    WTinyLFUConfig,
    aging_sample,
    sketch_indexes,
    sketch_width,
)


def test_sketch_counts_saturate_and_age() -> None:
    sketch = CountMinSketch(width=1024, sample=10_000)
    for _ in range(3):
        sketch.increment(["hot"])
    assert sketch.estimate("hot") == 3
    assert sketch.estimate("never-seen") == 0
    for _ in range(40):
        sketch.increment(["hot"])
    assert sketch.estimate("hot") == COUNTER_MAX  # 4-bit counters saturate
    sketch.age()
    assert sketch.estimate("hot") == COUNTER_MAX // 2
    assert sketch.adds == 43 // 2


def test_sketch_ages_itself_after_sample_reads() -> None:
    sketch = CountMinSketch(width=256, sample=100)
    aged = [sketch.increment([f"k{i % 10}"]) for i in range(100)]
    assert aged.count(True) == 1 and aged[-1]
    assert sketch.agings == 1
    assert sketch.estimate("k1") == 5  # 10 reads halved


def test_sketch_never_underestimates() -> None:
    sketch = CountMinSketch(width=256, sample=10**9)
    truth = {f"key{i}": (i % 7) + 1 for i in range(300)}
    for k, n in truth.items():
        for _ in range(n):
            sketch.increment([k])
    assert all(sketch.estimate(k) >= min(n, COUNTER_MAX) for k, n in truth.items())


def test_sketch_indexes_are_stable_and_in_their_rows() -> None:
    idx = sketch_indexes("features:user_features:v1:42", width=512)
    assert idx == sketch_indexes("features:user_features:v1:42", width=512)
    assert [i // 512 for i in idx] == [0, 1, 2, 3]


def test_sizing_helpers() -> None:
    assert sketch_width(512 * 1000, 512) == 4096
    assert sketch_width(1) >= 256
    assert aging_sample(512 * 1000, 512) == 10_000


def _policy(budget: int = 1000, window: float = 0.2) -> WTinyLFU:
    return WTinyLFU(WTinyLFUConfig(budget, window_fraction=window, entry_bytes=100, adaptive=False))


def test_new_entries_enter_the_window() -> None:
    p = _policy()
    placement = p.admit({"a": 100})
    assert placement.admitted == ["a"] and not placement.demoted
    assert "a" in p.window


def test_frequent_candidate_displaces_rare_victim() -> None:
    p = _policy(budget=500, window=0.2)  # window 100 B (1 entry), main 400 B (4 entries)
    for k in ["m1", "m2", "m3", "m4", "w"]:
        p.record([k], set())
        p.admit({k: 100})
    assert set(p.probation) | set(p.protected) == {"m1", "m2", "m3", "m4"}
    for _ in range(5):
        p.record(["hot"], set())  # "hot" is read often before it is ever cached
    placement = p.admit({"hot": 100})  # enters the window, pushes "w" out as a candidate...
    assert "w" in placement.demoted or "w" in p.probation
    p.record(["x"], set())
    placement = p.admit({"x": 100})  # ...and now "hot" leaves the window and beats a rare victim
    assert "hot" in p.probation
    assert any(m in placement.demoted for m in ["m1", "m2", "m3", "m4"])


def test_rare_candidate_is_rejected_in_favour_of_frequent_victim() -> None:
    p = _policy(budget=500, window=0.2)
    for k in ["m1", "m2", "m3", "m4"]:
        for _ in range(4):
            p.record([k], set())
        p.admit({k: 100})
    p.admit({"w": 100})  # fills the window; the main entries are frequent
    p.record(["once"], set())
    placement = p.admit({"once": 100})
    assert placement.demoted == ["w"]  # w (read 0 times) lost its duel against a frequent victim
    assert set(p.probation) | set(p.protected) == {"m1", "m2", "m3", "m4"}


def test_hit_in_probation_promotes_to_protected() -> None:
    p = _policy(budget=500, window=0.2)
    for k in ["a", "b"]:
        p.admit({k: 100})
    assert "a" in p.probation
    p.record(["a"], {"a"})
    assert "a" in p.protected and "a" not in p.probation


def test_budget_is_never_exceeded_and_ghosts_are_forgotten() -> None:
    p = _policy(budget=1000, window=0.1)
    for i in range(200):
        k = f"k{i % 37}"
        p.record([k], {k} if p._region(k) else set())
        if p._region(k) is None:
            p.admit({k: 50 + i % 60})
        assert p.resident_bytes() <= 1000
    resident = next(iter(p.probation or p.protected or p.window))
    p.record([resident], set())  # the RAM tier no longer has it (TTL, restart)
    assert p._region(resident) is None


def test_adaptive_window_moves_and_stays_in_bounds() -> None:
    cfg = WTinyLFUConfig(10_000, entry_bytes=100, adaptive=True)
    p = WTinyLFU(cfg)
    start = p.window_bytes
    for i in range(20_000):
        k = f"k{i % 300}"  # a pure loop larger than the cache: recency loses, sizes move
        hit = p._region(k) is not None
        p.record([k], {k} if hit else set())
        if not hit:
            p.admit({k: 100})
        assert p.resident_bytes() <= cfg.budget_bytes
    assert p.window_bytes != start
    assert 1 <= p.window_bytes <= cfg.max_window_bytes


def test_lua_scripts_ship_as_package_data() -> None:
    """Every script the shared policy loads is matched by pyproject's package-data (a wheel or the
    image without them would fail at the first Redis call), and each loads with its common part."""
    import tomllib
    from fnmatch import fnmatch
    from pathlib import Path

    from caches.admission.shared import lua_source

    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["caches"]
    scripts = sorted((root / "caches" / "admission" / "lua").glob("*.lua"))
    assert {p.stem for p in scripts} == {"common", "record", "admit", "remove", "halve", "reconcile", "orphans"}
    for path in scripts:
        rel = path.relative_to(root / "caches").as_posix()
        assert any(fnmatch(rel, pat) for pat in patterns), rel
    assert lua_source("record").startswith(lua_source("common")) and "SETRANGE" in lua_source("halve")
    assert lua_source("reconcile").startswith(lua_source("common"))
