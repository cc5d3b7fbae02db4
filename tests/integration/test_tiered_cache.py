"""TieredCache end to end on real Redis + RocksDB (+ Feast for the feature paths): placement,
budgets, TTL, versions, cross-replica invalidation and the failure cases."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from benchmarks.simulate_policies import simulate
from caches.admission import SharedWTinyLFU, WTinyLFU, WTinyLFUConfig
from caches.features import FeatureCache
from caches.redis_client import is_cluster
from caches.redis_server import EmbeddedRedis, free_port
from caches.tiered import TieredCache
from caches.tiers.base import TierStats, TierUnavailable
from caches.tiers.redis import RETRY_AFTER_S, RedisTier, shards_for
from caches.tiers.rocksdb import RocksDBTier
from tests.integration.test_tiers import failing_disk, small_feast_repo

REPO_ROOT = Path(__file__).resolve().parents[2]
VALUE = 100  # bytes per test value


class DictTier:
    """A stand-in source of truth for the placement tests (the Feast paths use real Feast)."""

    name = "source"

    def __init__(self, data: dict[str, bytes] | None = None) -> None:
        self.data = dict(data or {})
        self.reads = 0

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        self.reads += len(keys)
        return {k: self.data[k] for k in keys if k in self.data}

    def put_many(self, items: dict[str, bytes], ttl_s: float | None = None) -> None:
        self.data.update(items)

    def delete_many(self, keys: list[str]) -> int:
        return 0

    def size_bytes(self) -> int:
        return 0

    def stats(self) -> TierStats:
        return TierStats()


@pytest.fixture
def redis_url(both_redis_urls: str) -> str:
    """Every test here that uses Redis runs on the single server and on the 3-master cluster."""
    return both_redis_urls


def val(key: str, tag: str = "") -> bytes:
    return (key + tag).encode().ljust(VALUE, b".")


def source_for(keys: list[str]) -> DictTier:
    return DictTier({k: val(k) for k in keys})


def open_cache(redis_url: str, path: Path, *, cold: Any = None, ram: int = 10 * 120, ssd: int = 10**7,
               name: str = "t", **kw: Any) -> TieredCache:
    return TieredCache.open(redis_url=redis_url, rocksdb_dir=path, ram_budget_bytes=ram, ssd_budget_bytes=ssd,
                            cold=cold, name=name, entry_bytes=120, **kw)


def test_promotion_demotion_and_sources(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    keys = [f"t:m:1:{i}" for i in range(60)]
    cache = open_cache(redis_url, tmp_path / "ssd", cold=source_for(keys))
    try:
        first = cache.get_many(keys[:1])
        assert first.sources == {keys[0]: "source"} and not first.degraded
        assert cache.get_many(keys[:1]).sources == {keys[0]: "redis"}  # promoted
        for k in keys[1:]:  # a scan of rare keys pushes the window out
            cache.get_many([k])
        assert cache.counters.demotions > 0
        ram_now = set(cache.ram.get_many(keys))
        demoted = [k for k in keys if k not in ram_now]
        got = cache.get_many(demoted[:3])
        assert set(got.sources.values()) == {"rocksdb"}  # demoted entries live on SSD
        assert got.values == {k: val(k) for k in demoted[:3]}
        from prometheus_client import generate_latest

        exported = generate_latest().decode()
        for name in ("hits_total", "misses_total", "promotions_total", "demotions_total", "bytes",
                     "read_latency_seconds_bucket"):
            assert f"tierserve_tier_{name}" in exported
        assert 'tierserve_tier_hits_total{namespace="t",tier="redis"}' in exported
    finally:
        cache.close()


def test_byte_budgets_hold_and_nothing_is_lost(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    keys = [f"t:m:1:{i}" for i in range(300)]
    ram_budget, ssd_budget = 2000, 6000
    source = source_for(keys)
    cache = open_cache(redis_url, tmp_path / "ssd", cold=source, ram=ram_budget, ssd=ssd_budget)
    rng = random.Random(1)
    try:
        for _ in range(600):
            batch = [keys[min(int(rng.paretovariate(1.0)) - 1, 299)] for _ in range(3)]
            res = cache.get_many(batch)
            assert res.values == {k: val(k) for k in batch} and not res.missing
            assert cache.ram.size_bytes() <= ram_budget
            assert cache.ssd.size_bytes() <= ssd_budget
        assert cache.policy.resident_bytes() <= ram_budget
        assert cache.counters.ssd_drops > 0
        stats = cache.stats()
        assert stats.tiers["redis"].hits > 0 and stats.tiers["rocksdb"].bytes <= ssd_budget
    finally:
        cache.close()


def test_ttl_per_namespace(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    short, long_ = "short:m:1:a", "long:m:1:a"
    source = source_for([short, long_])
    cache = open_cache(redis_url, tmp_path / "ssd", cold=source, ttl_s={"short": 0.3})
    try:
        cache.get_many([short, long_])
        assert cache.get_many([short, long_]).sources == {short: "redis", long_: "redis"}
        time.sleep(0.45)
        res = cache.get_many([short, long_])
        assert res.sources == {short: "source", long_: "redis"}  # expired in RAM *and* SSD
    finally:
        cache.close()


def test_invalidation_reaches_the_other_replica(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    key = "t:m:1:shared"
    source = source_for([key])
    a = open_cache(redis_url, tmp_path / "a", cold=source, name="inv")
    b = open_cache(redis_url, tmp_path / "b", cold=source, name="inv")
    try:
        assert b.get_many([key]).sources[key] == "source"  # b: cold read, copy on b's SSD
        assert a.get_many([key]).sources[key] == "redis"  # a: shared RAM
        assert key in b.ssd
        source.data[key] = val(key, "-v2")
        a.invalidate([key])
        deadline = time.monotonic() + 5
        while key in b.ssd and time.monotonic() < deadline:
            time.sleep(0.02)
        assert key not in b.ssd  # b's consumer applied the stream event
        assert b.get_many([key]).values[key] == val(key, "-v2")
        assert a.get_many([key]).values[key] == val(key, "-v2")
    finally:
        a.close()
        b.close()


def test_redis_killed_and_restarted_mid_read(tmp_path: Path) -> None:
    server = EmbeddedRedis(port=free_port(), workdir=tmp_path / "redis").start()
    keys = [f"t:m:1:{i}" for i in range(6)]
    source = source_for(keys)
    cache = open_cache(server.url, tmp_path / "ssd", cold=source, ram=10_000, invalidation=False)
    try:
        cache.get_many(keys[:5])
        assert set(cache.get_many(keys[:5]).sources.values()) == {"redis"}
        server.stop()
        res = cache.get_many(keys)  # no exception: SSD and the source answer
        assert res.degraded and not res.missing
        assert res.values == {k: val(k) for k in keys}
        assert set(res.sources.values()) <= {"rocksdb", "source"}
        server.start()  # same port, empty
        time.sleep(RETRY_AFTER_S + 0.1)
        res = cache.get_many(keys)
        assert not res.degraded and set(res.sources.values()) == {"rocksdb"}
        res = cache.get_many(keys)
        assert set(res.sources.values()) == {"redis"}  # caching resumed by itself
    finally:
        cache.close()
        server.stop()


DEMOTION_MARKER = "tierserve-test: demotion lower-written"
CRASH_SCRIPT = textwrap.dedent("""
    import sys
    import time
    from caches.tiered import TieredCache
    from tests.integration.test_tiered_cache import DEMOTION_MARKER, source_for
    url, ssd_dir, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    new = [f"crash:m:1:new{i}" for i in range(n)]
    cache = TieredCache.open(redis_url=url, rocksdb_dir=ssd_dir, ram_budget_bytes=10 * 120,
                             ssd_budget_bytes=10**7, cold=source_for(new), name="crash",
                             entry_bytes=120, invalidation=False)

    def pause(demoted):  # the test hook: tell the parent, then wait to be killed right here
        print(DEMOTION_MARKER, demoted, file=sys.stderr, flush=True)
        time.sleep(30)

    cache.before_upper_delete = pause
    for k in new:
        cache.get_many([k])
    print("finished without demoting", flush=True)
