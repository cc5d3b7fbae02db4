"""Exact result cache against a real Redis: hits, TTL, byte budget, purges, Redis down and back."""

from __future__ import annotations

import time

import pytest
import redis

from caches.redis_server import EmbeddedRedis, free_port
from caches.result import CacheUnavailable, ResultCache
from tests.support import chat_key


@pytest.fixture
def redis_url(both_redis_urls: str) -> str:
    """Every test here that uses Redis runs on the single server and on the 3-master cluster."""
    return both_redis_urls


REQ = {"messages": [{"role": "user", "content": "What is the PTO policy?"}], "temperature": 0}


def test_exact_hit_and_exact_means_exact(redis_client: redis.Redis) -> None:
    cache = ResultCache(redis_client)
    key = chat_key(tenant="a", model="m", version="1", request=REQ)
    assert cache.get(key) is None
    cache.put(key, b"20 days")
    # the same request sent differently (key order, streaming, a user id) is the same entry
    # (0 and 0.0 are two keys here: the app's schema makes every temperature a float first)
    same = {"stream": True, "user": "u1", "temperature": 0, "messages": REQ["messages"]}
    assert cache.get(chat_key(tenant="a", model="m", version="1", request=same)) == b"20 days"
    # a differently written question is not (that is the semantic layer's job)
    other = {**REQ, "messages": [{"role": "user", "content": " what is the  PTO policy?"}]}
    assert cache.get(chat_key(tenant="a", model="m", version="1", request=other)) is None
    stats = cache.stats()
    assert stats["hits"] == 1 and stats["misses"] == 2 and stats["entries"] == 1
    assert stats["by_tenant"]["a"] == {"hits": 1, "misses": 2}


def test_tenant_isolation(redis_client: redis.Redis) -> None:
    cache = ResultCache(redis_client)
    cache.put(chat_key(tenant="a", model="m", version="1", request=REQ), b"answer for a")
    assert cache.get(chat_key(tenant="b", model="m", version="1", request=REQ)) is None


def test_ttl(redis_client: redis.Redis) -> None:
    cache = ResultCache(redis_client)
    key = chat_key(tenant="a", model="m", version="1", request=REQ)
    cache.put(key, b"x", ttl_s=0.2)
    assert cache.get(key) == b"x"
    time.sleep(0.3)
    assert cache.get(key) is None


def test_byte_budget_evicts_and_refuses(redis_client: redis.Redis) -> None:
    cache = ResultCache(redis_client, max_bytes=5_000, max_value_bytes=2_000)
    keys = [cache.key(tenant="a", model="m", version="1", payload={"i": i}) for i in range(40)]
    for k in keys:
        cache.put(k, b"v" * 400)
        assert int(redis_client.get(cache._bytes_key)) <= 5_000  # the global ledger
    assert cache.get(keys[-1]) is not None  # the newest survive
    assert cache.get(keys[0]) is None  # the oldest were evicted
    stats = cache.stats()
    assert stats["bytes"] <= 5_000 and stats["evictions"] > 0
    real = sum(cache.entry_size(k, v) for k in keys if (v := redis_client.get(k)) is not None)
    assert real == stats["bytes"]  # the bookkeeping matches what Redis holds
    big = cache.key(tenant="a", model="m", version="1", payload="big")
    cache.put(big, b"x" * 3_000)  # over max_value_bytes: refused, nothing evicted for it
    assert cache.get(big) is None and cache.local["refused"] == 1


def test_delete_model_version_across_tenants(redis_client: redis.Redis) -> None:
    cache = ResultCache(redis_client)
    for tenant in ("a", "b"):
        for version in ("1", "2"):
            cache.put(chat_key(tenant=tenant, model="m", version=version, request=REQ), b"x")
    cache.put(chat_key(tenant="a", model="m1", version="1", request=REQ), b"other model")
    assert cache.delete_model_version("m", "1") == 2
    assert cache.get(chat_key(tenant="a", model="m", version="1", request=REQ)) is None
    assert cache.get(chat_key(tenant="b", model="m", version="2", request=REQ)) == b"x"
    assert cache.get(chat_key(tenant="a", model="m1", version="1", request=REQ)) == b"other model"
    assert cache.stats()["entries"] == 3
    assert cache.delete_prefix(cache.namespace("b") + ":") == 1  # res.{b}: the tenant is the hash tag


def test_redis_down_and_back() -> None:
    port = free_port()
    server = EmbeddedRedis(port=port).start()
    try:
        client = redis.Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=1)
        cache = ResultCache(client, retry_after_s=0.2)
        key = chat_key(tenant="a", model="m", version="1", request=REQ)
        cache.put(key, b"x")
        server.stop()
        with pytest.raises(CacheUnavailable):
            cache.get(key)
        with pytest.raises(CacheUnavailable):  # fails fast while backing off
            cache.put(key, b"y")
        assert cache.stats()["available"] is False
        server = EmbeddedRedis(port=port, workdir=server.workdir).start()
        time.sleep(0.25)
        assert cache.get(key) is None  # no persistence: empty, but working again
        cache.put(key, b"z")
        assert cache.get(key) == b"z"
    finally:
        server.stop()
