"""The clients the app builds fail fast and never re-send a command on their own, on a Redis that
is slow rather than dead (single server and cluster). A command whose reply was lost to the
client's timeout may still have run: re-sent, a write runs twice (a counter moved by 2, a lease
taken by its own retry), and a 0.5 s timeout turns into seconds before the breaker hears of it.
redis-py's cluster clients re-send timed-out commands by default."""

from __future__ import annotations

import asyncio

import pytest
import redis

from caches.redis_client import REDIS_ERRORS, make_async_client, make_client
from tests.slow_redis import node_of, stalled

# Longer than the clients' timeout below, long enough that a re-sent command lands within it.
STALL_S = 1.5
TIMEOUT_S = 0.5
KEY = "probe:n"


@pytest.fixture
def redis_url(both_redis_urls: str) -> str:
    return both_redis_urls


def test_a_write_whose_reply_was_lost_ran_once(redis_url: str, redis_client: redis.Redis) -> None:
    client = make_client(redis_url, socket_timeout_s=TIMEOUT_S, connect_timeout_s=TIMEOUT_S)
    client.set(KEY, 0)  # a warm connection: the INCR below is sent, then its reply is lost
    with stalled(*node_of(redis_client, redis_url, KEY), STALL_S), pytest.raises(REDIS_ERRORS):
        client.incr(KEY)
    assert int(redis_client.get(KEY) or 0) <= 1  # re-sent, it ran 2 or 3 times


def test_the_async_client_never_re_sends_either(redis_url: str, redis_client: redis.Redis) -> None:
    async def run() -> None:
        client = make_async_client(redis_url, socket_timeout_s=TIMEOUT_S, connect_timeout_s=TIMEOUT_S)
        try:
            await client.set(KEY, 0)
            with stalled(*node_of(redis_client, redis_url, KEY), STALL_S), pytest.raises(REDIS_ERRORS):
                await client.incr(KEY)
        finally:
            await client.aclose()

    asyncio.run(run())
    assert int(redis_client.get(KEY) or 0) <= 1