""")


def test_sigkill_between_lower_write_and_upper_delete_loses_nothing(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    old = [f"crash:m:1:old{i}" for i in range(8)]
    a = open_cache(redis_url, tmp_path / "a", name="crash", invalidation=False)
    a.put_many({k: val(k) for k in old})
    resident = set(a.ram.get_many(old))
    assert resident
    a.close()
    shutil.rmtree(tmp_path / "a")  # the only copies left are in RAM: a demotion must move them
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, redis_url, str(tmp_path / "b"), "20"],
                            cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = ""
        deadline = time.monotonic() + 60
        while DEMOTION_MARKER not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"child exited before demoting: {proc.stdout.read() if proc.stdout else ''}")
        assert DEMOTION_MARKER in line
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    ssd = RocksDBTier(tmp_path / "b")  # the dead process' lock is gone
    ram = RedisTier(redis_url, meta_prefix="tierserve:tier:crash", shards=shards_for(10 * 120, 120))  # as the cache
    try:
        in_ram, in_ssd = ram.get_many(sorted(resident)), ssd.get_many(sorted(resident))
        for k in resident:
            assert in_ram.get(k) == val(k) or in_ssd.get(k) == val(k), f"{k} lost"
        assert set(in_ram) & set(in_ssd)  # the demotion in flight left duplicates, not holes
    finally:
        ssd.close()


def test_lua_policy_makes_the_same_decisions_as_the_python_reference(
    redis_client: redis.Redis, redis_url: str
) -> None:
    rng = random.Random(7)
    keys = [f"p:m:1:{i}" for i in range(400)]
    sizes = {k: rng.randint(60, 180) for k in keys}
    trace = [[keys[min(int(rng.paretovariate(0.8)) - 1, 399)] for _ in range(rng.randint(1, 3))] for _ in range(1500)]
    trace = [list(dict.fromkeys(b)) for b in trace]
    cfg = WTinyLFUConfig(3000, entry_bytes=120)
    local = WTinyLFU(cfg)
    shared = SharedWTinyLFU(RedisTier(redis_url, shards=1), cfg, prefix="test:equiv")  # one group: the reference is one
    a = simulate(local, trace, sizes.__getitem__)
    b = simulate(shared, trace, sizes.__getitem__)
    assert a == b
    assert shared.agings == local.sketch.agings > 0
    assert shared.window_bytes() == local.window_bytes
    resident = set(local.window) | set(local.probation) | set(local.protected)
    assert set(shared.resident_keys()) == resident
    assert shared.resident_bytes() == local.resident_bytes() <= cfg.budget_bytes


# -- feature paths on a real Feast repo -------------------------------------------------------
@pytest.fixture(scope="module")
def feast_repo(shared_data: Path) -> Any:
    return small_feast_repo(shared_data)


def open_features(redis_url: str, repo: Path, ssd_dir: Path, version: str, **kw: Any) -> FeatureCache:
    return FeatureCache.open(redis_url=redis_url, rocksdb_dir=ssd_dir, feast_repo=repo, view="user_features",
                             entity_key="user_id", model_version=version, ram_budget_bytes=kw.get("ram", 50_000),
                             ssd_budget_bytes=10**7)


def test_feature_cache_reads_versions_and_writes_through_feast(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, feast_repo: Any
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(feast_repo.repo_dir, repo)  # this test writes to the online store
    ids = feast_repo.user_ids_sample[:4]
    fc = open_features(redis_url, repo, tmp_path / "ssd", "v1")
    try:
        first = fc.get(ids + [987654321])
        assert set(first.features) == set(ids) and first.missing == [987654321]  # unknown: missing, not {}
        assert set(first.sources.values()) == {"feast"}
        assert set(fc.get(ids).sources.values()) == {"redis"}
        # version bump: old keys unreachable at once, purged from RAM and SSD
        fc.bump_version("v2", purge_in_background=False)
        assert set(fc.get(ids).sources.values()) == {"feast"}
        assert not [k for k in fc.tiered.ram.scan_prefix("features:user_features:v1:")]
        assert not fc.tiered.ssd.keys_with_prefix("features:user_features:v1:")
        # write through Feast, then the cached copies are invalidated
        uid = ids[0]
        row = {"user_id": uid, **fc.get([uid]).features[uid]}
        row["n_ratings"] = int(row["n_ratings"]) + 1000
        fc.write([row])
        after = fc.get([uid])
        assert after.sources[uid] == "feast" and after.features[uid]["n_ratings"] == row["n_ratings"]
    finally:
        fc.close()


def test_feast_unreachable_serves_upper_tiers_and_reports_misses(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, feast_repo: Any
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(feast_repo.repo_dir, repo)
    cached, uncached = feast_repo.user_ids_sample[:3], feast_repo.user_ids_sample[3:6]
    fc = open_features(redis_url, repo, tmp_path / "ssd", "v1")
    fc.get(cached)
    fc.close()
    (repo / "data" / "online_store.db").unlink()  # the online store is gone
    fc = open_features(redis_url, repo, tmp_path / "ssd", "v1")
    try:
        res = fc.get(cached + uncached)
        assert set(res.features) == set(cached)
        assert sorted(res.missing) == sorted(uncached)
        assert res.degraded
        assert all(res.features[i] for i in cached)
    finally:
        fc.close()


def test_a_budget_split_over_hash_tag_groups_serves_and_accounts(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """A budget big enough for several groups: on the cluster every batch spans groups (one
    script call per group, pipelined per node); on one server it is one group, as before."""
    ram = 8 * 64 * 120  # 8 groups of 64 entries on a cluster
    keys = [f"g:m:1:{i}" for i in range(300)]
    cache = open_cache(redis_url, tmp_path / "ssd", cold=source_for(keys), ram=ram, name="groups")
    try:
        assert cache.ram.shards == (8 if cache.ram.tagged else 1)
        for i in range(0, 300, 30):
            cache.get_many(keys[i : i + 30])
        again = cache.get_many(keys[:30])
        assert again.values == {k: val(k) for k in keys[:30]}
        assert set(again.sources.values()) <= {"redis", "rocksdb"} and "redis" in set(again.sources.values())
        assert cache.policy is not None
        resident = set(cache.policy.resident_keys("g:"))
        assert resident and resident <= set(keys)
        assert cache.policy.resident_bytes() <= ram
        assert set(cache.ram.scan_prefix("g:")) == set(cache.ram.get_many(keys))  # every primary scanned
        assert cache.invalidate(keys[:30], broadcast=False)
        assert cache.ram.get_many(keys[:30]) == {}
    finally:
        cache.close()


def _ram_copies_are_on_ssd(cache: TieredCache, keys: list[str]) -> None:
    """The crash-safety order: a row reaches RAM only after its SSD copy exists."""
    assert cache.ssd is not None and cache.ram is not None
    in_ram = set(cache.ram.get_many(keys))
    assert all(k in cache.ssd for k in in_ram), sorted(k for k in in_ram if k not in cache.ssd)


def test_a_failing_ssd_degrades_to_the_cold_tier_and_recovers(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rocksdict raises a bare Exception on a full or broken disk: it must never escape the
    cache (the Recommender only catches the cache errors); the SSD is skipped like a down RAM."""
    keys = [f"t:m:1:{i}" for i in range(30)]
    cache = open_cache(redis_url, tmp_path / "ssd", cold=source_for(keys), ram=10 * 120, invalidation=False)
    assert cache.ssd is not None and cache.ram is not None
    try:
        for k in keys[:20]:  # a scan of rare keys: some demoted, on SSD only
            cache.get_many([k])
        on_ssd_only = [k for k in keys[:20] if k in cache.ssd and k not in set(cache.ram.get_many(keys[:20]))]
        assert on_ssd_only
        disk = failing_disk(cache.ssd, monkeypatch)

        disk.failing = {"write"}  # disk full: reads work, writes are refused
        res = cache.get_many(keys[20:23])  # not held anywhere: the fill to SSD is refused
        assert res.values == {k: val(k) for k in keys[20:23]} and res.degraded
        assert set(res.sources.values()) == {"source"}
        assert not any(k in cache.ssd for k in keys[20:23])
        assert cache.ram.get_many(keys[20:23]) == {}  # not on SSD, so not placed in RAM either
        res = cache.get_many(on_ssd_only[:2])  # SSD reads still answer
        assert set(res.sources.values()) == {"rocksdb"}
        assert cache.put_many({"t:m:1:put": val("t:m:1:put")}) is False  # refused, not raised
        assert "t:m:1:put" not in cache.ssd and cache.ram.get_many(["t:m:1:put"]) == {}
        assert cache.invalidate(on_ssd_only[:1], broadcast=False)  # the SSD copy is dropped all the same
        assert cache.get_many(on_ssd_only[:1]).sources == {on_ssd_only[0]: "source"}
        _ram_copies_are_on_ssd(cache, keys)

        disk.failing = {"write", "get"}  # broken disk: reads fail too
        res = cache.get_many(on_ssd_only[1:3] + keys[23:25])
        assert res.values == {k: val(k) for k in on_ssd_only[1:3] + keys[23:25]} and not res.missing
        assert res.degraded and set(res.sources.values()) <= {"source", "redis"}
        assert cache.counters.ssd_errors > 0
        _ram_copies_are_on_ssd(cache, keys)

        disk.failing = set()  # the disk works again: nothing to restart
        res = cache.get_many(keys[20:23])
        assert not res.degraded and all(k in cache.ssd for k in keys[20:23])
        assert cache.put_many({"t:m:1:put": val("t:m:1:put")}) is True
        assert cache.get_many(["t:m:1:put"]).values == {"t:m:1:put": val("t:m:1:put")}
        _ram_copies_are_on_ssd(cache, keys + ["t:m:1:put"])
    finally:
        monkeypatch.undo()
        cache.close()


