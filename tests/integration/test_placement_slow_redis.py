"""The shared placement sketch counts each read at most once when Redis is slow, and still counts
the reads it could not send when Redis is down (SharedWTinyLFU: `pending`, `never_sent`).

A slow server is not a dead one: a command sent during a stall runs once the stall ends, but the
client has given up on its reply (the RAM tier's socket timeout). Buffering such a read for a
later flush counted it twice (once by the call that ran, once by the flush): keys read during a
slow spell then won admission duels against hotter keys. The stalls here are DEBUG SLEEP from a
second connection while the tier's pooled connection is warm, so the tier's command is really
written to the socket (CLIENT PAUSE, or a cold connection whose handshake times out first, never
send it). Real Redis: single server and cluster; the server-stopped case on a server of its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from caches.admission import SharedWTinyLFU, WTinyLFUConfig
from caches.admission.shared import SKETCH
from caches.redis_client import RETRY_AFTER_S, SOCKET_TIMEOUT_S, is_cluster
from caches.redis_server import EmbeddedRedis
from caches.tiers.base import TierUnavailable
from caches.tiers.redis import RedisTier
from tests.integration.test_tiered_cache import open_cache, source_for
from tests.slow_redis import stalled

ENTRY = 120
BUDGET = 10**7  # places everything: only the counts matter here
KEYS = [f"user:{i}" for i in range(20)]
# A stall comfortably past the tier's socket timeout: the tier gives up on its reply well before
# the server runs the command (no timing is asserted, only this ordering).
STALL_S = SOCKET_TIMEOUT_S + 1.0
# The tier's breaker held open this long after a failure, so every read of an "outage" phase
# surely finds it open, however slowly this machine schedules the test.
BREAKER_OPEN_S = STALL_S + 1.0
OUTAGE_READS = 2  # reads while the breaker is open
SLOW_READS = 2  # reads each during a stall of its own
GROUPS = 8  # hash-tag groups of the multi-node case: spread over the cluster's masters


@pytest.fixture
def redis_url(both_redis_urls: str) -> str:
    return both_redis_urls


def _policy(url: str, prefix: str) -> SharedWTinyLFU:
    """One group (shards=1), so a cluster keeps every key of the test on one node."""
    policy = SharedWTinyLFU(RedisTier(url, shards=1), WTinyLFUConfig(BUDGET, entry_bytes=ENTRY), prefix=prefix)
    policy.lookup(policy.tier, ["warm-up"])  # loads the record script: a stalled call can then run
    return policy


def _server_of(policy: SharedWTinyLFU) -> tuple[str, int]:
    """Host and port of the server holding the policy's state (and its one group's values)."""
    client = policy.tier.client
    if is_cluster(client):
        node = client.get_node_from_key(policy.key[SKETCH])
        return str(node.host), int(node.port)
    kw = client.connection_pool.connection_kwargs
    return str(kw["host"]), int(kw["port"])


@contextmanager
def _stalled(policy: SharedWTinyLFU) -> Iterator[None]:
    """The server of the policy's state stalled by DEBUG SLEEP while the block runs; the tier's
    connection to it is warmed first (a call that needs no flush), so its next command is sent."""
    policy.estimate("warm-up")
    with _stalled_server(policy, *_server_of(policy)):
        yield


@contextmanager
def _stalled_server(policy: SharedWTinyLFU, host: str, port: int, seconds: float = STALL_S) -> Iterator[None]:
    """One server stalled by DEBUG SLEEP for `seconds` while the block runs (tests/slow_redis.py);
    on leaving, the stall is over and the tier's breaker closed again."""
    with stalled(host, port, seconds):
        yield
    _wait_available(policy)


def _wait_available(policy: SharedWTinyLFU) -> None:
    deadline = time.monotonic() + BREAKER_OPEN_S + 10
    while not policy.tier.available:
        assert time.monotonic() < deadline, "the breaker never closed"
        time.sleep(0.05)


def _read(policy: SharedWTinyLFU, keys: list[str]) -> bool:
    """One read of `keys` through the policy (the cache's fused RAM read); False if it failed."""
    try:
        policy.lookup(policy.tier, keys)
    except TierUnavailable:
        return False
    return True


def _read_during_outage(policy: SharedWTinyLFU, reads: int) -> None:
    """`reads` reads while the tier's breaker is open: a real failure (a read of the sketch that
    times out on the stalled server) opens it, for BREAKER_OPEN_S. None of them is sent."""
    policy.tier.breaker.retry_after_s = BREAKER_OPEN_S
    try:
        with _stalled(policy):
            with pytest.raises(TierUnavailable):
                policy.estimate("warm-up")  # the failure that opens the breaker (read-only)
            for _ in range(reads):
                assert not _read(policy, KEYS)
    finally:
        policy.tier.breaker.retry_after_s = RETRY_AFTER_S


def _estimates(policy: SharedWTinyLFU) -> dict[str, int]:
    assert _read(policy, ["unrelated"])  # a healthy call flushes what is buffered
    assert not policy.pending
    return {k: policy.estimate(k) for k in KEYS}


