"""One home for Redis plumbing: the client factory, the error classification, the breaker.

Why one place: every cache talks to Redis, and each used to decide on its own which errors mean
"Redis is not usable right now". They disagreed, and what none of them caught (OOM, BUSY, a Lua
script error such as `too many results to unpack`) escaped as a 500. Here:
- `make_client`: short socket and connect timeouts, no retries inside the client (every caller
  has a better fallback than waiting: the next tier, the model, a degraded answer).
- `REDIS_ERRORS`: everything a Redis call can raise (`redis.RedisError`, plus the OS-level errors
  a broken socket raises before redis-py wraps them).
- `RedisUnavailable`: the single exception callers catch. It is a `TierUnavailable` (the tiered
  caches' contract), and `caches.result.CacheUnavailable` is the same class under its old name.
- `Breaker`: after a failure that says the server is unwell (connection, timeout, BUSY, OOM,
  LOADING, READONLY), skip Redis for `RETRY_AFTER_S`, so a dead server costs one refused connect
  per interval, not one per request. An error about one command (WRONGTYPE, a script error) does
  not open it: it says nothing about the next command. Every cache (tiers, exact results,
  semantic, versions) runs its Redis calls through one of these.

Redis Cluster: a URL with the scheme ``redis+cluster://`` (or ``rediss+cluster://``) names a
cluster (any one node's address: the client discovers the rest), and ``make_client`` returns a
``redis.cluster.RedisCluster`` with the same timeouts and no retries (the cluster client still
follows MOVED/ASK redirections, which are not retries of a failure). A scheme, not a query flag,
because a plain ``redis.Redis.from_url`` refuses it loudly instead of silently talking to one
node of a cluster. `scan_keys` walks every primary (a purge that scanned one node would leave the
other masters' keys behind), and `run_ids` reads every primary's run id (a restarted, empty master
lost its slots' keys however healthy the others are).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException, SlotNotCoveredError
from redis.retry import Retry

from caches.tiers.base import TierUnavailable

T = TypeVar("T")

# Loopback GET is ~0.1 ms; a call that has not answered in this long is a sick server (a loaded
# 2-core box stalls for hundreds of ms at times: 1 s, overridable, avoids false outages).
SOCKET_TIMEOUT_S = float(os.environ.get("TIERSERVE_REDIS_TIMEOUT_S", "1.0"))
CONNECT_TIMEOUT_S = 0.5
RETRY_AFTER_S = 0.5

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError, OSError,
)
# A cluster client raises RedisClusterException (not a RedisError) for what it cannot route: a
# call whose keys span slots, slots no node covers (SlotNotCoveredError), no reachable node.
REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, RedisClusterException, *CONNECTION_ERRORS)
# Server replies that say "the server cannot serve now", not "this command was wrong".
_SERVER_STATE_REPLIES = ("BUSY", "OOM", "LOADING", "READONLY", "MASTERDOWN", "NOREPLICAS", "CLUSTERDOWN")


class RedisUnavailable(TierUnavailable):
    """A Redis call failed or was skipped by the breaker: callers degrade, never crash."""


CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEMES)


def node_url(url: str) -> str:
    """The plain ``redis://`` (``rediss://``) form of a cluster URL: what redis-py parses."""
    return url.replace("+cluster://", "://", 1) if is_cluster_url(url) else url


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def make_client(url: str, *, socket_timeout_s: float = SOCKET_TIMEOUT_S,
                connect_timeout_s: float = CONNECT_TIMEOUT_S) -> redis.Redis:
    """A client that fails fast and never retries on its own (see the module note); a
    ``RedisCluster`` when the URL names a cluster (duck-typed as ``redis.Redis`` for callers)."""
    if is_cluster_url(url):
        return RedisCluster.from_url(  # type: ignore[return-value]
            node_url(url),
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(NoBackoff(), 0),
        retry_on_error=[],
        health_check_interval=0,
    )


def make_async_client(url: str, *, socket_timeout_s: float = SOCKET_TIMEOUT_S,
                      connect_timeout_s: float = CONNECT_TIMEOUT_S) -> Any:
    """The asyncio twin of ``make_client``: fails fast and never retries on its own. redis-py's
    cluster clients otherwise re-send a command that timed out (up to 10 times in 8.x): a write
    whose reply was lost on a slow node then ran twice, and a 0.5 s timeout became ~5 s before
    the breaker heard of it."""
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.asyncio.retry import Retry as AsyncRetry

    options: dict[str, Any] = {"socket_timeout": socket_timeout_s, "socket_connect_timeout": connect_timeout_s,
                               "retry": AsyncRetry(NoBackoff(), 0)}
    if is_cluster_url(url):
        return AsyncRedisCluster.from_url(node_url(url), **options)
    return aioredis.Redis.from_url(url, retry_on_error=[], health_check_interval=0, **options)


class Sweep:
    """Where a bounded, resumable sweep over the hashes of `groups` hash-tag groups stands: the
    group and the HSCAN cursor the next page reads from. The RAM tier's and the placement's upkeep
    read one page per step and `advance` with the cursor HSCAN answered (0: that group is done,
    the next one starts; after the last, the first again)."""

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self.group = 0
        self.cursor = 0

    def advance(self, cursor: int) -> None:
        if cursor != 0:
            self.cursor = cursor
        else:
            self.group, self.cursor = (self.group + 1) % self.groups, 0

    @property
    def wrapped(self) -> bool:
        """True when the last page finished a sweep of every group (and before the first)."""
        return self.group == 0 and self.cursor == 0


