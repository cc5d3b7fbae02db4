"""Per-tenant and global budgets for the caches that live in Redis (semantic and exact results).

Why not per scope, per key or Redis' own ``maxmemory``: a scope (tenant + earlier turns +
parameters) is created by every new conversation, so a budget per scope bounds nothing; and
``maxmemory`` is server-wide, so a tenant that floods the cache would push every other tenant's
entries out.

Where the bookkeeping lives (Redis Cluster): every key a script touches must hash to one slot,
so the bookkeeping is split in two. A tenant's entries are ``<ns>.{<tenant>}:...`` (the tenant is
the hash tag, :func:`caches.keys.tenant_namespace`) and its bookkeeping sits beside them under
the same tag, ``<prefix>.{<tenant>}`` (``res.__meta.{acme}``: outside every tenant's namespace,
so purges by tenant or model pattern never match it):

- ``:sizes``: hash, entry key -> bytes counted (its length is the tenant's entry count)
- ``:expiry``: zset, entry key -> expiry (ms); Redis expires entries silently, so their bytes are
  given back by a bounded reclaim
- ``:rank``: zset, the tenant's entries in eviction order (lowest first)
- ``:bytes``: the tenant's byte total
- ``:seq``: the number of the tenant's latest report (below)

The global view is a *ledger* in one slot of its own, ``{<prefix>}`` (``{res.__meta}:bytes``):
``:bytes`` and ``:entries`` (global totals), ``:tenants:bytes`` / ``:tenants:entries`` (zsets,
tenant -> its totals), ``:tenants:expiry`` (zset, tenant -> its earliest entry expiry) and
``:evictions``, and ``:tenants:seq`` (hash, tenant -> the number of the report its row holds).
A tenant script reports the tenant's totals after it ran, its earliest expiry and a sequence
number; the client applies that to the ledger in a second call (:class:`Books`), which answers
whether the cache is over its global budget and who gives way. Totals rather than deltas, so the
ledger heals itself: a report that never reached it (a client that timed out after its script
ran on a slow Redis, or died in between) is made good by the tenant's next report, and one
that arrives after a newer one is ignored by its number.

Eviction:

1. While the storing tenant is over its own budget (entries or bytes), its lowest-ranked entry
   goes: in the store script itself, atomically, so replicas storing at once cannot overshoot a
   tenant budget together.
2. While the cache is over the global budget, the *biggest* tenant (by the dimension that is over)
   gives way, and the storing tenant whenever it is among the biggest; it sheds at most down to
   the next biggest tenant's level per round. So the global budget is shared max-min fairly: a
   tenant never evicts the entries of a tenant smaller than or as big as itself, and a flood,
   which makes the flooder the biggest, evicts only the flooder's own entries. This runs on the
   victim tenant's slot after the ledger said so: it is not atomic with the store, so replicas
   storing at the very same moment can overshoot the *global* budget by about one entry each,
   until their next store (the same on one server and on a cluster: one algorithm). A crash
   between a tenant script and its ledger call leaves that tenant's row behind until its next
   script; :meth:`Books.rebuild` recomputes every row from the tenants' own books (a lost ledger).
3. Expired entries are reclaimed on the storing tenant's slot in the store script, and on
   another tenant's slot when the ledger says that tenant's earliest entry has expired.

The Lua below is a library: each cache's scripts start with :data:`BUDGET_LUA` and define a
``forget`` function that removes the entry itself (its key, and for the semantic cache its scope's
index); the library does the accounting. Every bookkeeping key is passed in KEYS (``KEYS[1..5]``:
:func:`tenant_keys`). The entries a script evicts are found inside it (in the rank zset), so
they cannot be declared beforehand; they carry the tenant's tag, so they are in the script's slot.
The tenant is read from the entry key, ``<namespace>.{<tenant>}:...`` (:mod:`caches.keys`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
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
    """The tenant part of ``<namespace>.{<tenant>}:...`` (as the Lua reads it); the braces of the
    hash tag are not part of it (keys from before the tags, ``{namespace}.{tenant}:``, read too)."""
    head = key.split(":", 1)[0]
    if "." not in head:
        return "_"
    part = head.split(".", 1)[1]
    return part[1:-1] if part.startswith("{") and part.endswith("}") else part


def tenant_keys(prefix: str, tenant: str) -> list[str]:
    """The tenant's bookkeeping keys, in the order the scripts take them (KEYS[1..5]); ``tenant``
    as it appears inside keys (already :func:`safe_part`)."""
    tk = f"{prefix}.{{{tenant}}}"
    return [f"{tk}:sizes", f"{tk}:expiry", f"{tk}:rank", f"{tk}:bytes", f"{tk}:seq"]


def ledger_keys(prefix: str) -> list[str]:
    """The global ledger's keys (one slot: ``{prefix}`` is their hash tag), in script order."""
    lk = f"{{{prefix}}}"
    return [f"{lk}:tenants:bytes", f"{lk}:tenants:entries", f"{lk}:tenants:expiry", f"{lk}:bytes",
            f"{lk}:entries", f"{lk}:evictions", f"{lk}:tenants:seq"]


