"""Per-tenant and global budgets (caches/budget.py) and the per-replica mirror cap, on a real Redis."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from caches.budget import Report, usage
from caches.redis_client import RedisUnavailable
from caches.result import ENTRY_OVERHEAD_BYTES, KEY_COPIES, RECLAIM_PER_PUT, ResultCache
from caches.semantic import SemanticCache
from caches.semantic.store import BUDGET_PREFIX
from tests.support import scope


@pytest.fixture
def redis_url(both_redis_urls: str) -> str:
    """Every test here that uses Redis runs on the single server and on the 3-master cluster."""
    return both_redis_urls


def _unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    v = rng.standard_normal((n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _real_bytes(client: redis.Redis, cache: ResultCache) -> int:
    return sum(cache.entry_size(k.decode(), v) for k in client.scan_iter(match="res.[^_]*")
               if (v := client.get(k)) is not None)


def test_result_flood_evicts_only_the_flooders_entries(redis_client: redis.Redis) -> None:
    cache = ResultCache(redis_client, max_bytes=200_000, tenant_max_bytes=50_000, tenant_max_entries=40)
    b_keys = [cache.key(tenant="b", model="m", version="1", payload=i) for i in range(10)]
    for k in b_keys:
        cache.put(k, b"b" * 500)
    for i in range(2_000):  # tenant a: 2,000 distinct requests, far over its share
        cache.put(cache.key(tenant="a", model="m", version="1", payload=i), b"a" * 1_000)
        a = usage(redis_client, cache.meta, "a")
        assert a["bytes"] <= 50_000 and a["entries"] <= 40
    assert all(cache.get(k) == b"b" * 500 for k in b_keys)  # b's entries survived the flood
    assert cache.get(cache.key(tenant="a", model="m", version="1", payload=1_999)) is not None
    assert cache.get(cache.key(tenant="a", model="m", version="1", payload=0)) is None
    total = usage(redis_client, cache.meta)
    assert total["bytes"] == _real_bytes(redis_client, cache)  # the bookkeeping matches Redis
    assert total["entries"] == 10 + usage(redis_client, cache.meta, "a")["entries"]
    one = cache.entry_size(cache.key(tenant="a", model="m", version="1", payload=0), b"a" * 1_000)
    assert usage(redis_client, cache.meta, "a")["bytes"] > 50_000 - one  # a's share is full


def test_result_global_budget_holds_and_the_biggest_tenant_gives_way(redis_client: redis.Redis) -> None:
    # no tenant budget: only the global one, shared max-min fairly
    cache = ResultCache(redis_client, max_bytes=60_000, max_entries=30)
    small = [cache.key(tenant="small", model="m", version="1", payload=i) for i in range(5)]
    for k in small:
        cache.put(k, b"s" * 300)
    for tenant in ("a", "b", "c"):
        for i in range(200):
            cache.put(cache.key(tenant=tenant, model="m", version="1", payload=i), b"x" * 1_500)
            total = usage(redis_client, cache.meta)
            assert total["bytes"] <= 60_000 and total["entries"] <= 30
    assert all(cache.get(k) is not None for k in small)  # smaller than every flooder: untouched
    shares = [usage(redis_client, cache.meta, t)["entries"] for t in ("a", "b", "c")]
    assert max(shares) - min(shares) <= 2, shares  # the flooders end up sharing the rest evenly
    assert cache.delete_tenant("a") > 0
    assert usage(redis_client, cache.meta, "a") == {"entries": 0, "bytes": 0}  # purges give back
    assert usage(redis_client, cache.meta)["bytes"] == _real_bytes(redis_client, cache)


def test_result_expired_entries_give_their_bytes_back(redis_client: redis.Redis) -> None:
    cache = ResultCache(redis_client, max_bytes=1 << 20)
    for i in range(10):
        cache.put(cache.key(tenant="a", model="m", version="1", payload=i), b"x" * 100, ttl_s=0.1)
    time.sleep(0.2)
    cache.put(cache.key(tenant="b", model="m", version="1", payload=0), b"y")
    assert usage(redis_client, cache.meta, "a") == {"entries": 0, "bytes": 0}


def test_semantic_flood_of_scopes_evicts_only_the_flooders_entries(redis_client: redis.Redis) -> None:
    rng = np.random.default_rng(1)
    cache = SemanticCache(redis_client, threshold=0.9, mode="static", max_entries=200, max_bytes=1 << 20,
                          tenant_max_entries=50, tenant_max_bytes=100_000)
    b_scope = scope(tenant="b")
    b_vecs = _unit(rng, 5)
    for i, v in enumerate(b_vecs):
        cache.store(b_scope, f"b{i}", v, f"answer {i}")
    # tenant a: every request its own scope (a new conversation), as a flood would send them
    for i, v in enumerate(_unit(rng, 400)):
        cache.store(scope(tenant="a", context={"turn": i}), f"a{i}", v, "a" * 200)
        a = usage(redis_client, BUDGET_PREFIX, "a")
        assert a["entries"] <= 50 and a["bytes"] <= 100_000
    for i, v in enumerate(b_vecs):
        hit = cache.lookup(b_scope, f"b{i}", v)
        assert hit is not None and hit.response == f"answer {i}"
    assert cache.lookup(scope(tenant="a", context={"turn": 0}), "a0", _unit(np.random.default_rng(1), 6)[5]) is None
    total = usage(redis_client, BUDGET_PREFIX)
    assert total["entries"] == 55 == sum(1 for _ in redis_client.scan_iter(match="sem.[^_]*:e:*"))
    # every evicted scope's index went with its last entry: no per-scope keys pile up
    assert sum(1 for _ in redis_client.scan_iter(match="sem.{a}:*:lfu")) == 50


def test_semantic_global_budget_shared_max_min(redis_client: redis.Redis) -> None:
    rng = np.random.default_rng(2)
    cache = SemanticCache(redis_client, threshold=0.9, mode="static", max_entries=60, max_bytes=1 << 20)
    b_scope = scope(tenant="b")
    b_vecs = _unit(rng, 10)
    for i, v in enumerate(b_vecs):
        cache.store(b_scope, f"b{i}", v, "b")
    for i, v in enumerate(_unit(rng, 300)):
        cache.store(scope(tenant="a", context={"turn": i}), f"a{i}", v, "a")
        assert usage(redis_client, BUDGET_PREFIX)["entries"] <= 60
    assert usage(redis_client, BUDGET_PREFIX, "a")["entries"] == 50
    assert all(cache.lookup(b_scope, f"b{i}", v) is not None for i, v in enumerate(b_vecs))
    assert cache.delete_tenant("a") > 0
    assert usage(redis_client, BUDGET_PREFIX) == usage(redis_client, BUDGET_PREFIX, "b")


def test_semantic_hits_rank_entries_across_the_tenants_scopes(redis_client: redis.Redis) -> None:
    rng = np.random.default_rng(3)
    cache = SemanticCache(redis_client, threshold=0.9, mode="static", tenant_max_entries=5)
    vecs = _unit(rng, 20)
    popular = scope(tenant="a", context="popular")
    cache.store(popular, "p", vecs[0], "p")
    assert cache.lookup(popular, "p", vecs[0]) is not None  # one hit: outlives zero-hit entries
    for i in range(1, 20):
        cache.store(scope(tenant="a", context=i), f"q{i}", vecs[i], "q")
    assert cache.lookup(popular, "p", vecs[0]) is not None


def test_mirror_cap_drops_least_recently_used_scopes_and_reloads(redis_client: redis.Redis) -> None:
    rng = np.random.default_rng(4)
    cache = SemanticCache(redis_client, threshold=0.9, mode="static", mirror_max_entries=20)
    vecs = _unit(rng, 100)
    for i in range(100):
        cache.store(scope(tenant="a", context=i % 25), f"q{i}", vecs[i], f"a{i}")
        assert cache.mirror.usage.entries <= 20
    assert cache.mirror.evicted_scopes > 0
    assert cache.mirror.usage.entries == sum(len(ix.ids) for ix in cache.mirror.scopes.values())
    assert cache.mirror.usage.bytes == sum(ix.nbytes for ix in cache.mirror.scopes.values())
    # the oldest scope was dropped from the mirror, not from Redis: it reloads and answers
    assert cache.mirror.get(scope(tenant="a", context=0)) is None
    hit = cache.lookup(scope(tenant="a", context=0), "q0", vecs[0])
    assert hit is not None and hit.response == "a0"
    assert cache.mirror.usage.entries <= 20


def test_mirror_sweep_drops_entries_whose_ttl_passed(redis_client: redis.Redis) -> None:
    rng = np.random.default_rng(5)
    cache = SemanticCache(redis_client, threshold=0.9, mode="static", ttl_s=0.5)
    vecs = _unit(rng, 30)
    for i in range(30):
        cache.store(scope(tenant="a", context=i % 3), f"q{i}", vecs[i], "a")
    assert cache.mirror.usage.entries == 30
    assert cache.mirror.sweep_expired() == 0  # nothing expired yet
    time.sleep(0.6)
    dropped = sum(cache.mirror.sweep_expired(limit=7) for _ in range(10))  # bounded work per sweep
    assert dropped == 30 and cache.mirror.usage.entries == 0
    assert cache.mirror.sweep_expired() == 0 and not cache.mirror.scopes  # empty scopes went too
    # the background thread does the same by itself
    cache.store(scope(tenant="a"), "late", vecs[0], "a")
    cache.start_background_sync(interval_s=0.05)
    try:
        deadline = time.monotonic() + 5
        while cache.mirror.usage.entries and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cache.mirror.usage.entries == 0
    finally:
        cache.close()


def test_the_ledger_is_rebuilt_from_the_tenants_books(redis_client: redis.Redis) -> None:
    """A crash between a tenant's script and its ledger call leaves the ledger off: rebuild."""
    cache = ResultCache(redis_client, max_bytes=1 << 20)
    for tenant in ("a", "b"):
        for i in range(5):
            cache.put(cache.key(tenant=tenant, model="m", version="1", payload=i), b"x" * 100)
    truth = usage(redis_client, cache.meta)
    redis_client.delete(*cache.books.ledger[:3])  # one slot: a multi-key DEL is fine on a cluster
    redis_client.set(cache._bytes_key, 7)
    cache.books.rebuild(["a", "b"])
    assert usage(redis_client, cache.meta) == truth == {"entries": 10, "bytes": _real_bytes(redis_client, cache)}
    assert usage(redis_client, cache.meta, "a")["entries"] == 5


