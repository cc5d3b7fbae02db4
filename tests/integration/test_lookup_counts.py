"""Lookup counts shared by Ingress replicas (caches/lookup_counts.py) on a real Redis: two
replicas' counts add up on either one's page, nothing is lost while Redis is down, and nothing is
counted twice while it is slow (a flush that ran, its reply lost, is sent again)."""

from __future__ import annotations

import threading

import pytest
import redis

from caches.lookup_counts import LOOKUPS_KEY, SharedLookupCounts
from caches.redis_client import make_client
from caches.redis_server import EmbeddedRedis, free_port
from tests.slow_redis import node_of, stalled

# The Ingress's own Redis timeout (deployments/ingress.py), and a stall well past it: a flush sent
# during the stall runs on the server after its client gave up on the reply.
SLOW_CLIENT_TIMEOUT_S = 0.5
STALL_S = 1.5
SLOW_TICKS = 3
HITS = '["exact","acme","hit"]'  # the hash field of ("exact", "acme", "hit")


@pytest.fixture
def redis_url(both_redis_urls: str) -> str:
    """On the single server and on the 3-master cluster."""
    return both_redis_urls


def test_two_replicas_counts_add_up_on_either_replicas_page(redis_client: redis.Redis, redis_url: str) -> None:
    a = SharedLookupCounts(make_client(redis_url), flush_interval_s=None)
    b = SharedLookupCounts(make_client(redis_url), flush_interval_s=None)
    for _ in range(3):
        a.add("exact", "acme", "hit")
    b.add("exact", "acme", "hit")
    b.add("exact", "acme", "miss")
    b.add("semantic", "globex", "hit")
    # flushed by one replica, still pending on the other: each page has both
    assert a.flush()
    assert a.snapshot()["exact"]["acme"] == {"hit": 3.0}
    assert b.snapshot() == {"exact": {"acme": {"hit": 4.0, "miss": 1.0}}, "semantic": {"globex": {"hit": 1.0}}}
    assert b.flush()
    assert a.snapshot() == b.snapshot() == {"exact": {"acme": {"hit": 4.0, "miss": 1.0}},
                                            "semantic": {"globex": {"hit": 1.0}}}
    assert b.flush() and a.snapshot()["exact"]["acme"]["hit"] == 4.0  # nothing flushed twice


def test_tenant_names_with_any_character_stay_apart(redis_client: redis.Redis, redis_url: str) -> None:
    counts = SharedLookupCounts(make_client(redis_url), flush_interval_s=None)
    odd = ['a:b', 'a"b', "a,b", "a\\b", "ä b"]
    for t in odd:
        counts.add("exact", t, "hit")
    counts.add("exact", "a", "b:hit")  # would read as tenant "a:b" with a ':'-joined field
    assert counts.flush()
    seen = counts.snapshot()["exact"]
    assert {t: seen[t] for t in odd} == {t: {"hit": 1.0} for t in odd}
    assert seen["a"] == {"b:hit": 1.0}
    redis_client.hset(LOOKUPS_KEY, "not json", 5)  # a hand-written field is skipped, not a failure
    assert counts.snapshot()["exact"]["a"] == {"b:hit": 1.0}


def test_the_background_flush_needs_no_caller(redis_client: redis.Redis, redis_url: str) -> None:
    writer = SharedLookupCounts(make_client(redis_url), flush_interval_s=0.05)
    reader = SharedLookupCounts(make_client(redis_url), flush_interval_s=None)
    try:
        writer.add("exact", "acme", "hit", n=2)
        done = threading.Event()
        for _ in range(100):
            if reader.snapshot().get("exact", {}).get("acme") == {"hit": 2.0}:
                done.set()
                break
            done.wait(0.05)
        assert done.is_set(), reader.snapshot()
    finally:
        writer.close()


