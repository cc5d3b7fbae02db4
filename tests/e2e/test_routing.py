"""Prefix-aware routing with two real LLM replicas (tiny model) inside the running Serve cluster."""

from __future__ import annotations

from benchmarks.prefix_routing import prefixes, run_arm
from deployments.config import REPO_ROOT


def test_same_prefix_always_finds_its_kv_blocks(app_url: str) -> None:
    # app_url: Ray and Serve are up; this adds a second application with two LLM replicas.
    result = run_arm("longest-prefix", str(REPO_ROOT / ".models" / "tiny-llama"), prefixes(8, 120), questions=3)
    # With power-of-two routing a prefix asked 3 times lands on 1.75 replicas on average and a
    # repeat misses its KV blocks about half the time; with affinity every prefix has one home.
    # One slip is tolerated: on a loaded 2-core box a queue-length probe can time out, and the
    # router then falls back to the other replica, as designed for overload.
    # (Which replica is each prefix's home is up to the hash: all 8 on one replica is allowed.)
    assert result["requests"] == 24
    assert result["replicas_per_prefix_mean"] <= 1.25, result
    assert result["repeat_prefix_misses"] <= 1, result
