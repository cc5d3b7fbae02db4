"""Per-tenant and global budgets for the caches that live in Redis (semantic and exact results).

Why not per scope, per key or Redis' own ``maxmemory``: a scope (tenant + earlier turns +
parameters) is created by every new conversation, so a budget per scope bounds nothing; and
``maxmemory`` is server-wide, so a tenant that floods the cache would push every other tenant's
entries out. Here each cache keeps, beside its entries, one set of bookkeeping keys under
``{prefix}`` (``sem.__meta``, ``res.__meta``, ``recs.__meta``: outside every tenant's namespace, so
purges by tenant or model pattern never match them):

- ``{prefix}:sizes``: hash, entry key -> bytes counted (its length is the global entry count)
- ``{prefix}:expiry``: zset, entry key -> expiry (ms); Redis expires entries silently, so their
  bytes are given back by a bounded reclaim on every store
- ``{prefix}:bytes``: the global byte total
- ``{prefix}:t:{tenant}:rank``: zset, the tenant's entries in eviction order (lowest first)
- ``{prefix}:t:{tenant}:bytes``: the tenant's byte total
- ``{prefix}:tenants:bytes`` / ``{prefix}:tenants:entries``: zsets, tenant -> its totals

Eviction (all in the cache's store script, atomically, so replicas storing at once cannot
overshoot together):

1. While the storing tenant is over its own budget (entries or bytes), its lowest-ranked entry goes.
2. While the cache is over the global budget, the *biggest* tenant (by the dimension that is over)
   gives way, and the storing tenant whenever it is among the biggest. So the global budget is
   shared max-min fairly: a tenant never evicts the entries of a tenant smaller than or as big as
   itself, and a flood, which makes the flooder the biggest, evicts only the flooder's own entries.

The Lua below is a library: each cache's script starts with :data:`BUDGET_LUA` and passes a
``forget`` function that removes the entry itself (its key, and for the semantic cache its scope's
index and a stream event); the library does the accounting. The tenant is read from the entry key,
``{namespace}.{tenant}:...`` (:mod:`caches.keys`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from caches.keys import safe_part

T = TypeVar("T")

# Keys per forget call (purges, deletes): the same bound as every other batched script here.
MAX_KEYS_PER_SCRIPT = 256


@dataclass(frozen=True)
class Budget:
    """Limits of one cache; ``None`` means unbounded in that dimension."""

    tenant_entries: int | None = None
    tenant_bytes: int | None = None
    global_entries: int | None = None
    global_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("tenant_entries", "tenant_bytes", "global_entries", "global_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None for unbounded), got {value}")

    @property
    def max_entry_bytes(self) -> int | None:
        """The largest entry that can fit at all (a bigger one is refused before Redis)."""
        limits = [b for b in (self.tenant_bytes, self.global_bytes) if b is not None]
        return min(limits) if limits else None

    def lua_args(self) -> list[int]:
        """The four limits as the scripts take them (-1 = unbounded)."""
        return [-1 if v is None else int(v) for v in
                (self.tenant_entries, self.tenant_bytes, self.global_entries, self.global_bytes)]


def tenant_of(key: str) -> str:
    """The tenant part of ``{namespace}.{tenant}:...`` (as the Lua reads it)."""
    head = key.split(":", 1)[0]
    return head.split(".", 1)[1] if "." in head else "_"


# The library. Locals only: each script that includes it stays self-contained.
BUDGET_LUA = """
local function bk_tenant(member) return string.match(member, '^[^:]-%.([^:]+):') or '_' end
local function bk_over(limit, value) return limit >= 0 and value > limit end

-- Forget an entry's accounting; returns the bytes it counted (0 when it was not accounted).
local function bk_forget(P, member)
  redis.call('ZREM', P .. ':expiry', member)
  local t = bk_tenant(member)
  local tk = P .. ':t:' .. t
  redis.call('ZREM', tk .. ':rank', member)
  local s = redis.call('HGET', P .. ':sizes', member)
  if not s then return 0 end
  s = tonumber(s)
  redis.call('HDEL', P .. ':sizes', member)
  redis.call('DECRBY', P .. ':bytes', s)
  redis.call('DECRBY', tk .. ':bytes', s)
  redis.call('ZINCRBY', P .. ':tenants:bytes', -s, t)
  if tonumber(redis.call('ZINCRBY', P .. ':tenants:entries', -1, t)) <= 0 then
    redis.call('DEL', tk .. ':bytes')
    redis.call('ZREM', P .. ':tenants:bytes', t)
    redis.call('ZREM', P .. ':tenants:entries', t)
  end
  return s
