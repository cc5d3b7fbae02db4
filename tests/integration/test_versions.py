"""Model versions: bump visibility across replicas, no stale answers, background purge."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from caches.redis_client import make_client
from caches.result import CacheUnavailable, ResultCache
from caches.semantic import SemanticCache
from caches.versions import (
    VERSION_CACHE_S,
    VERSIONS_KEY,
    ModelVersions,
    purge_in_background,
    purge_old_versions,
)
from tests.slow_redis import node_of, stalled
from tests.support import chat_key, scope


@pytest.fixture
def redis_url(both_redis_urls: str) -> str:
    """Every test here that uses Redis runs on the single server and on the 3-master cluster."""
    return both_redis_urls


REQ = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0}


def test_bump_is_seen_by_other_replicas_within_a_second(redis_client: redis.Redis) -> None:
    a = ModelVersions(redis_client, {"m": "1"})
    b = ModelVersions(redis_client, {"m": "1"})
    assert a.current("m") == b.current("m") == "1"
    assert a.bump("m", "2") == "1"
    assert a.current("m") == "2"  # the bumping replica at once
    deadline = time.monotonic() + 1.0
    while b.current("m") != "2":
        assert time.monotonic() < deadline, "bump not visible within 1 s"
        time.sleep(0.05)
    assert VERSION_CACHE_S < 1.0
    assert a.bump("m", "3") == "2"
    assert a.all()["m"] == "3"


def test_bump_leaves_no_stale_answer_and_purges(redis_client: redis.Redis) -> None:
    versions = ModelVersions(redis_client, {"m": "1"})
    results = ResultCache(redis_client)
    semantic = SemanticCache(redis_client, threshold=0.9, mode="static", ttl_s=None)
    vec = np.ones(384, dtype=np.float32) / np.sqrt(384)

    def keys(version: str) -> tuple[str, str]:
        rk = chat_key(tenant="t", model="m", version=version, request=REQ)
        sk = scope(tenant="t", model="m", version=version)
        return rk, sk

    rk, sk = keys(versions.current("m"))
    results.put(rk, b"old answer")
    semantic.store(sk, "hello", vec, "old answer")
    assert semantic.lookup(sk, "hello", vec) is not None

    old = versions.bump("m", "2")
    rk2, sk2 = keys(versions.current("m"))
    assert results.get(rk2) is None and semantic.lookup(sk2, "hello", vec) is None  # unreachable at once

    out = purge_old_versions(results, semantic, "m", old)
    assert out["result"] == 1 and out["semantic"] >= 1
    assert results.get(rk) is None and semantic.lookup(sk, "hello", vec) is None
    assert not list(redis_client.scan_iter(match="*:m:1:*")) and not list(redis_client.scan_iter(match="*:m@*:1:*"))

    results.put(rk2, b"new")
    purge_in_background(results, semantic, "m", "2").join(timeout=5)
    assert results.get(rk2) is None


def test_known_answers_without_redis_and_says_when_it_is_old(redis_client: redis.Redis) -> None:
    versions = ModelVersions(redis_client, {"m": "1"}, cache_s=0.2)
    assert versions.known("m") == ("1", True)  # never read: the default, to be refreshed
    ModelVersions(redis_client, {"m": "1"}).bump("m", "2")  # another replica bumps
    assert versions.current("m") == "2"
    assert versions.known("m") == ("2", False)
    time.sleep(0.25)
    assert versions.known("m") == ("2", True)  # still the last seen; the caller refreshes it


def test_a_version_redis_cannot_give_now_is_unknown_for_keys_and_the_last_seen_for_serving(
        redis_url: str, redis_client: redis.Redis) -> None:
    """A replica that never read the version (it just started) while the version read times out
    (a slow Redis, not a dead one): `current` answers the configured default, which names entries
    of a version bumped away; `confirmed`, what cache keys use, refuses to guess."""
    ModelVersions(redis_client, {"m": "v1"}).bump("m", "v3")  # the live version
    fresh = ModelVersions(make_client(redis_url, socket_timeout_s=0.3), {"m": "v1"}, cache_s=0.05)
    fresh.client.ping()  # a warm pooled connection: the stalled read is really sent
    with stalled(*node_of(redis_client, redis_url, VERSIONS_KEY), 1.5):
        with pytest.raises(CacheUnavailable):
            fresh.confirmed("m")
        assert fresh.current("m") == "v1"  # a guess: fine for what to serve, never for a key
    deadline = time.monotonic() + 5
    while True:  # the breaker lets reads through again within its retry interval
        try:
            assert fresh.confirmed("m") == "v3"
            break
        except CacheUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert fresh.current("m") == "v3"
