"""Exact result cache in Redis: the same request, byte for byte, gets the stored answer.

Keys are ``res.{tenant}:{model}@{fingerprint}:{version}:{sha256(request)}``, built by
:class:`caches.chat.ChatIdentity` for chat (see :mod:`caches.keys`):
the tenant in the namespace means no lookup ever crosses tenants, and the version means a model
bump makes every old answer unreachable at once; :meth:`ResultCache.delete_model_version` then
reclaims the memory in the background.

Bounded memory: Redis' own ``maxmemory`` is server-wide and shared with the other caches, so this
cache keeps its own budgets, per tenant and global (:mod:`caches.budget`): a tenant that floods it
evicts its own oldest entries, never another tenant's. Every put runs one Lua script that first
gives back the bytes of entries whose TTL has passed (Redis expired them silently), stores the
entry, then evicts oldest-first (closest to expiry) until the tenant's and the global budgets hold.
The script is atomic, so replicas putting at the same time cannot overshoot together. Values larger
than ``max_value_bytes`` are refused outright: one huge answer must not flush hundreds of small ones.

Failure behaviour: every Redis call runs through a :class:`caches.redis_client.Breaker`; any Redis
error becomes :class:`CacheUnavailable` (the caller answers from the model with ``x-cache:
bypass``), and after a server failure the cache fails fast for ``retry_after_s`` instead of paying
a connect timeout on every request, then tries again by itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import redis

from caches.budget import BUDGET_LUA, FORGET_SCRIPT, Budget, chunks, forget
from caches.keys import digest, glob_escape, make_key, model_version_patterns, safe_part
from caches.redis_client import RETRY_AFTER_S, Breaker, RedisUnavailable

# The one exception type of every cache's Redis trouble, under the name callers already import.
CacheUnavailable = RedisUnavailable

# Keys per SCAN page during purges: big enough to be quick, small enough not to block Redis.
PURGE_BATCH = 256
# Expired entries reclaimed per put: bounds the Lua script's run time.
RECLAIM_PER_PUT = 64
# Bytes an entry counts besides its value: its key sits in the entry, the sizes hash, the expiry
# zset and the tenant's rank zset (4x), plus Redis' per-object overhead (approximate).
KEY_COPIES = 4
ENTRY_OVERHEAD_BYTES = 96


def scan_unlink(
    client: redis.Redis,
    pattern: str,
    on_batch: Callable[[list[bytes]], None] | None = None,
    batch: int = PURGE_BATCH,
) -> int:
    """SCAN + UNLINK in pages (never KEYS: it blocks Redis); returns how many keys were deleted."""
    deleted = 0
    for page in chunks(client.scan_iter(match=pattern, count=batch), batch):
        if on_batch is not None:
            on_batch(page)
        deleted += int(client.unlink(*page))
    return deleted


# KEYS: entry, evictions counter
# ARGV: value, ttl_ms, now_ms, prefix, reclaim limit, tenant entries, tenant bytes, global entries,
#       global bytes (-1 = unbounded), key copies, overhead
_PUT_SCRIPT = BUDGET_LUA + """
local P, now, ttl = ARGV[4], tonumber(ARGV[3]), tonumber(ARGV[2])
local function drop(m) redis.call('UNLINK', m); bk_forget(P, m) end
bk_reclaim(P, now, tonumber(ARGV[5]), drop)
local size = string.len(ARGV[1]) + tonumber(ARGV[10]) * string.len(KEYS[1]) + tonumber(ARGV[11])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
local t = bk_add(P, KEYS[1], size, now + ttl, now + ttl)
local L = {tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])}
local evicted = bk_enforce(P, t, KEYS[1], L, drop)
if evicted > 0 then redis.call('INCRBY', KEYS[2], evicted) end
return evicted
"""

# KEYS: entry, stats hash; ARGV: tenant
_GET_SCRIPT = """
local v = redis.call('GET', KEYS[1])
if v then redis.call('HINCRBY', KEYS[2], ARGV[1] .. ':hits', 1)
else redis.call('HINCRBY', KEYS[2], ARGV[1] .. ':misses', 1) end
return v
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
        max_entries: int | None = None,
        tenant_max_bytes: int | None = None,
        tenant_max_entries: int | None = None,
        max_value_bytes: int = 1_000_000,
        retry_after_s: float = RETRY_AFTER_S,
    ) -> None:
        """``max_bytes``/``max_entries`` bound the whole cache, ``tenant_*`` each tenant's share
        (None: unbounded; a tenant budget above the global one is the global one)."""
        self.client = client
        self.default_ttl_s = default_ttl_s
        self.budget = Budget(tenant_entries=tenant_max_entries, tenant_bytes=tenant_max_bytes,
                             global_entries=max_entries, global_bytes=max_bytes)
        self.max_bytes = max_bytes
        self.max_value_bytes = max_value_bytes
        self.guard = Breaker(f"{self.NAMESPACE} cache", retry_after_s)
        # bookkeeping keys live outside every tenant namespace, so purges by prefix never hit them
        self.meta = meta = f"{self.NAMESPACE}.__meta"
        self._sizes_key = f"{meta}:sizes"
        self._expiry_key = f"{meta}:expiry"
        self._bytes_key = f"{meta}:bytes"
        self._evictions_key = f"{meta}:evictions"
        self._stats_key = f"{meta}:stats"
        self._get = client.register_script(_GET_SCRIPT)
        self._put = client.register_script(_PUT_SCRIPT)
        self._forget = client.register_script(FORGET_SCRIPT)
        self.local = {"hits": 0, "misses": 0, "puts": 0, "refused": 0, "bypass": 0}

    @staticmethod
    def entry_size(key: str, value: bytes) -> int:
        """Bytes an entry counts against the budgets (the put script computes the same)."""
        return len(value) + KEY_COPIES * len(key.encode()) + ENTRY_OVERHEAD_BYTES

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
            value = self.guard.call("result.get", lambda: self._get(keys=[key, self._stats_key], args=[field]))
        except CacheUnavailable:
            self.local["bypass"] += 1
            raise
        self.local["hits" if value is not None else "misses"] += 1
        return value

    def put(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        fits = self.budget.max_entry_bytes
        if len(value) > self.max_value_bytes or (fits is not None and self.entry_size(key, value) > fits):
            self.local["refused"] += 1
            return
        ttl_ms = max(1, int(1000 * (ttl_s if ttl_s is not None else self.default_ttl_s)))
        now_ms = int(time.time() * 1000)
        args = [value, ttl_ms, now_ms, self.meta, RECLAIM_PER_PUT, *self.budget.lua_args(), KEY_COPIES,
                ENTRY_OVERHEAD_BYTES]
        self.guard.call("result.put", lambda: self._put(keys=[key, self._evictions_key], args=args))
        self.local["puts"] += 1

    def delete(self, keys: list[str]) -> int:
        if not keys:
            return 0

        def run() -> int:
            n = sum(int(self.client.unlink(*page)) for page in chunks(keys))
            forget(self.client, self._forget, self.meta, keys)
            return n

        return self.guard.call("result.delete", run)

    # -- invalidation -------------------------------------------------------------------------
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with ``prefix`` (SCAN + UNLINK in batches), with bookkeeping."""

        return self.guard.call(
            "result.purge", lambda: scan_unlink(self.client, glob_escape(prefix) + "*", self._forget_page)
        )

    def delete_model_version(self, model: str, version: str | None = None) -> int:
        """Purge a model (or one version of it) across all tenants: the background half of a bump."""
        patterns = model_version_patterns(self.NAMESPACE, model, version)
        return self.guard.call(
            "result.purge", lambda: sum(scan_unlink(self.client, p, self._forget_page) for p in patterns)
        )

    def delete_tenant(self, tenant: str) -> int:
        return self.delete_prefix(self.namespace(tenant) + ":")

    def _forget_page(self, page: list[bytes]) -> None:
        forget(self.client, self._forget, self.meta, page)

    # -- observability ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"local": dict(self.local), "max_bytes": self.max_bytes,
                               "budget": asdict(self.budget), "available": True}
        try:

            def run() -> tuple[Any, ...]:
                pipe = self.client.pipeline(transaction=False)
                pipe.get(self._bytes_key)
                pipe.hlen(self._sizes_key)
                pipe.get(self._evictions_key)
                pipe.hgetall(self._stats_key)
                return tuple(pipe.execute())

            used, entries, evictions, counters = self.guard.call("result.stats", run)
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