def _lost_answer(*args: object, **kwargs: object) -> None:
    """A ledger call whose answer never came back (a slow Redis: the client timed out)."""
    raise redis.TimeoutError("Timeout reading from socket")


def test_a_report_that_never_reached_the_ledger_is_made_good_by_the_tenants_next_one(
        redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store script ran on the tenant's slot, the client timed out before the ledger call:
    the ledger is behind by that store until the tenant's next report, not for good."""
    cache = ResultCache(redis_client, max_bytes=1 << 20, retry_after_s=0)
    cache.put(cache.key(tenant="b", model="m", version="1", payload=0), b"y" * 50)
    with monkeypatch.context() as patch:
        patch.setattr(cache.books, "_ledger", _lost_answer)
        with pytest.raises(RedisUnavailable):
            cache.put(cache.key(tenant="a", model="m", version="1", payload=0), b"x" * 100)
    assert usage(redis_client, cache.meta, "a")["entries"] == 1  # stored on the tenant's slot ...
    assert usage(redis_client, cache.meta)["entries"] == 1  # ... and missing from the ledger
    cache.put(cache.key(tenant="a", model="m", version="1", payload=1), b"x" * 100)
    assert usage(redis_client, cache.meta) == {"entries": 3, "bytes": _real_bytes(redis_client, cache)}


def test_a_late_report_older_than_the_ledgers_row_changes_nothing(redis_client: redis.Redis) -> None:
    """Two replicas storing for one tenant at once: their ledger calls may arrive in either order."""
    cache = ResultCache(redis_client, max_bytes=1 << 20)
    first = Report.of(cache._put(keys=[*cache.books.keys("a"), cache.key(tenant="a", model="m", version="1",
                                                                          payload=0)],
                                 args=[b"x" * 100, 60_000, int(time.time() * 1000), RECLAIM_PER_PUT, -1, -1,
                                       KEY_COPIES, ENTRY_OVERHEAD_BYTES]))
    cache.put(cache.key(tenant="a", model="m", version="1", payload=1), b"x" * 100)  # its report lands first
    truth = {"entries": 2, "bytes": _real_bytes(redis_client, cache)}
    assert usage(redis_client, cache.meta) == truth
    cache.books.settle("a", first)  # the older report, late
    assert first.entries == 1 and usage(redis_client, cache.meta) == truth


def test_a_semantic_store_whose_ledger_call_was_lost_heals_with_the_next(
        redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    cache = SemanticCache(redis_client, threshold=0.9, mode="static", max_entries=100, max_bytes=1 << 20)
    cache.guard.retry_after_s = 0  # the lost answer must not hold the next store back
    vecs = _unit(rng, 3)
    with monkeypatch.context() as patch:
        patch.setattr(cache.redis_store.books, "_ledger", _lost_answer)
        with pytest.raises(RedisUnavailable):
            cache.store(scope(tenant="a"), "q0", vecs[0], "a0")
    assert usage(redis_client, BUDGET_PREFIX, "a")["entries"] == 1
    assert usage(redis_client, BUDGET_PREFIX)["entries"] == 0
    cache.store(scope(tenant="a"), "q1", vecs[1], "a1")
    cache.store(scope(tenant="b"), "q2", vecs[2], "b2")
    books = [usage(redis_client, BUDGET_PREFIX, t) for t in ("a", "b")]
    assert usage(redis_client, BUDGET_PREFIX) == {"entries": 3, "bytes": sum(b["bytes"] for b in books)}
