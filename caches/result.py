"""Exact result cache in Redis: the same request, byte for byte, gets the stored answer.

Keys are ``res.{tenant}:{model}@{fingerprint}:{version}:{sha256(request)}``, built by
:class:`caches.chat.ChatIdentity` for chat (see :mod:`caches.keys`):
the tenant in the namespace means no lookup ever crosses tenants, and the version means a model
bump makes every old answer unreachable at once; :meth:`ResultCache.delete_model_version` then
reclaims the memory in the background.

Bounded memory: Redis' own ``maxmemory`` is server-wide and shared with the other caches, so this
cache keeps its own byte budget. Every put runs one Lua script that records the entry's size in a
hash and its expiry in a sorted set, first forgets entries whose TTL has passed (Redis expired them
silently, so their bytes must be given back), then evicts the entries closest to expiry (with one
TTL that is oldest-first) until the total is under ``max_bytes``. The script is atomic, so replicas
putting at the same time cannot overshoot the budget together. Values larger than
``max_value_bytes`` are refused outright: one huge answer must not flush hundreds of small ones.

Failure behaviour: any Redis connection error becomes :class:`CacheUnavailable`; the caller answers
from the model with ``x-cache: bypass``. After a failure the cache fails fast for
:data:`RETRY_AFTER_S` instead of paying a connect timeout on every request, then tries again by
itself, so caching resumes when Redis is back without re-creating any object.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import redis

from caches.keys import digest, glob_escape, make_key, model_version_patterns, safe_part

T = TypeVar("T")

# How long to fail fast after a connection error before trying Redis again.
RETRY_AFTER_S = 0.5
# Keys per SCAN page and per UNLINK call during purges: big enough to be quick, small enough not
# to block Redis for other clients.
PURGE_BATCH = 500
# Expired entries reclaimed per put: bounds the Lua script's run time.
RECLAIM_PER_PUT = 64
class CacheUnavailable(RuntimeError):
    """Redis cannot be reached: the caller answers without the cache (``x-cache: bypass``)."""


class RedisGuard:
    """Turns connection errors into :class:`CacheUnavailable` and fails fast for a moment after one."""

    def __init__(self, retry_after_s: float = RETRY_AFTER_S) -> None:
        self.retry_after_s = retry_after_s
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.failures = 0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def call(self, fn: Callable[[], T]) -> T:
        if not self.available:
            raise CacheUnavailable("redis unavailable (backing off)")
        try:
            result = fn()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            with self._lock:
                self.failures += 1
                self._down_until = time.monotonic() + self.retry_after_s
            raise CacheUnavailable(f"redis unavailable: {exc}") from exc
        return result


def scan_unlink(
    client: redis.Redis,
    pattern: str,
    on_batch: Callable[[list[bytes]], None] | None = None,
    batch: int = PURGE_BATCH,
) -> int:
    """SCAN + UNLINK in pages (never KEYS: it blocks Redis); returns how many keys were deleted."""
    deleted = 0
    for page in _chunks(client.scan_iter(match=pattern, count=batch), batch):
        if on_batch is not None:
            on_batch(page)
        deleted += int(client.unlink(*page))
    return deleted


def _chunks(items: Iterable[T], size: int) -> Iterable[list[T]]:
    page: list[T] = []
    for item in items:
        page.append(item)
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page


# KEYS: entry, sizes hash, expiry zset, bytes counter, evictions counter
# ARGV: value, ttl_ms, now_ms, max_bytes (-1 = unbounded), reclaim limit
_PUT_SCRIPT = """
local size = string.len(ARGV[1]) + string.len(KEYS[1])
local now = tonumber(ARGV[3])
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[5]))
for _, k in ipairs(expired) do
  local s = redis.call('HGET', KEYS[2], k)
  if s then redis.call('DECRBY', KEYS[4], s) end
  redis.call('HDEL', KEYS[2], k)
  redis.call('ZREM', KEYS[3], k)
end
local old = redis.call('HGET', KEYS[2], KEYS[1])
if old then redis.call('DECRBY', KEYS[4], old) end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
redis.call('HSET', KEYS[2], KEYS[1], size)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), KEYS[1])
local total = redis.call('INCRBY', KEYS[4], size)
local max = tonumber(ARGV[4])
local evicted = 0
while max >= 0 and total > max do
  local victim = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  if not victim then break end
  local s = redis.call('HGET', KEYS[2], victim)
  redis.call('UNLINK', victim)
  redis.call('HDEL', KEYS[2], victim)
  redis.call('ZREM', KEYS[3], victim)
  if s then total = redis.call('DECRBY', KEYS[4], s) end
  evicted = evicted + 1
end
if evicted > 0 then redis.call('INCRBY', KEYS[5], evicted) end
return evicted
"""

# KEYS: entry, stats hash; ARGV: tenant
_GET_SCRIPT = """
local v = redis.call('GET', KEYS[1])
if v then redis.call('HINCRBY', KEYS[2], ARGV[1] .. ':hits', 1)
else redis.call('HINCRBY', KEYS[2], ARGV[1] .. ':misses', 1) end
return v
"""

# KEYS: sizes hash, expiry zset, bytes counter; ARGV: entry keys already unlinked
_FORGET_SCRIPT = """
local freed = 0
for _, k in ipairs(ARGV) do
  local s = redis.call('HGET', KEYS[1], k)
  if s then
    freed = freed + tonumber(s)
    redis.call('HDEL', KEYS[1], k)
  end
  redis.call('ZREM', KEYS[2], k)
