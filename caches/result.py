"""Exact result cache in Redis: the same request, byte for byte, gets the stored answer.

Keys are ``res.{tenant}:{model}@{fingerprint}.{default sampling}:{version}:{sha256(request)}``, built by
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

import re
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import redis

from caches.budget import (
    BUDGET_LUA,
    LEDGER_BYTES,
    LEDGER_ENTRIES,
    LEDGER_EVICTIONS,
    Books,
    Budget,
    Report,
    chunks,
    tenant_of,
)
from caches.keys import (
    digest,
    glob_escape,
    make_key,
    model_version_match,
    model_version_patterns,
    safe_part,
    tenant_namespace,
)
from caches.redis_client import RETRY_AFTER_S, Breaker, RedisUnavailable, scan_keys

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
    only: re.Pattern[bytes] | None = None,
) -> int:
    """SCAN + UNLINK in pages (never KEYS: it blocks Redis), on every primary of a cluster, of the
    keys `pattern` matches (and `only`, where given, matches from their start); returns how many
    keys were deleted."""
    deleted = 0
    found = scan_keys(client, pattern, batch)
    if only is not None:
        found = (key for key in found if only.match(key))
    for page in chunks(found, batch):
        if on_batch is not None:
            on_batch(page)
        deleted += int(client.unlink(*page))  # a cluster client splits it per slot
    return deleted


# Removes an entry (the budget library's `forget`): its key and its accounting.
_FORGET_ENTRY = """
local function forget(m) redis.call('UNLINK', m); bk_forget(m) end
"""

# KEYS: the tenant's books (5: caches.budget.tenant_keys), entry
# ARGV: value, ttl_ms, now_ms, reclaim limit, tenant entries, tenant bytes (-1 = unbounded),
#       key copies, overhead. Returns the budget report (caches.budget.Report).
_PUT_SCRIPT = BUDGET_LUA + _FORGET_ENTRY + """
local now, ttl = tonumber(ARGV[3]), tonumber(ARGV[2])
bk_reclaim(now, tonumber(ARGV[4]), forget)
local size = string.len(ARGV[1]) + tonumber(ARGV[7]) * string.len(KEYS[6]) + tonumber(ARGV[8])
redis.call('SET', KEYS[6], ARGV[1], 'PX', ttl)
bk_add(KEYS[6], size, now + ttl, now + ttl)
bk_enforce(KEYS[6], {tonumber(ARGV[5]), tonumber(ARGV[6])}, forget)
return bk_report()
"""

# KEYS: entry, the tenant's stats hash (same hash tag); ARGV: none
_GET_SCRIPT = """
local v = redis.call('GET', KEYS[1])
if v then redis.call('HINCRBY', KEYS[2], 'hits', 1)
else redis.call('HINCRBY', KEYS[2], 'misses', 1) end
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
        # bookkeeping keys live outside every tenant namespace, so purges by prefix never hit them;
        # per tenant beside its entries (one hash tag), the global ledger in a slot of its own
        self.meta = meta = f"{self.NAMESPACE}.__meta"
        self.books = Books(client, meta, self.budget, _FORGET_ENTRY, reclaim_limit=RECLAIM_PER_PUT)
        ledger = self.books.ledger
        self._bytes_key, self._entries_key = ledger[LEDGER_BYTES], ledger[LEDGER_ENTRIES]
        self._evictions_key = ledger[LEDGER_EVICTIONS]
        self._get = client.register_script(_GET_SCRIPT)
        self._put = client.register_script(_PUT_SCRIPT)
        self.local = {"hits": 0, "misses": 0, "puts": 0, "refused": 0, "bypass": 0}

    @staticmethod
    def entry_size(key: str, value: bytes) -> int:
        """Bytes an entry counts against the budgets (the put script computes the same)."""
        return len(value) + KEY_COPIES * len(key.encode()) + ENTRY_OVERHEAD_BYTES

    # -- keys ---------------------------------------------------------------------------------
    def namespace(self, tenant: str) -> str:
        return tenant_namespace(self.NAMESPACE, tenant)

    def key(self, *, tenant: str, model: str, version: str, payload: Any) -> str:
        """Key of any other request (recommendations, embeddings): the canonical payload."""
        return make_key(self.namespace(tenant), safe_part(model), safe_part(version), digest(payload))

    @staticmethod
    def tenant_of(key: str) -> str:
        return tenant_of(key)

    def _stats_key(self, tenant: str) -> str:
        """The tenant's hit/miss counters, beside its entries (same hash tag)."""
        return f"{self.meta}.{{{tenant}}}:stats"

    # -- data path ----------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        stats_key = self._stats_key(self.tenant_of(key))

        try:
            # one round trip: the read and the cluster-wide hit/miss count (so /v1/cache/stats is
            # the same whichever replica answers)
            value = self.guard.call("result.get", lambda: self._get(keys=[key, stats_key]))
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
        tenant = self.tenant_of(key)
        limits = self.budget.lua_args()
        args = [value, ttl_ms, now_ms, RECLAIM_PER_PUT, limits[0], limits[1], KEY_COPIES, ENTRY_OVERHEAD_BYTES]

        def run() -> None:
            # 1. on the tenant's slot: store, reclaim, the tenant budget (atomic); 2. the ledger
            # and the global budget (caches/budget.py)
            report = Report.of(self._put(keys=[*self.books.keys(tenant), key], args=args))
            self.books.settle(tenant, report, spare=key, now_ms=now_ms)

        self.guard.call("result.put", run)
        self.local["puts"] += 1

    def delete(self, keys: list[str]) -> int:
        if not keys:
            return 0

        def run() -> int:
            n = sum(int(self.client.unlink(*page)) for page in chunks(keys))
            self.books.forget(keys)
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
        only = model_version_match(self.NAMESPACE, model, version)
        return self.guard.call(
            "result.purge", lambda: sum(scan_unlink(self.client, p, self._forget_page, only=only) for p in patterns)
        )

    def delete_tenant(self, tenant: str) -> int:
        return self.delete_prefix(self.namespace(tenant) + ":")

    def _forget_page(self, page: list[bytes]) -> None:
        self.books.forget(page)

    # -- observability ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"local": dict(self.local), "max_bytes": self.max_bytes,
                               "budget": asdict(self.budget), "available": True}
        try:

            def run() -> tuple[Any, ...]:
                pipe = self.client.pipeline(transaction=False)
                pipe.get(self._bytes_key)
                pipe.get(self._entries_key)
                pipe.get(self._evictions_key)
                used, entries, evictions = pipe.execute()
                # per-tenant counters sit on each tenant's slot: found by a SCAN of every primary
                pattern = glob_escape(f"{self.meta}.{{") + "*" + glob_escape("}:stats")
                names = list(scan_keys(self.client, pattern))
                pipe = self.client.pipeline(transaction=False)
                for name in names:
                    pipe.hgetall(name)
                return used, entries, evictions, dict(zip(names, pipe.execute(), strict=True))

            used, entries, evictions, counters = self.guard.call("result.stats", run)
        except CacheUnavailable:
            out["available"] = False
            return out
        by_tenant: dict[str, dict[str, int]] = {}
        for name, fields in counters.items():
            text = name.decode() if isinstance(name, bytes) else name
            tenant = text[text.index("{") + 1 : text.index("}")]  # the hash tag: the tenant
            row = by_tenant.setdefault(tenant, {"hits": 0, "misses": 0})
            for what, raw_value in fields.items():
                row[what.decode() if isinstance(what, bytes) else what] = int(raw_value)
        out.update(
            bytes=int(used or 0),
            entries=int(entries or 0),
            evictions=int(evictions or 0),
            hits=sum(t["hits"] for t in by_tenant.values()),
            misses=sum(t["misses"] for t in by_tenant.values()),
            by_tenant=by_tenant,
        )
        return out
