"""The clients the app builds fail fast and never re-send a command on their own, on a Redis that
is slow rather than dead (single server and cluster). A command whose reply was lost to the
client's timeout may still have run: re-sent, a write runs twice (a counter moved by 2, a lease
taken by its own retry), and a 0.5 s timeout turns into seconds before the breaker hears of it.
redis-py's cluster clients re-send timed-out commands by default."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest
import redis

from caches.redis_client import REDIS_ERRORS, is_cluster, make_async_client, make_client

# Longer than the clients' timeout below, short enough that a re-sent command lands within it.
STALL_S = 1.2
TIMEOUT_S = 0.5
KEY = "probe:n"


@pytest.fixture
def redis_url(both_redis_urls: str) -> str:
    return both_redis_urls


def _port_of(client: redis.Redis, url: str) -> int:
    """The port of the server that holds KEY (its node on a cluster)."""
    if is_cluster(client):
        return int(client.get_node_from_key(KEY).port)  # type: ignore[attr-defined]
    return int(urlparse(url).port or 6379)


@pytest.fixture
def stall(redis_url: str, redis_client: redis.Redis) -> Iterator[threading.Thread]:
    """A thread that, once started, makes KEY's server sleep STALL_S (DEBUG SLEEP): commands sent
    meanwhile run after it, when their client may have given up."""
    port = _port_of(redis_client, redis_url)
    sleeper = redis.Redis(port=port, socket_timeout=STALL_S + 10)
    thread = threading.Thread(target=sleeper.execute_command, args=("DEBUG", "SLEEP", str(STALL_S)), daemon=True)
    yield thread
    thread.join()
    sleeper.close()


def _start(thread: threading.Thread) -> None:
    thread.start()
    threading.Event().wait(0.05)  # the sleep has begun


def test_a_write_whose_reply_was_lost_ran_once(redis_url: str, redis_client: redis.Redis,
                                               stall: threading.Thread) -> None:
    client = make_client(redis_url, socket_timeout_s=TIMEOUT_S, connect_timeout_s=TIMEOUT_S)
    client.set(KEY, 0)  # a warm connection: the INCR below is sent, then its reply is lost
    _start(stall)
    with pytest.raises(REDIS_ERRORS):
        client.incr(KEY)
    stall.join()
    assert int(redis_client.get(KEY) or 0) <= 1  # re-sent, it ran 2 or 3 times


def test_the_async_client_never_re_sends_either(redis_url: str, redis_client: redis.Redis,
                                               stall: threading.Thread) -> None:
    async def run() -> None:
        client = make_async_client(redis_url, socket_timeout_s=TIMEOUT_S, connect_timeout_s=TIMEOUT_S)
        try:
            await client.set(KEY, 0)
            _start(stall)
            with pytest.raises(REDIS_ERRORS):
                await client.incr(KEY)
        finally:
            await client.aclose()

    asyncio.run(run())
    stall.join()
    assert int(redis_client.get(KEY) or 0) <= 1