end
if freed > 0 then redis.call('DECRBY', KEYS[3], freed) end
return freed
"""


class ResultCache:
    """Exact-match answers keyed by tenant, model identity, version and the request."""

    NAMESPACE = "res"

    def __init__(
        self,
        client: redis.Redis,
        *,
        default_ttl_s: float = 3600,
        max_bytes: int | None = None,
        max_value_bytes: int = 1_000_000,
        retry_after_s: float = RETRY_AFTER_S,
    ) -> None:
        self.client = client
        self.default_ttl_s = default_ttl_s
        self.max_bytes = max_bytes
        self.max_value_bytes = max_value_bytes
        self.guard = RedisGuard(retry_after_s)
        # bookkeeping keys live outside every tenant namespace, so purges by prefix never hit them
        meta = f"{self.NAMESPACE}.__meta"
        self._sizes_key = f"{meta}:sizes"
        self._expiry_key = f"{meta}:expiry"
        self._bytes_key = f"{meta}:bytes"
        self._evictions_key = f"{meta}:evictions"
        self._stats_key = f"{meta}:stats"
        self._get = client.register_script(_GET_SCRIPT)
        self._put = client.register_script(_PUT_SCRIPT)
        self._forget = client.register_script(_FORGET_SCRIPT)
        self.local = {"hits": 0, "misses": 0, "puts": 0, "refused": 0, "bypass": 0}

    # -- keys ---------------------------------------------------------------------------------
    def namespace(self, tenant: str) -> str:
        return f"{self.NAMESPACE}.{safe_part(tenant)}"

    def key(self, *, tenant: str, model: str, version: str, payload: Any) -> str:
        """Key of any other request (recommendations, embeddings): the canonical payload."""
        return make_key(self.namespace(tenant), safe_part(model), safe_part(version), digest(payload))

    @staticmethod
    def tenant_of(key: str) -> str:
        ns = key.split(":", 1)[0]
        return ns.split(".", 1)[1] if "." in ns else ns

    # -- data path ----------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        field = self.tenant_of(key)

        try:
            # one round trip: the read and the cluster-wide hit/miss count (so /v1/cache/stats is
            # the same whichever replica answers)
            value = self.guard.call(lambda: self._get(keys=[key, self._stats_key], args=[field]))
        except CacheUnavailable:
            self.local["bypass"] += 1
            raise
        self.local["hits" if value is not None else "misses"] += 1
        return value

    def put(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        if len(value) > self.max_value_bytes or (self.max_bytes is not None and len(value) > self.max_bytes):
            self.local["refused"] += 1
            return
        ttl_ms = max(1, int(1000 * (ttl_s if ttl_s is not None else self.default_ttl_s)))
        now_ms = int(time.time() * 1000)
        keys = [key, self._sizes_key, self._expiry_key, self._bytes_key, self._evictions_key]
        args = [value, ttl_ms, now_ms, -1 if self.max_bytes is None else self.max_bytes, RECLAIM_PER_PUT]
        self.guard.call(lambda: self._put(keys=keys, args=args))
        self.local["puts"] += 1

    def delete(self, keys: list[str]) -> int:
        if not keys:
            return 0

        def run() -> int:
            n = int(self.client.unlink(*keys))
            self._forget(keys=[self._sizes_key, self._expiry_key, self._bytes_key], args=keys)
            return n

        return self.guard.call(run)

    # -- invalidation -------------------------------------------------------------------------
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with ``prefix`` (SCAN + UNLINK in batches), with bookkeeping."""

        def forget(page: list[bytes]) -> None:
            self._forget(keys=[self._sizes_key, self._expiry_key, self._bytes_key], args=page)

        return self.guard.call(lambda: scan_unlink(self.client, glob_escape(prefix) + "*", forget))

    def delete_model_version(self, model: str, version: str | None = None) -> int:
        """Purge a model (or one version of it) across all tenants: the background half of a bump."""
        def forget(page: list[bytes]) -> None:
            self._forget(keys=[self._sizes_key, self._expiry_key, self._bytes_key], args=page)

        patterns = model_version_patterns(self.NAMESPACE, model, version)
        return self.guard.call(lambda: sum(scan_unlink(self.client, p, forget) for p in patterns))

    def delete_tenant(self, tenant: str) -> int:
        return self.delete_prefix(self.namespace(tenant) + ":")

    # -- observability ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"local": dict(self.local), "max_bytes": self.max_bytes, "available": True}
        try:

            def run() -> tuple[Any, ...]:
                pipe = self.client.pipeline(transaction=False)
                pipe.get(self._bytes_key)
                pipe.hlen(self._sizes_key)
                pipe.get(self._evictions_key)
                pipe.hgetall(self._stats_key)
                return tuple(pipe.execute())

            used, entries, evictions, counters = self.guard.call(run)
        except CacheUnavailable:
            out["available"] = False
            return out
        by_tenant: dict[str, dict[str, int]] = {}
        for raw_field, raw_value in counters.items():
            tenant, _, what = raw_field.decode().rpartition(":")
            by_tenant.setdefault(tenant, {"hits": 0, "misses": 0})[what] = int(raw_value)
        out.update(
            bytes=int(used or 0),
            entries=int(entries),
            evictions=int(evictions or 0),
            hits=sum(t["hits"] for t in by_tenant.values()),
            misses=sum(t["misses"] for t in by_tenant.values()),
            by_tenant=by_tenant,
        )
        return out
