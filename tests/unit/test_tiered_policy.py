"""Policies side by side on synthetic traces: the ordering the benchmark relies on."""

from __future__ import annotations

import random

from benchmarks.baselines import BeladyPolicy, LRUPolicy
from benchmarks.simulate_policies import simulate
from caches.admission import WTinyLFU, WTinyLFUConfig


def _zipf_trace(n: int, keys: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(keys)]
    return [[f"k{i}"] for i in rng.choices(range(keys), weights=weights, k=n)]


def test_wtinylfu_beats_lru_and_belady_bounds_both_on_skewed_trace() -> None:
    trace = _zipf_trace(30_000, 5_000)
    budget = 100 * 200  # 200 entries of 100 B
    lru = simulate(LRUPolicy(budget), trace, lambda _k: 100)["ram_hit_ratio"]
    tiny = simulate(WTinyLFU(WTinyLFUConfig(budget, entry_bytes=100)), trace, lambda _k: 100)["ram_hit_ratio"]
    best = simulate(BeladyPolicy(budget, trace), trace, lambda _k: 100)["ram_hit_ratio"]
    assert tiny > lru + 0.03
    assert best >= tiny


def test_lru_evicts_least_recent_and_rejects_oversized() -> None:
    p = LRUPolicy(300)
    p.admit({"a": 100, "b": 100, "c": 100})
    p.record(["a"], {"a"})
    placement = p.admit({"d": 100})
    assert placement.demoted == ["b"]
    placement = p.admit({"huge": 1000})
    assert placement.rejected == ["huge"]


def test_belady_keeps_the_entry_needed_soonest() -> None:
    trace = [["a"], ["b"], ["c"], ["a"], ["b"], ["a"]]
    p = BeladyPolicy(200, trace)
    hits = simulate(p, trace, lambda _k: 100)
    # a and b fit; c (never read again) is bypassed: a, b, a hit
    assert round(hits["ram_hit_ratio"] * 6) == 3
