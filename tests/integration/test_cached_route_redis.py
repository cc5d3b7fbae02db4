"""The shared cached flow against a real Redis: an error that is not a lost connection is a bypass."""

from __future__ import annotations

import asyncio

import pytest
import redis

from caches.result import ResultCache
from deployments.cached_route import exact_get, exact_put


@pytest.fixture
def redis_url(both_redis_urls: str) -> str:
    """Every test here that uses Redis runs on the single server and on the 3-master cluster."""
    return both_redis_urls


def test_a_redis_script_error_is_a_bypass_not_an_exception(redis_client: redis.Redis) -> None:
    cache = ResultCache(redis_client)
    key = cache.key(tenant="t", model="m", version="1", payload="wrongtype")
    redis_client.delete(key)
    redis_client.hset(key, "x", "1")  # the Lua GET meets a hash: WRONGTYPE, a ResponseError
    try:
        assert asyncio.run(exact_get(cache, key)) == (None, False)
    finally:
        redis_client.delete(key)
    assert asyncio.run(exact_put(cache, key, b"answer")) is True
    assert asyncio.run(exact_get(cache, key)) == (b"answer", True)
    redis_client.delete(key)