def scan_keys(client: Any, pattern: str, count: int = 1000) -> Iterator[bytes]:
    """SCAN MATCH over the whole keyspace: every primary of a cluster, the one server otherwise."""
    if is_cluster(client):
        return client.scan_iter(match=pattern, count=count, target_nodes=RedisCluster.PRIMARIES)
    return client.scan_iter(match=pattern, count=count)


def run_ids(client: Any) -> dict[str, str]:
    """Each server's run id (a new one at every start): node name -> run id for every primary of a
    cluster, one entry ("server") for a single server. Raises Redis errors."""
    if is_cluster(client):
        return {node.name: str(client.info("server", target_nodes=node).get("run_id"))
                for node in client.get_primaries()}
    return {"server": str(client.info("server").get("run_id"))}


def restarted(before: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
    """The servers of `before` whose run id differs in `now`: restarted, so (without persistence)
    empty, and on a cluster the keys of that primary's slots are gone. A node new to `now` (a grown
    cluster, a promoted replica that kept the data) is no restart."""
    return sorted(node for node, run_id in now.items() if node in before and before[node] != run_id)


class ScriptBatch:
    """Lua script calls sent together, replies in call order: one pipeline on one server; on a
    cluster (whose pipelines refuse EVALSHA) one pipeline per node, each call routed to the node
    of its first key's slot (every key of a call shares that slot: the hash-tag rule)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: list[tuple[Any, list[Any], list[Any]]] = []

    def add(self, script: Any, keys: list[Any], args: list[Any]) -> None:
        self.calls.append((script, keys, args))

    def execute(self) -> list[Any]:
        if not self.calls:
            return []
        if not is_cluster(self.client):
            pipe = self.client.pipeline(transaction=False)
            for script, keys, args in self.calls:
                script(keys=keys, args=args, client=pipe)
            return list(pipe.execute())
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for i, (_, keys, _) in enumerate(self.calls):
            node = self.client.get_node_from_key(keys[0])
            by_node.setdefault(node.name, (node, []))[1].append(i)
        out: list[Any] = [None] * len(self.calls)
        for node, indexes in by_node.values():
            conn = self.client.get_redis_connection(node)
            replies = self._evalsha(conn, indexes)
            missing = [i for i, r in zip(indexes, replies, strict=True) if isinstance(r, redis.exceptions.NoScriptError)]
            if missing:  # a node that has not seen a script yet (or restarted): load, run those again
                for script in {id(self.calls[i][0]): self.calls[i][0] for i in missing}.values():
                    conn.script_load(script.script)
                replies = [r if i not in missing else None for i, r in zip(indexes, replies, strict=True)]
                for i, r in zip(missing, self._evalsha(conn, missing), strict=True):
                    replies[indexes.index(i)] = r
            for i, reply in zip(indexes, replies, strict=True):
                if isinstance(reply, Exception):
                    raise reply
                out[i] = reply
        return out

    def _evalsha(self, conn: redis.Redis, indexes: list[int]) -> list[Any]:
        """Raw EVALSHA in one pipeline: redis-py's script pipelining sends SCRIPT EXISTS first,
        a second round trip per node on every call."""
        pipe = conn.pipeline(transaction=False)
        for i in indexes:
            script, keys, args = self.calls[i]
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        return list(pipe.execute(raise_on_error=False))


def mget(client: Any, keys: list[Any]) -> list[Any]:
    """MGET in key order. A cluster refuses one MGET across slots: there, one MGET per slot, all of
    a node's in one pipeline on that node's own connection (cheaper than redis-py's
    `mget_nonatomic`, which builds a cluster pipeline per call)."""
    if not is_cluster(client):
        return list(client.mget(keys))
    by_slot: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        by_slot.setdefault(client.keyslot(k), []).append(i)
    by_node: dict[str, tuple[Any, list[list[int]]]] = {}
    for slot, idx in by_slot.items():
        node = client.nodes_manager.get_node_from_slot(slot)
        by_node.setdefault(node.name, (node, []))[1].append(idx)
    out: list[Any] = [None] * len(keys)
    for node, groups in by_node.values():
        pipe = client.get_redis_connection(node).pipeline(transaction=False)
        for idx in groups:
            pipe.mget([keys[i] for i in idx])
        for idx, values in zip(groups, pipe.execute(), strict=True):
            for i, v in zip(idx, values, strict=True):
                out[i] = v
    return out


def server_unwell(exc: BaseException) -> bool:
    """True for failures that predict the next call fails too (the breaker opens on these)."""
    if isinstance(exc, (*CONNECTION_ERRORS, redis.BusyLoadingError, SlotNotCoveredError)):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).upper().startswith(_SERVER_STATE_REPLIES)


class Breaker:
    """Runs Redis calls; every Redis error comes out as `RedisUnavailable` (see the module note)."""

    def __init__(self, what: str = "redis", retry_after_s: float = RETRY_AFTER_S,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        self.what = what
        self.retry_after_s = retry_after_s
        self.on_failure = on_failure
        self.failures = 0
        self._down_until = 0.0
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def call(self, op: str, fn: Callable[..., T], *args: Any) -> T:
        if not self.available:
            raise RedisUnavailable(f"{self.what} is down (retrying in < {self.retry_after_s}s)")
        try:
            return fn(*args)
        except REDIS_ERRORS as exc:
            with self._lock:
                self.failures += 1
                if server_unwell(exc):
                    self._down_until = time.monotonic() + self.retry_after_s
            if self.on_failure is not None:
                self.on_failure(exc)
            raise RedisUnavailable(f"{self.what} failed during {op}: {type(exc).__name__}: {exc}") from exc