# Positions in ledger_keys().
LEDGER_BYTES, LEDGER_ENTRIES, LEDGER_EVICTIONS = 3, 4, 5


def lua_source(name: str) -> str:
    """A script from caches/lua/ (package data): Lua in .lua files, read by editors and linters as Lua."""
    return resources.files("caches").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


# The library. Locals only: each script that includes it stays self-contained. KEYS[1..5]: the
# tenant's sizes hash, expiry zset, rank zset, byte total, report sequence. Every script ends
# with bk_report().
BUDGET_LUA = lua_source("budget")

# Forget the accounting of entries already deleted (purges, deletes). KEYS: tenant (5); ARGV: entries.
FORGET_SCRIPT = BUDGET_LUA + """
for i = 1, #ARGV do bk_forget(ARGV[i]) end
return bk_report()
"""


def shrink_script(forget_lua: str) -> str:
    """Evict for the global budget on one tenant's slot (KEYS: tenant (5); ARGV: now_ms, reclaim
    limit, entry to spare, entries, bytes); ``forget_lua`` defines ``forget(member)`` and may
    fill a table ``removed`` that the script returns after the report."""
    return BUDGET_LUA + "local removed = {}\n" + forget_lua + """
bk_reclaim(tonumber(ARGV[1]), tonumber(ARGV[2]), forget)
bk_shrink(ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), forget)
return bk_report(removed)
"""


# The ledger (KEYS: ledger_keys). ARGV: now_ms, tenant reported, its bytes, its entries, its
# earliest expiry (-1: none), evictions, global entries, global bytes (-1 = unbounded), expired
# tenants to list, the storing tenant (it gives way whenever it is among the biggest; '' for
# none), the report's sequence number (older than the row's: the totals are ignored).
# Returns: the tenant to give way (false: none), entries and bytes it should shed, then tenants
# whose earliest entry has expired (their bytes are still counted).
LEDGER_SCRIPT = lua_source("budget_ledger")

# Rebuild the ledger's rows of one tenant from its own books (KEYS: tenant (5) - read only here;
# the client writes the ledger): returns entries, bytes, earliest expiry, report sequence (-1: none).
_TENANT_TOTALS = lua_source("budget_tenant_totals")


def chunks(items: Iterable[T], size: int = MAX_KEYS_PER_SCRIPT) -> Iterator[list[T]]:
    page: list[T] = []
    for item in items:
        page.append(item)
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


@dataclass
class Report:
    """What a tenant script changed (deltas), the tenant's totals after it (what the ledger
    takes), its number among the tenant's reports, and what the script returned besides."""

    dbytes: int = 0
    dentries: int = 0
    earliest: int = -1
    evictions: int = 0
    bytes: int = 0
    entries: int = 0
    seq: int = -1
    extra: list[Any] = field(default_factory=list)

    FIELDS = 7  # values bk_report() puts before the script's own

    @classmethod
    def of(cls, reply: Sequence[Any]) -> Report:
        return cls(*(int(v) for v in reply[: cls.FIELDS]), extra=list(reply[cls.FIELDS :]))

    def ledger_args(self, tenant: str, now_ms: int, *, limits: Sequence[int] = (-1, -1), expired: int = 0,
                    storing: str = "") -> list[Any]:
        """The ledger script's ARGV for this report (LEDGER_SCRIPT)."""
        return [now_ms, tenant, self.bytes, self.entries, self.earliest, self.evictions, limits[0], limits[1],
                expired, storing, self.seq]


# Rounds of "apply to the ledger, evict or reclaim on a tenant's slot" per store: each round
# sheds at least one entry, and a store adds one, so a few rounds restore the budget.
MAX_ROUNDS = 64
# Other tenants whose expired entries one store reclaims.
RECLAIM_TENANTS = 2