def test_expired_ram_values_leave_the_byte_total_by_themselves(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """Redis expires values by TTL without telling the sizes hash: the cache's own upkeep thread
    brings the RAM byte total and entry count back to what is live, with no caller's help."""
    short = [f"exp:m:1:{i}" for i in range(12)]
    live = [f"live:m:1:{i}" for i in range(4)]
    cache = open_cache(redis_url, tmp_path / "ssd", cold=source_for(short + live), ram=40 * 120,
                       ttl_s={"exp": 0.3}, invalidation=False, maintain_every_s=0.1)
    assert cache.ram is not None
    try:
        for k in short + live:
            cache.get_many([k])
        resident = set(cache.ram.get_many(short + live))
        assert resident & set(short) and set(live) <= resident
        live_bytes = sum(len(k) + VALUE for k in live)
        assert cache.ram.stats().bytes > live_bytes
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and cache.ram.stats().bytes != live_bytes:
            time.sleep(0.1)
        st = cache.ram.stats()
        assert cache.ram.get_many(short) == {}  # all expired
        assert (st.bytes, st.entries) == (live_bytes, len(live))
        assert cache.counters.ram_reconciled == len(resident & set(short))
        assert cache.ram.get_many(live) == {k: val(k) for k in live}  # live values untouched
    finally:
        cache.close()


def test_maintain_is_bounded_resumes_and_survives_redis_errors(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [f"exp:m:1:{i}" for i in range(700)]  # past hash-max-ziplist-entries: HSCAN pages
    cache = open_cache(redis_url, tmp_path / "ssd", ram=10**6, ttl_s=0.3, invalidation=False,
                       maintain_every_s=None)
    assert cache.ram is not None
    try:
        cache.ram.put_many({k: val(k) for k in keys}, ttl_s=0.3)  # straight in: the sizes hash is big
        time.sleep(0.5)
        assert cache.ram.stats().entries == len(keys)
        real_hscan = cache.ram.client.hscan

        def down(*args: Any, **kwargs: Any) -> Any:
            raise redis.ConnectionError("connection refused")

        monkeypatch.setattr(cache.ram.client, "hscan", down)
        assert cache.maintain() == 0  # through the breaker: swallowed, retried next round
        assert cache.ram.stats().entries == len(keys)
        monkeypatch.setattr(cache.ram.client, "hscan", real_hscan)
        time.sleep(RETRY_AFTER_S + 0.1)
        # One step reads one HSCAN page: a hash this big (not ziplist-encoded) takes several.
        first = cache.ram.reconcile_step(count=50)
        assert 0 < first < len(keys)
        rounds = 0
        while cache.ram.stats().entries and rounds < 100:
            cache.maintain(steps=1)
            rounds += 1
        assert cache.ram.stats().entries == 0 and cache.ram.size_bytes() == 0
        assert rounds > 1
    finally:
        cache.close()


def test_a_fill_between_an_invalidations_delete_and_forget_stays_under_the_ssd_budget(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """The invalidation consumer deletes a key's SSD copy, another thread writes the key again
    (its `added` a no-op: the key was still ordered), then the consumer forgets it: the key was
    left on the SSD outside the recency order, which the budget never drops (one leak per race)."""
    keys = [f"ns:m:1:{i}" for i in range(20)]
    cache = open_cache(redis_url, tmp_path / "ssd", cold=source_for(keys), ssd=10**7)
    try:
        cache.get_many(keys[:1])
        assert cache.ssd is not None and keys[0] in cache.ssd
        cache.ssd.delete_many(keys[:1])  # the consumer's delete...
        cache.put_many({keys[0]: val(keys[0], "new")})  # ...a writer fills it again...
        cache._recency.forget(keys[:1])  # ...and the consumer's forget lands last
        assert keys[0] in cache.ssd
        cache.get_many(keys[1:])
        cache.ssd_budget = 1  # now everything must go, the raced key too
        cache._enforce_ssd_budget()
        assert keys[0] not in cache.ssd, "the raced key escaped the SSD budget"
    finally:
        cache.close()


def test_a_ram_write_that_fails_after_the_placement_decided_leaves_no_untracked_values(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """The admit script has already forgotten the demoted rows and counted the admitted ones when
    the RAM write times out: the demoted values stayed in Redis with no placement record (over
    the budget, and for good without a TTL), the admitted ones were counted but never written."""
    keys = [f"emb:k{i}" for i in range(400)]
    cache = open_cache(redis_url, tmp_path / "ssd", cold=source_for(keys), ram=10 * 120, invalidation=False)
    assert cache.ram is not None and cache.policy is not None
    real = cache.ram.put_and_delete
    failures = {"n": 0}

    def flaky(items: dict[str, bytes], deletes: list[str], ttl_s: float | None = None, **kw: Any) -> None:
        if deletes and failures["n"] < 5:  # five timeouts while Redis is slow
            failures["n"] += 1
            raise TierUnavailable("redis failed during put_delete: TimeoutError (injected)")
        real(items, deletes, ttl_s, **kw)

    try:
        cache.ram.put_and_delete = flaky  # type: ignore[method-assign]
        for r in range(40):
            for _ in range(2):
                cache.get_many(keys[r * 10:(r + 1) * 10])
        assert failures["n"] == 5
        cache.ram.put_and_delete = real  # type: ignore[method-assign]
        for r in range(40):
            cache.get_many(keys[r * 10:(r + 1) * 10])
        in_ram = [k for k in keys if redis_client.exists(cache.ram.physical(k))]
        placed = set(cache.policy.resident_keys())
        assert not [k for k in in_ram if k not in placed], "values in RAM the placement does not track"
        assert not [k for k in placed if k not in in_ram], "rows the placement counts that RAM does not hold"
    finally:
        cache.close()


# -- the TTL runs from the cold read, through every move ---------------------------------------
MOVE_TTL_S = 2.0  # short: each test waits it out once
TTL_SLACK_MS = 50  # a PX write lands a round trip after its ms were computed
FULL_TTL_MARGIN_MS = 500  # "a full TTL" (a cold read's), however slow the machine
MOVE_AT_S = 0.8  # how long after the cold read the row is moved: well inside the TTL, well past 0


def _sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.time()))


def _ram_pttl_ms(client: redis.Redis, cache: TieredCache, key: str) -> int:
    assert cache.ram is not None
    return int(client.pttl(cache.ram.physical(key)))


def _demote(cache: TieredCache, key: str, others: list[str]) -> None:
    """Reads of other keys until the placement demotes `key` out of RAM: each read more often
    than `key` (once), so the admission prefers them to it."""
    assert cache.ram is not None
    for other in others:
        for _ in range(3):
            cache.get_many([other])
        if not cache.ram.get_many([key]):
            return
    pytest.fail(f"{key} was never demoted: the RAM budget is too large for the test")


def _promoted_then_gone(redis_client: redis.Redis, cache: TieredCache, key: str, read_at: float) -> None:
    """At MOVE_AT_S after the cold read at `read_at`, a read promotes `key` from the SSD with the
    time it had left (not a fresh TTL); past MOVE_TTL_S since that read no tier serves it (the
    read goes to the cold tier)."""
    assert cache.ram is not None and cache.ssd is not None
    _sleep_until(read_at + MOVE_AT_S)
    promoted = cache.get_many([key])
    assert promoted.sources == {key: "rocksdb"} and promoted.values == {key: val(key)}
    left_ms = (read_at + MOVE_TTL_S - time.time()) * 1000
    pttl = _ram_pttl_ms(redis_client, cache, key)
    assert 0 < pttl <= left_ms + TTL_SLACK_MS, f"promoted with {pttl} ms, the row had {left_ms:.0f} ms left"
    _sleep_until(read_at + MOVE_TTL_S + 0.1)
    assert cache.ram.get_many([key]) == {}, "the RAM copy outlived the TTL since the cold read"
    assert cache.ssd.get_many([key]) == {}, "the SSD copy outlived the TTL since the cold read"
    assert cache.get_many([key]).sources == {key: "source"}  # the cold tier, never a stale copy


@pytest.mark.parametrize("checked", [False, True], ids=["plain", "generations"])
def test_a_promotion_keeps_the_time_left_since_the_cold_read(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, checked: bool
) -> None:
    """Read from the cold tier, demoted out of RAM (its SSD copy stays), promoted back from the
    SSD after part of its TTL: RAM gets the time left, not a fresh TTL, and once the TTL since
    the cold read has passed no tier serves the row (the read goes to the cold tier). Per
    namespace TTLs (a dict) and the generation-checked write path both carry it."""
    key = "ttl:m:1:row"
    others = [f"ttl:m:1:other{i}" for i in range(80)]
    source = source_for([key, *others])
    extra: dict[str, Any] = {"generation_of": lambda k: f"ttlgen:{k}"} if checked else {}
    ttl: float | dict[str, float] = {"ttl": MOVE_TTL_S, "else": 60.0} if checked else MOVE_TTL_S
    cache = open_cache(redis_url, tmp_path / "ssd", cold=source, ttl_s=ttl, invalidation=False, **extra)
    assert cache.ssd is not None and cache.ram is not None
    try:
        assert cache.get_many([key]).sources == {key: "source"}
        read_at = time.time()  # the cold read's expiry is at most this + the TTL
        assert MOVE_TTL_S * 1000 - FULL_TTL_MARGIN_MS < _ram_pttl_ms(redis_client, cache, key) <= MOVE_TTL_S * 1000
        _demote(cache, key, others)
        assert key in cache.ssd  # the cold read's SSD copy: the demotion had nothing to write
        _promoted_then_gone(redis_client, cache, key, read_at)
        assert _ram_pttl_ms(redis_client, cache, key) > MOVE_TTL_S * 1000 - FULL_TTL_MARGIN_MS  # a new cold read: a full TTL
    finally:
        cache.close()


def test_a_demotion_keeps_the_time_left_since_the_cold_read(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """Replica B reads a row from the cold tier (into the shared RAM and B's SSD); replica A,
    whose SSD lacks it, demotes it: A's SSD copy expires when the RAM copy would have, not a full
    TTL after the demotion, and so does its promotion back into RAM from A's SSD. Past the TTL
    since B's cold read, A serves it from the cold tier."""
    key = "ttl:m:1:row"
    others = [f"ttl:m:1:other{i}" for i in range(80)]
    source = source_for([key, *others])
    a = open_cache(redis_url, tmp_path / "a", cold=source, name="ttl-moves", ttl_s=MOVE_TTL_S, invalidation=False)
    b = open_cache(redis_url, tmp_path / "b", cold=source, name="ttl-moves", ttl_s=MOVE_TTL_S, invalidation=False)
    assert a.ssd is not None and a.ram is not None
    try:
        assert b.get_many([key]).sources == {key: "source"}
        read_at = time.time()
        assert key not in a.ssd and a.ram.get_many([key])
        _sleep_until(read_at + MOVE_AT_S / 2)
        _demote(a, key, others)  # A's demotion writes the RAM copy to A's SSD
        assert key in a.ssd
        expiry = a.ssd.get_many([key]).expires_at[key]
        assert expiry <= read_at + MOVE_TTL_S + TTL_SLACK_MS / 1000, f"{expiry - read_at:.3f} s after the cold read"
        _promoted_then_gone(redis_client, a, key, read_at)
    finally:
        a.close()
        b.close()


def test_values_that_never_go_stale_start_the_ttl_again_with_a_promotion(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """Values computed above the cache (the embeddings: `ttl_from_source=False`, never stale) keep
    the old rule: the TTL only ends entries nobody reads, so a promotion writes a full TTL."""
    key = "emb:m:1:row"
    cache = open_cache(redis_url, tmp_path / "ssd", ttl_s=MOVE_TTL_S, invalidation=False, ttl_from_source=False)
    assert cache.ssd is not None and cache.ram is not None and cache.policy is not None
    try:
        assert cache.put_many({key: val(key)})
        stored_at = time.time()
        cache.ram.delete_many([key])  # RAM lost it: the next read promotes the SSD copy
        cache.policy.remove([key])
        _sleep_until(stored_at + MOVE_AT_S)
        assert cache.get_many([key]).sources == {key: "rocksdb"}
        assert _ram_pttl_ms(redis_client, cache, key) > MOVE_TTL_S * 1000 - FULL_TTL_MARGIN_MS
    finally:
        cache.close()


def _flush(client: redis.Redis) -> None:
    """Empty every primary: what a Redis that restarts without persistence comes back as."""
    if is_cluster(client):
        client.flushdb(target_nodes=RedisCluster.PRIMARIES)  # type: ignore[call-arg]
    else:
        client.flushdb()


def test_a_copy_from_before_an_empty_redis_restart_never_matches_a_generation_again(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """The row changed at the source while this replica missed its invalidation (its SSD copy
    stayed), and then Redis restarted empty: the generations went with it. Counters that started
    again at 0 matched the SSD copy tagged 0 and served the old row until the replica's restart
    check ran; a counter now starts from the server clock, so no old tag matches it."""
    key = "gen:m:1:user"
    source = source_for([key])
    cache = open_cache(redis_url, tmp_path / "ssd", cold=source, invalidation=False,
                       generation_of=lambda k: f"restartgen:{k}")
    assert cache.ssd is not None and cache.generations is not None
    try:
        assert cache.get_many([key]).sources == {key: "source"}  # tagged with the user's generation
        before = cache.generations.read([key])[key]
        source.data[key] = val(key, "new")  # the source changed; this replica's copy did not go
        _flush(redis_client)
        again = cache.get_many([key])
        assert again.values == {key: val(key, "new")} and again.sources == {key: "source"}
        assert cache.generations.read([key])[key] > before  # started again above every old number
    finally:
        cache.close()


def test_generation_counters_carry_the_rows_ttl_and_a_bump_gives_it_again(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """A counter started by a read expires with the rows' TTL (a flood of ids nobody uses leaves
    no key for good); a bump (an event: activity) gives it that TTL again."""
    key = "gen:m:1:ttl"
    cache = open_cache(redis_url, tmp_path / "ssd", cold=source_for([key]), invalidation=False, ttl_s=60.0,
                       generation_of=lambda k: f"ttlgen:{k}")
    assert cache.generations is not None and cache.ram is not None
    counter = cache.ram.counter_name(f"ttlgen:{key}")
    try:
        cache.get_many([key])
        assert 0 < redis_client.pttl(counter) <= 60_000
        redis_client.pexpire(counter, 1_000)
        before = cache.generations.read([key])[key]
        assert cache.generations.bump([key]) == {key: before + 1}
        assert redis_client.pttl(counter) > 1_000
    finally:
        cache.close()