def test_counts_made_while_redis_is_down_arrive_when_it_is_back() -> None:
    port = free_port()
    server = EmbeddedRedis(port=port).start()
    try:
        client = redis.Redis.from_url(server.url, socket_connect_timeout=0.5, socket_timeout=0.5)
        counts = SharedLookupCounts(client, flush_interval_s=None)
        counts.add("exact", "acme", "hit")
        assert counts.flush()
        server.stop()
        counts.add("exact", "acme", "miss")
        assert not counts.flush()  # refused: kept, never dropped
        with pytest.raises(redis.ConnectionError):
            counts.snapshot()  # the caller says "this replica" rather than show a part as the whole
        counts.add("exact", "acme", "miss")
        server = EmbeddedRedis(port=port, workdir=server.workdir).start()
        assert counts.flush()
        # no persistence: the restart lost the flushed hit, never the two misses made meanwhile
        assert counts.snapshot() == {"exact": {"acme": {"miss": 2.0}}}
    finally:
        server.stop()


def _slow_client(redis_url: str) -> redis.Redis:
    return make_client(redis_url, socket_timeout_s=SLOW_CLIENT_TIMEOUT_S, connect_timeout_s=SLOW_CLIENT_TIMEOUT_S)


def _flush_during_a_stall(counts: SharedLookupCounts, node: tuple[str, int]) -> bool:
    counts.client.hlen(LOOKUPS_KEY)  # a warm pooled connection, as between the app's ticks
    with stalled(*node, STALL_S):
        return counts.flush()


def test_a_batch_whose_reply_was_lost_is_counted_once_however_often_it_is_sent(
    redis_client: redis.Redis, redis_url: str
) -> None:
    """Slow, not dead: every tick's flush runs on the server and its reply is lost. The batch is
    sent again each tick (it may not have run) and must count once; lookups made meanwhile are a
    batch of their own, counted once too."""
    counts = SharedLookupCounts(_slow_client(redis_url), flush_interval_s=None)
    node = node_of(redis_client, redis_url, LOOKUPS_KEY)
    counts.add("exact", "acme", "miss")
    assert counts.flush()  # Redis has the flush script now: a copy sent during a stall runs after it
    counts.add("exact", "acme", "hit", n=10)
    for tick in range(SLOW_TICKS):
        assert not _flush_during_a_stall(counts, node), f"tick {tick}: the stall did not hold the reply"
        counts.add("exact", "acme", "hit")  # lookups go on meanwhile
    assert int(redis_client.hget(LOOKUPS_KEY, HITS) or 0) == 10  # ran once, every later copy added nothing
    assert counts.flush()  # answered at last: the same batch, still nothing added
    assert int(redis_client.hget(LOOKUPS_KEY, HITS) or 0) == 10
    assert counts.flush()  # then the lookups made meanwhile
    assert counts.snapshot() == {"exact": {"acme": {"hit": 10.0 + SLOW_TICKS, "miss": 1.0}}}
    assert not counts.pending() and counts.flush()
    assert int(redis_client.hget(LOOKUPS_KEY, HITS) or 0) == 10 + SLOW_TICKS


def test_the_page_counts_a_batch_whose_reply_was_lost_once(redis_client: redis.Redis, redis_url: str) -> None:
    """Between the lost reply and the next flush the batch is both in Redis and unanswered here:
    the page counts it once (its marker says it landed), and it is never sent again."""
    counts = SharedLookupCounts(_slow_client(redis_url), flush_interval_s=None)
    node = node_of(redis_client, redis_url, LOOKUPS_KEY)
    counts.add("exact", "acme", "miss")
    assert counts.flush()
    counts.add("exact", "acme", "hit", n=10)
    assert not _flush_during_a_stall(counts, node)
    counts.add("exact", "acme", "hit")
    assert counts.snapshot() == {"exact": {"acme": {"hit": 11.0, "miss": 1.0}}}
    assert counts.pending() == {("exact", "acme", "hit"): 1}  # the batch is answered: the page saw it land
    assert counts.flush()
    assert int(redis_client.hget(LOOKUPS_KEY, HITS) or 0) == 11
    assert counts.snapshot() == {"exact": {"acme": {"hit": 11.0, "miss": 1.0}}}