class Books:
    """One cache's bookkeeping: per-tenant books (atomic with its entries, in the cache's own
    scripts) and the global ledger (see the module note). ``forget_lua`` is the cache's Lua
    ``forget(member)`` (it removes the entry and calls ``bk_forget``)."""

    def __init__(self, client: redis.Redis, prefix: str, budget: Budget, forget_lua: str, *,
                 reclaim_limit: int) -> None:
        self.client = client
        self.prefix = prefix
        self.budget = budget
        self.reclaim_limit = reclaim_limit
        self.ledger = ledger_keys(prefix)
        self._ledger = client.register_script(LEDGER_SCRIPT)
        self._shrink = client.register_script(shrink_script(forget_lua))
        self._forget = client.register_script(FORGET_SCRIPT)
        self._totals = client.register_script(_TENANT_TOTALS)

    def keys(self, tenant: str) -> list[str]:
        return tenant_keys(self.prefix, tenant)

    def settle(self, tenant: str, report: Report, spare: str = "", now_ms: int | None = None) -> list[Any]:
        """Apply a tenant script's report to the ledger, then evict (max-min) and reclaim until
        the global budget holds; returns the extra values of every script run here."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        limits = self.budget.lua_args()
        storing = tenant
        extra: list[Any] = []
        done: set[str] = set()
        for _ in range(MAX_ROUNDS):
            reply = self._ledger(keys=self.ledger, args=report.ledger_args(
                tenant, now_ms, limits=limits[2:], expired=RECLAIM_TENANTS + len(done), storing=storing))
            victim, need_entries, need_bytes = reply[0], int(reply[1]), int(reply[2])
            expired = [t for t in (_text(x) for x in reply[3:]) if t not in done]
            if expired:  # reclaiming frees room for nothing: before any eviction
                tenant, spare_now, need_entries, need_bytes = expired[0], "", 0, 0
                done.add(tenant)
            elif victim:
                tenant = _text(victim)
                spare_now = spare if tenant == storing else ""
            else:
                return extra
            report = Report.of(self._shrink(keys=self.keys(tenant), args=[
                now_ms, self.reclaim_limit, spare_now, need_entries, need_bytes]))
            extra += report.extra
            if not expired and report.dentries == 0:
                # nothing left to evict there (the ledger was off): apply and stop
                break
        self._ledger(keys=self.ledger, args=report.ledger_args(tenant, now_ms))
        return extra

    def forget(self, members: Sequence[bytes | str]) -> int:
        """Forget the accounting of ``members`` (already deleted), per tenant and in chunks;
        returns bytes freed."""
        by_tenant: dict[str, list[str]] = {}
        for m in members:
            k = _text(m)
            by_tenant.setdefault(tenant_of(k), []).append(k)
        freed = 0
        for tenant, keys in by_tenant.items():
            for page in chunks(keys):
                report = Report.of(self._forget(keys=self.keys(tenant), args=page))
                self._ledger(keys=self.ledger, args=report.ledger_args(tenant, 0))
                freed -= report.dbytes
        return freed

    def rebuild(self, tenants: Iterable[str]) -> None:
        """Recompute the ledger from the tenants' own books (a ledger lost or never written)."""
        rows = [(t, *(int(v) for v in self._totals(keys=self.keys(t)))) for t in tenants]
        tb, te, tx, b, e, _, ts = self.ledger
        pipe = self.client.pipeline(transaction=False)
        for key in (tb, te, tx, ts):
            pipe.delete(key)
        pipe.set(b, sum(r[2] for r in rows))
        pipe.set(e, sum(r[1] for r in rows))
        for t, entries, size, earliest, seq in rows:
            pipe.hset(ts, t, seq)
            if entries > 0:
                pipe.zadd(te, {t: entries})
                pipe.zadd(tb, {t: size})
                if earliest >= 0:
                    pipe.zadd(tx, {t: earliest})
        pipe.execute()


def usage(client: redis.Redis, prefix: str, tenant: str | None = None) -> dict[str, int]:
    """Entries and bytes counted globally (the ledger), or for one tenant (its own books);
    raises Redis errors."""
    pipe = client.pipeline(transaction=False)
    if tenant is None:
        ledger = ledger_keys(prefix)
        pipe.get(ledger[LEDGER_ENTRIES])
        pipe.get(ledger[LEDGER_BYTES])
    else:
        sizes, _, _, size_key, _ = tenant_keys(prefix, safe_part(tenant))
        pipe.hlen(sizes)
        pipe.get(size_key)
    entries, size = pipe.execute()
    return {"entries": int(entries or 0), "bytes": int(size or 0)}