end

-- Account a new entry (an overwrite gives its old bytes back first); returns its tenant.
local function bk_add(P, member, size, expiry_ms, rank)
  bk_forget(P, member)
  local t = bk_tenant(member)
  local tk = P .. ':t:' .. t
  redis.call('HSET', P .. ':sizes', member, size)
  if expiry_ms > 0 then redis.call('ZADD', P .. ':expiry', expiry_ms, member) end
  redis.call('ZADD', tk .. ':rank', rank, member)
  redis.call('INCRBY', P .. ':bytes', size)
  redis.call('INCRBY', tk .. ':bytes', size)
  redis.call('ZINCRBY', P .. ':tenants:bytes', size, t)
  redis.call('ZINCRBY', P .. ':tenants:entries', 1, t)
  return t
end

-- Expired entries (Redis dropped them silently) given back, at most `limit`.
local function bk_reclaim(P, now_ms, limit, forget)
  local expired = redis.call('ZRANGEBYSCORE', P .. ':expiry', '-inf', now_ms, 'LIMIT', 0, limit)
  for _, m in ipairs(expired) do forget(m) end
  return #expired
end

local function bk_lowest(P, t, exclude)
  local c = redis.call('ZRANGE', P .. ':t:' .. t .. ':rank', 0, 1)
  if c[1] == exclude then return c[2] end
  return c[1]
end

-- The next entry to evict for a store by tenant `t`, or nil when every budget holds.
-- L: tenant entries, tenant bytes, global entries, global bytes (-1 = unbounded).
local function bk_victim(P, t, exclude, L)
  local tk = P .. ':t:' .. t
  if bk_over(L[1], redis.call('ZCARD', tk .. ':rank'))
      or bk_over(L[2], tonumber(redis.call('GET', tk .. ':bytes') or '0')) then
    return bk_lowest(P, t, exclude)
  end
  local by = nil
  if bk_over(L[3], redis.call('HLEN', P .. ':sizes')) then by = P .. ':tenants:entries'
  elseif bk_over(L[4], tonumber(redis.call('GET', P .. ':bytes') or '0')) then by = P .. ':tenants:bytes' end
  if not by then return nil end
  local top = redis.call('ZREVRANGE', by, 0, 0, 'WITHSCORES')
  if not top[1] then return nil end
  local mine = redis.call('ZSCORE', by, t)
  if mine and tonumber(mine) >= tonumber(top[2]) then
    local v = bk_lowest(P, t, exclude)
    if v then return v end
  end
  return bk_lowest(P, top[1], exclude)
end

-- Evict until every budget holds; returns how many entries went.
local function bk_enforce(P, t, exclude, L, forget)
  local n = 0
  while true do
    local v = bk_victim(P, t, exclude, L)
    if not v then return n end
    forget(v)
    n = n + 1
  end
end
"""

# Forget the accounting of entries already deleted (purges, deletes).
# KEYS: none (the prefix names them); ARGV: prefix, entry keys...
FORGET_SCRIPT = BUDGET_LUA + """
local P, freed = ARGV[1], 0
for i = 2, #ARGV do freed = freed + bk_forget(P, ARGV[i]) end
return freed
"""


def chunks(items: Iterable[T], size: int = MAX_KEYS_PER_SCRIPT) -> Iterator[list[T]]:
    page: list[T] = []
    for item in items:
        page.append(item)
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page


def forget(client: redis.Redis, script: Any, prefix: str, members: Sequence[bytes | str]) -> int:
    """Forget the accounting of ``members`` (already deleted), in chunks; returns bytes freed."""
    freed = 0
    for page in chunks(members):
        freed += int(script(args=[prefix, *page], client=client))
    return freed


def usage(client: redis.Redis, prefix: str, tenant: str | None = None) -> dict[str, int]:
    """Entries and bytes counted globally, or for one tenant (raises Redis errors)."""
    pipe = client.pipeline(transaction=False)
    if tenant is None:
        pipe.hlen(f"{prefix}:sizes")
        pipe.get(f"{prefix}:bytes")
    else:
        tk = f"{prefix}:t:{safe_part(tenant)}"
        pipe.zcard(f"{tk}:rank")
        pipe.get(f"{tk}:bytes")
    entries, size = pipe.execute()
    return {"entries": int(entries), "bytes": int(size or 0)}
