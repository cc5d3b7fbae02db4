"""Per-entity generations: the guard that keeps an old row out of every tier after a write.

Why: a row read from the source of truth can be on its way into a tier while the source changes
under it (a read that straddles a user event), and a demotion can carry a RAM copy down to SSD
after the event dropped every copy. Deleting copies cannot win that race: the writer comes after
the delete. So every cached row carries the generation of its entity *as read before the row was
read from the source*, and:
- a write into RAM (fill, promotion) lands only if that generation is still the current one: one
  Lua script compares and writes atomically (caches/tiers/redis.py), so nothing can slip between
  the compare and the write;
- SSD (RocksDB, local) stores the generation with the value, and a read rejects (and deletes) a
  copy whose generation is not the current one: a demotion or a fill that lost the race leaves a
  dead entry behind, never a served one;
- a RAM copy is checked the same way on read (belt and braces: it closes the moment between an
  event's generation bump and its delete).
The writer of the source bumps the generation *after* its source write and *before* it deletes
the cached copies. A reader that saw the new generation therefore reads the new row from the
source (or later), and a row tagged with an older generation is never served again once the
bump is done (the event's 202).

Generations live in the RAM tier's Redis (the compare must be atomic with the write). A Redis
that restarts empty loses them all, and one may expire or be evicted (below). So a counter never
starts at 0: the first read or bump of a missing counter sets it to the
server's clock in microseconds (`START_LUA`), above every number any counter held before (fewer
than a million bumps a second per entity). A copy tagged before the restart (on a replica's SSD,
or on its way into RAM during the restart) then matches no current generation, whatever moment
it arrives: a restart cannot bring an old row back. (Before, every counter restarted at 0 and
the SSD copies tagged 0 matched again; the Recommender's check of Redis' run id, which drops its
SSD user rows, closed that only once it had run.)

For the same reason a counter may expire, or be evicted (`volatile-lru`, k8s/): it starts again
above every copy tagged with it, which then only miss. So a counter carries a TTL (`ttl_s`: the rows' own TTL),
given again by every bump and by the Recommender's reads of it: a counter outlives the copies it
tags while its entity is in use, and a flood of reads for ids nobody uses leaves no key for good.

When the counters cannot be read (Redis down), no tagged copy can be verified: the tiered cache
then asks the source first and falls back to an unverified SSD copy only when the source fails
too (degraded). Values filled meanwhile carry `UNKNOWN`, which never matches a real generation.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

import redis

from caches.redis_client import REDIS_ERRORS, ScriptBatch, mget

# Tag of a value filled while the generation could not be read: matches no real generation (>= 0).
UNKNOWN = -1

# A missing counter's first value: the server's clock in microseconds (the module note), exact as
# a Lua number (below 2^53 for another 250 years). KEYS[1]: the counter; ARGV[1]: its TTL in ms
# (0: none). The start both scripts share:
_START_IF_MISSING = """
local started = redis.call('EXISTS', KEYS[1]) == 0
if started then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[1], tonumber(t[1]) * 1000000 + tonumber(t[2]))
end
local ttl = tonumber(ARGV[1])
"""
# Read a counter, starting it (with its TTL) where it is missing; returns its value.
START_LUA = _START_IF_MISSING + """
if started and ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return redis.call('GET', KEYS[1])
"""
# Move a counter, starting it first where it is missing, and give it its TTL again (an event is
# activity); returns the new value.
BUMP_LUA = _START_IF_MISSING + """
local n = redis.call('INCR', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return n
"""


def counter_ttl_ms(ttl_s: float | None) -> int:
    """A counter's TTL for the scripts (0: none)."""
    return max(1, int(ttl_s * 1000)) if ttl_s else 0


def start_missing(client: redis.Redis, names: Sequence[str], ttl_s: float | None) -> list[int]:
    """Start the missing counters `names` (START_LUA), each with a TTL of `ttl_s`, and return
    their values: one script call each, sent together (a read's rare second round trip: a new
    entity, or a restarted Redis). Raises Redis errors."""
    script = client.register_script(START_LUA)
    batch = ScriptBatch(client)
    for name in names:
        batch.add(script, [name], [counter_ttl_ms(ttl_s)])
    return [int(v) for v in batch.execute()]


_TAG = struct.Struct("<q")
TAG_BYTES = _TAG.size


def frame(generation: int, value: bytes) -> bytes:
    return _TAG.pack(generation) + value


def unframe(raw: bytes) -> tuple[int, bytes]:
    """(generation, value) of a framed value; a value too short to carry a tag reads as UNKNOWN."""
    if len(raw) < TAG_BYTES:
        return UNKNOWN, raw
    return _TAG.unpack_from(raw)[0], raw[TAG_BYTES:]


def split_by_generation(
    found: dict[str, bytes], gens: dict[str, int] | None
) -> tuple[dict[str, bytes], dict[str, bytes], list[str]]:
    """(copies of the current generation, copies that cannot be verified, stale keys) of framed
    values read from a tier: with `gens` unknown nothing is verified; a copy of another
    generation is neither, and its key is stale."""
    if gens is None:
        return {}, dict(found), []
    current = {k: v for k, v in found.items() if unframe(v)[0] == gens[k]}
    return current, {}, [k for k in found if k not in current]


class GenerationsUnavailable(RuntimeError):
    """The counters could not be read or moved (Redis down or failing)."""


class Generations:
    """Counters in Redis, one per entity; `key_of` maps a cache key to its counter's Redis key
    (entities, not cache keys: a user's row under every model version shares one counter)."""

    def __init__(self, client: redis.Redis, key_of: Callable[[str], str],
                 redis_name: Callable[[str], str] | None = None, *, ttl_s: float | None = None) -> None:
        """`redis_name`: a counter's Redis name (on a Redis Cluster, the RAM tier's hash-tagged
        name, so a checked write and its counter are one slot: RedisTier.counter_name). `ttl_s`:
        a counter's TTL from its start or last bump (the module note; None: none)."""
        self.client = client
        self.key_of = key_of
        self.redis_name = redis_name or (lambda counter: counter)
        self.ttl_s = ttl_s
        self._bump = client.register_script(BUMP_LUA)

    def read(self, keys: Sequence[str]) -> dict[str, int]:
        """Current generation per cache key; one MGET (and one more round trip to start the
        counters that do not exist yet: see the module note)."""
        keys = list(keys)
        if not keys:
            return {}
        names = [self.redis_name(self.key_of(k)) for k in keys]
        try:
            raw = mget(self.client, names)  # per slot on a cluster
            missing = sorted({n for n, v in zip(names, raw, strict=True) if v is None})
            started = dict(zip(missing, start_missing(self.client, missing, self.ttl_s), strict=True)) if missing else {}
        except REDIS_ERRORS as exc:
            raise GenerationsUnavailable(f"generations unreadable: {type(exc).__name__}: {exc}") from exc
        return {k: int(v) if v is not None else started[n] for k, n, v in zip(keys, names, raw, strict=True)}

    def bump(self, keys: Sequence[str]) -> dict[str, int]:
        """Move the counters of the keys' entities (call it after the source write, before the
        deletes); returns the new generation per key."""
        counters = list(dict.fromkeys(self.key_of(k) for k in keys))
        if not counters:
            return {}
        try:
            batch = ScriptBatch(self.client)
            for c in counters:
                batch.add(self._bump, [self.redis_name(c)], [counter_ttl_ms(self.ttl_s)])
            new = dict(zip(counters, batch.execute(), strict=True))
        except REDIS_ERRORS as exc:
            raise GenerationsUnavailable(f"generations not moved: {type(exc).__name__}: {exc}") from exc
        return {k: int(new[self.key_of(k)]) for k in keys}