def test_reads_during_a_slow_spell_are_counted_at_most_once(redis_client: redis.Redis, redis_url: str) -> None:
    """Each read's record script is sent, runs after the stall, and its reply is lost: counted
    once by the script, and not buffered again (the reviewer's case counted each such read twice)."""
    policy = _policy(redis_url, "test:slow")
    for _ in range(SLOW_READS):
        with _stalled(policy):
            assert not _read(policy, KEYS)  # times out: the server runs it later
    estimates = _estimates(policy)
    assert all(n <= SLOW_READS for n in estimates.values()), estimates


def test_outage_counts_flushed_during_a_slow_spell_are_not_counted_twice(
    redis_client: redis.Redis, redis_url: str
) -> None:
    """Counts buffered during an outage are flushed by the next call, and that flush's reply is
    lost to a stall: they may have run, so they are not kept for another flush."""
    policy = _policy(redis_url, "test:slowflush")
    _read_during_outage(policy, OUTAGE_READS)
    assert all(policy.pending[k] == OUTAGE_READS for k in KEYS)
    with _stalled(policy):
        assert not _read(policy, KEYS)  # its flush is sent, runs after the stall, reply lost
    estimates = _estimates(policy)
    assert all(n <= OUTAGE_READS + 1 for n in estimates.values()), estimates


def test_reads_while_the_breaker_is_open_count_once_when_redis_answers_again(
    redis_client: redis.Redis, redis_url: str
) -> None:
    """A read the breaker skipped never reached Redis: it counts once, when Redis answers again."""
    policy = _policy(redis_url, "test:breaker")
    _read_during_outage(policy, OUTAGE_READS)
    assert _estimates(policy) == dict.fromkeys(KEYS, OUTAGE_READS)


def test_reads_while_redis_is_stopped_count_once_when_it_restarts() -> None:
    """A stopped server refuses the connection (nothing sent), then the breaker skips the reads
    for a while, then the connection is refused again: every read counts once after the restart
    (on an empty server: the restart lost the sketch, the outage's reads are all it holds)."""
    server = EmbeddedRedis().start()
    try:
        policy = _policy(server.url, "test:stopped")
        server.stop()
        assert not _read(policy, KEYS)  # refused: opens the breaker
        assert not _read(policy, KEYS)  # skipped by the breaker
        _wait_available(policy)
        assert not _read(policy, KEYS)  # refused again
        server.start()
        _wait_available(policy)
        assert _estimates(policy) == dict.fromkeys(KEYS, 3)
    finally:
        server.stop()


@pytest.mark.parametrize("both_redis_urls", ["cluster"], indirect=True)
def test_a_slow_cluster_node_leaves_the_other_nodes_reads_counted_once(
    redis_client: redis.Redis, redis_url: str
) -> None:
    """Hash-tag groups over several masters: a lookup runs one batch per node, in turn. When one
    node's batch times out, the batches before it have run and those after it were never sent:
    each of those reads counts exactly once (the latter when the next call flushes them), and
    the slow node's at most once."""
    tier = RedisTier(redis_url, shards=GROUPS)
    policy = SharedWTinyLFU(tier, WTinyLFUConfig(BUDGET, entry_bytes=ENTRY), prefix="test:nodes")
    node_of = {k: tier.client.get_node_from_key(tier.physical(k)) for k in KEYS}
    assert len({n.name for n in node_of.values()}) > 1  # the test needs groups on several nodes
    slow = node_of[KEYS[0]]
    assert _read(policy, KEYS)  # one healthy read: loads the script and warms every node's pool
    with _stalled_server(policy, slow.host, slow.port):
        assert not _read(policy, KEYS)
    estimates = _estimates(policy)
    assert all(n <= 2 for n in estimates.values()), estimates
    others = {k: n for k, n in estimates.items() if node_of[k].name != slow.name}
    assert others == dict.fromkeys(others, 2)



def test_a_read_through_the_tiered_cache_counts_once_slow_or_down(redis_url: str, tmp_path: Path) -> None:
    """TieredCache's fused RAM read: when the policy's lookup raised (its script ran and the reply
    was lost, or Redis was down and it buffered the reads), the cache recorded the same reads again
    through `record`, which found the breaker open and buffered them a second time (estimate 2
    after one read)."""
    keys = [f"t:m:1:{i}" for i in range(5)]
    cache = open_cache(redis_url, tmp_path / "ssd", cold=source_for([*keys, "t:m:1:x"]), invalidation=False,
                       maintain_every_s=None, ram=BUDGET)
    policy = cache.policy
    assert isinstance(policy, SharedWTinyLFU)
    try:
        cache.get_many(["t:m:1:x"])  # scripts loaded, connections warm
        with _stalled_server(policy, *_server_of(policy)):
            assert cache.get_many(keys).degraded
        cache.get_many(["t:m:1:x"])  # anything buffered is flushed with the next read
        assert all(policy.estimate(k) <= 1 for k in keys)  # counted at most once (2 before)
    finally:
        cache.close()
