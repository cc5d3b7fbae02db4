"""RAM tier: Redis, shared by every replica of the app.

Why these choices:
- One round trip per batch: a short Lua read for reads (GET and PTTL of each key), a Lua script
  for writes and deletes (the script also keeps a per-key size hash and a byte total, so
  `size_bytes` is the cluster-wide logical size without a SCAN; bytes = len(key) + len(value),
  Redis' own per-key overhead is not counted).
- Expiry travels with a value (caches/tiers/base.py): a read answers each value's absolute expiry
  (`TierRead.expires_at`, from its PTTL) and a write takes a TTL per value (`expires_at`, turned
  into the milliseconds left just before the script call: relative, so the app's and Redis'
  clocks need not agree). A value demoted to the SSD or promoted from it keeps the time it had
  left instead of a fresh TTL; one whose time is up by the write is deleted, not written.
- Failure is normal: any Redis error (connection, timeout, OOM, BUSY, a script error) becomes
  `TierUnavailable` (callers degrade to the tiers below); the breaker and the client factory are
  caches/redis_client.py's, shared by every cache. redis-py drops a broken connection from its
  pool, so the first call after the breaker reopens reconnects by itself.
- Retries are off in the client: the tiered cache has a better fallback (the next tier) than
  waiting for Redis.
- Scripts travel by EVALSHA with an automatic reload (redis-py `Script`), so a restarted, empty
  Redis works without anyone re-registering them.
- Redis Cluster: every key a script touches is declared in KEYS and shares one hash tag. On a
  cluster the tier is split into `CLUSTER_SHARDS` hash-tag groups `{meta_prefix:name#s}`; a key
  lives under its group's tag (`{...#s}key`), next to the group's own sizes hash and byte total
  (and the placement metadata, caches/admission/shared.py), so one script call is one slot. A
  key's group is `crc32(group_of(key)) % shards`: for generation-checked tiers `group_of` is
  the key's generation counter, and the counter lives in the same group (`counter_name`), so
  the compare-and-write stays one atomic script. Reads are one read script call per group, all
  of a node's calls in one pipeline (`ScriptBatch`). On one server there is one group and Redis
  names are the keys themselves, exactly as before.
"""

from __future__ import annotations

import contextlib
import os
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from caches import metrics
from caches.redis_client import (
    REDIS_ERRORS,
    RETRY_AFTER_S,
    Breaker,
    ScriptBatch,
    Sweep,
    is_cluster,
    make_client,
    scan_keys,
)
from caches.tiers.base import NO_EXPIRY, TierRead, TierStats, TierUnavailable

__all__ = ["MAX_KEYS_PER_CALL", "REDIS_ERRORS", "RETRY_AFTER_S", "RedisTier", "make_client", "shards_for"]

# Hash-tag groups per tier on a Redis Cluster (see the module note): enough to spread a tier over
# a few masters, few enough that a batch touches a handful of groups (one script call each).
CLUSTER_SHARDS = int(os.environ.get("TIERSERVE_TIER_SHARDS", "8"))
# Each group's placement gets budget / shards: below this many entries a group's W-TinyLFU
# (window + probation + protected) stops behaving like the whole budget's, so small budgets
# get fewer groups (one, for a test-sized budget).
MIN_ENTRIES_PER_SHARD = 64


def shards_for(budget_bytes: int, entry_bytes: int) -> int:
    """Hash-tag groups for a RAM budget on a cluster: CLUSTER_SHARDS, fewer for small budgets."""
    return max(1, min(CLUSTER_SHARDS, budget_bytes // max(1, MIN_ENTRIES_PER_SHARD * entry_bytes)))

# Keep single commands bounded: one huge read blocks the (single-threaded) server for everyone.
MAX_KEYS_PER_CALL = 1000

# The per-value TTL the write scripts take, in ms: > 0 expires in that many ms; these otherwise.
PX_NEVER = 0  # no expiry (the value had none, or the write gave no TTL)
PX_EXPIRED = -1  # its expiry has passed: the write deletes the key (an expired row is never moved)
# PTTL's answer for a key without an expiry.
PTTL_PERSISTENT = -1

# Each key's value and PTTL, read together (one atomic call: the PTTL is the value's own).
# KEYS: the Redis names. Returns value, pttl per key (nil, -2 for a key not held).
_READ = """
local out = {}
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  out[2 * i - 1] = v
  out[2 * i] = v and redis.call('PTTL', KEYS[i]) or -2
end
return out
"""

# Every key a script touches is in KEYS (Redis Cluster routes a call by its keys and refuses one
# whose keys span slots): KEYS[1] the sizes hash, KEYS[2] the byte total, then the value keys.
# Shared by the write scripts: one value written with its size booked in the sizes hash, one key
# deleted with its size given back; each returns the byte delta.
# A put's ttl is per value (PX_NEVER, PX_EXPIRED or the ms left): a value moved between tiers
# keeps the time it had left, so one batch holds values of different TTLs.
_BOOKKEEPING = """
local function delete_one(k)
  local n = redis.call('DEL', k)
  local old = redis.call('HGET', KEYS[1], k)
  if not old then return 0, n end
  redis.call('HDEL', KEYS[1], k)
  return -tonumber(old), n
end
local function put_one(k, v, ttl)
  -- expired before it landed: the key holds no live value now (any older copy goes too)
  if ttl < 0 then
    local d = delete_one(k)
    return d
  end
  if ttl > 0 then redis.call('SET', k, v, 'PX', ttl) else redis.call('SET', k, v) end
  local n = #k + #v
  -- a cluster's hash tag is not part of the cache key: bytes stay len(key) + len(value)
  if string.byte(k, 1) == 123 then n = n - (string.find(k, '}', 1, true) or 0) end
  local old = tonumber(redis.call('HGET', KEYS[1], k) or '0')
  redis.call('HSET', KEYS[1], k, n)
  return n - old
end
"""

# Admitted values in, displaced values out, one round trip.
# KEYS: sizes, bytes, the n_puts keys to write, then the keys to delete.
# ARGV: n_puts, then per put: value, ttl_ms. Returns the byte total.
_PUT_DELETE = _BOOKKEEPING + """
local nput = tonumber(ARGV[1])
local delta = 0
for i = 1, nput do
  delta = delta + put_one(KEYS[2 + i], ARGV[2 * i], tonumber(ARGV[1 + 2 * i]))
end
for i = 3 + nput, #KEYS do
  delta = delta + delete_one(KEYS[i])
end
return redis.call('INCRBY', KEYS[2], delta)
"""

# The same with a generation compare per put (caches/generations.py). A put lands only if its
# counter still holds the generation the value was read at, atomically with the write (a bump
# between a separate compare and the write would let an old row in).
# KEYS: sizes, bytes, then per put: its key and its generation counter's key; then deletes.
# ARGV: n_puts, then per put: value, generation, ttl_ms. Returns the byte total, then the keys refused.
_PUT_DELETE_CHECKED = _BOOKKEEPING + """
local nput = tonumber(ARGV[1])
local delta, refused = 0, {}
for i = 1, nput do
  local k, counter = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  if tonumber(redis.call('GET', counter) or '0') == tonumber(ARGV[3 * i]) then
    delta = delta + put_one(k, ARGV[3 * i - 1], tonumber(ARGV[1 + 3 * i]))
  else
    refused[#refused + 1] = k
  end
end
for i = 3 + 2 * nput, #KEYS do
  delta = delta + delete_one(KEYS[i])
end
table.insert(refused, 1, redis.call('INCRBY', KEYS[2], delta))
return refused
"""

# Forget the sizes of values that are gone (expired by TTL): checked and forgotten in one atomic
# call, so a value written again meanwhile (by any replica) keeps its size.
# KEYS: sizes, bytes, then the Redis names to check. Returns {how many forgotten, the byte total}.
_RECONCILE = """
local delta, n = 0, 0
for i = 3, #KEYS do
  local k = KEYS[i]
  if redis.call('EXISTS', k) == 0 then
    local old = redis.call('HGET', KEYS[1], k)
    if old then
      redis.call('HDEL', KEYS[1], k)
      delta, n = delta - tonumber(old), n + 1
    end
  end
end
return {n, redis.call('INCRBY', KEYS[2], delta)}
"""
# Sizes-hash fields one reconcile step reads (HSCAN COUNT) and checks: bounds each call's run time
# on the single-threaded server (a small hash, listpack-encoded, comes back whole: still small).
RECONCILE_CHUNK = 256

# KEYS: sizes, bytes, then the keys to delete. Returns how many existed.
_DELETE = _BOOKKEEPING + """
local delta, n = 0, 0
for i = 3, #KEYS do
  local d, existed = delete_one(KEYS[i])
  delta, n = delta + d, n + existed
end
redis.call('INCRBY', KEYS[2], delta)
return n
"""


class RedisTier:
    """`get_many`/`put_many`/`delete_many` over a shared Redis; values are opaque bytes.

    On a Redis Cluster the tier is split into `shards` hash-tag groups (see the module note):
    a key's Redis name is `{tag}key`, where the tag is this tier's and the shard of
    `group_of(key)`; everything one script call touches is in one shard. On one server there is
    one shard and the Redis name is the key itself."""

    def __init__(self, url: str, *, name: str = "redis", meta_prefix: str = "tierserve:tier",
                 shards: int | None = None, group_of: Callable[[str], str] | None = None,
                 cache: str = "all") -> None:
        self.name = name
        self.cache = cache  # whose bytes these are on the tier_bytes gauge (one series per cache)
        self.url = url
        self.client = make_client(url)
        self.tagged = is_cluster(self.client)
        self.shards = max(1, (shards or CLUSTER_SHARDS) if self.tagged else 1)
        self.group_of = group_of
        self.base = base = f"{meta_prefix}:{name}"
        if self.tagged:
            self._meta = [(f"{self.tag(s)}:sizes", f"{self.tag(s)}:bytes") for s in range(self.shards)]
        else:
            self._meta = [(f"{base}:sizes", f"{base}:bytes")]
        self._sizes_key, self._bytes_key = self._meta[0]
        self._shard_bytes = [0] * self.shards
        self._read = self.client.register_script(_READ)
        self._delete = self.client.register_script(_DELETE)
        self._put_delete = self.client.register_script(_PUT_DELETE)
        self._put_delete_checked = self.client.register_script(_PUT_DELETE_CHECKED)
        self._reconcile = self.client.register_script(_RECONCILE)
        # Where the next reconcile_step resumes: a shard and the HSCAN cursor of its sizes hash.
        self._reconcile_at = Sweep(self.shards)
        self._stats = TierStats()
        self.breaker = Breaker(f"redis {url}")

    # -- key placement (Redis Cluster) ------------------------------------------------------
    def tag(self, shard: int) -> str:
        """The hash tag of a shard ('' on one server): every Redis name of the shard starts with it."""
        return "{" + f"{self.base}#{shard}" + "}" if self.tagged else ""

    def shard_of(self, key: str) -> int:
        if self.shards == 1:
            return 0
        group = self.group_of(key) if self.group_of is not None else key
        return zlib.crc32(group.encode()) % self.shards

    def physical(self, key: str) -> str:
        """The Redis name of a cache key."""
        return self.tag(self.shard_of(key)) + key if self.tagged else key

    def counter_name(self, counter: str) -> str:
        """The Redis name of a generation counter: in the shard of the keys it guards (they are
        grouped by it: `group_of` is the counter's name), so a checked write is one slot."""
        if not self.tagged:
            return counter
        return self.tag(zlib.crc32(counter.encode()) % self.shards if self.shards > 1 else 0) + counter

    def bookkeeping(self, shard: int) -> tuple[str, str]:
        """The shard's sizes hash and byte total (what the write scripts take as KEYS[1], KEYS[2];
        in the shard's slot)."""
        return self._meta[shard]

    def logical(self, name: str) -> str:
        """The cache key of a Redis name (the tag stripped)."""
        return name[name.index("}") + 1:] if self.tagged and name.startswith("{") else name

    def by_shard(self, keys: Sequence[str]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for k in keys:
            out.setdefault(self.shard_of(k), []).append(k)
        return out

    # -- availability -----------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self.breaker.available

    def _call(self, op: str, fn: Any, *args: Any, ns: str = "-") -> Any:
        """Every Redis error (connection, OOM, BUSY, a script error) is `RedisUnavailable`, a
        `TierUnavailable`: the tiered cache degrades to the tiers below, never raises it on."""
        try:
            return self.breaker.call(op, fn, *args)
        except TierUnavailable:
            self._stats.errors += 1
            metrics.ERRORS.labels(tier=self.name, namespace=ns).inc()
            raise

    def ping(self) -> bool:
        try:
            return bool(self._call("ping", self.client.ping))
        except TierUnavailable:
            return False

    # -- the protocol -----------------------------------------------------------------------
    def get_many(self, keys: list[str]) -> TierRead:
        """The values held, with each one's absolute expiry (`TierRead.expires_at`, from its PTTL):
        what a demotion to the SSD must keep."""
        if not keys:
            return TierRead()
        ns = metrics.namespace_of(keys[0])
        t0 = time.perf_counter()
        groups = [keys] if self.shards == 1 else list(self.by_shard(keys).values())
        calls = [chunk for group in groups for chunk in _chunks(group, MAX_KEYS_PER_CALL)]
        # Taken before the call: the server measures each PTTL later than this, so now + PTTL is
        # never later than the value's real expiry (a moved copy can only expire early, not late).
        now = time.time()
        replies = self._call("get", self._read_calls, calls, ns=ns)
        found = TierRead()
        expires = found.expires_at
        for chunk, reply in zip(calls, replies, strict=True):
            for k, v, pttl in zip(chunk, reply[::2], reply[1::2], strict=True):
                if v is not None:
                    found[k] = v
                    expires[k] = NO_EXPIRY if pttl == PTTL_PERSISTENT else now + pttl / 1000
        if len(groups) > 1:  # in the caller's order, as one server answers
            found = TierRead({k: found[k] for k in keys if k in found}, expires)
        self.account_read(keys, found, time.perf_counter() - t0)
        return found

    def _read_calls(self, calls: list[list[str]]) -> list[Any]:
        """The read script once per chunk of one shard's keys: on one server a plain EVALSHA each
        (a pipeline of scripts would ask SCRIPT EXISTS first, a second round trip); on a cluster
        all of them in one pipeline per node (a cluster pipeline refuses scripts: ScriptBatch)."""
        if not self.tagged:
            return [self._read(keys=chunk) for chunk in calls]  # one server: names are the keys
        batch = ScriptBatch(self.client)
        for chunk in calls:
            batch.add(self._read, [self.physical(k) for k in chunk], [])
        return batch.execute()

    def account_read(self, keys: list[str], found: dict[str, bytes], seconds: float) -> None:
        """Stats and metrics of one batched read (also used when a placement script read for us)."""
        metrics.record_read(self._stats, self.name, keys, found, seconds)

    def _book(self, shard: int, total: Any) -> None:
        self._shard_bytes[shard] = int(total)
        self._stats.bytes = sum(self._shard_bytes)

    def put_many(self, items: dict[str, bytes], ttl_s: float | None = None, *,
                 expires_at: Mapping[str, float] | None = None) -> None:
        if not items:
            return
        self.put_and_delete(items, [], ttl_s, expires_at=expires_at)

    def put_and_delete(self, items: dict[str, bytes], deletes: list[str], ttl_s: float | None = None, *,
                       expires_at: Mapping[str, float] | None = None) -> None:
        """Write `items` and delete `deletes`, one round trip per shard and MAX_KEYS_PER_CALL keys
        (the placement's RAM-side moves). Each value expires `ttl_s` from now (None: never), or at
        its own absolute expiry in `expires_at` when it has one there (see `_px`)."""
        if not items and not deletes:
            return
        ns = metrics.namespace_of(next(iter(items)) if items else deletes[0])
        for shard, chunk, dchunk in self._calls(items, deletes):
            sizes, total = self._meta[shard]
            keys = [sizes, total, *(self.physical(k) for k in chunk), *(self.physical(k) for k in dchunk)]
            px = _px(chunk, ttl_s, expires_at)
            args: list[Any] = [len(chunk)]
            for k in chunk:
                args += [items[k], px[k]]
            self._book(shard, self._call("put_delete", self._put_delete, keys, args, ns=ns))
        metrics.BYTES.labels(tier=self.name, namespace=self.cache).set(self._stats.bytes)

    def put_checked(self, items: dict[str, bytes], deletes: list[str], expect: dict[str, tuple[str, int]],
                    ttl_s: float | None = None, *, expires_at: Mapping[str, float] | None = None) -> list[str]:
        """Write `items`, each only while its generation counter (`expect[key]` = (counter key,
        generation)) holds that generation, and delete `deletes`; returns the keys refused.
        TTLs as `put_and_delete`'s."""
        if not items and not deletes:
            return []
        ns = metrics.namespace_of(next(iter(items)) if items else deletes[0])
        refused: list[str] = []
        for shard, chunk, dchunk in self._calls(items, deletes):
            sizes, total = self._meta[shard]
            keys: list[str] = [sizes, total]
            px = _px(chunk, ttl_s, expires_at)
            args: list[Any] = [len(chunk)]
            for k in chunk:
                counter, generation = expect[k]
                name, counter_name = self.physical(k), self.counter_name(counter)
                if self.tagged and name[: name.index("}")] != counter_name[: counter_name.index("}")]:
                    raise ValueError(f"{k!r}: group_of must name its generation counter {counter!r} (one slot)")
                keys += [name, counter_name]
                args += [items[k], generation, px[k]]
            keys += [self.physical(k) for k in dchunk]
            reply = self._call("put_checked", self._put_delete_checked, keys, args, ns=ns)
            self._book(shard, reply[0])
            refused += [self.logical(r.decode() if isinstance(r, bytes) else str(r)) for r in reply[1:]]
        metrics.BYTES.labels(tier=self.name, namespace=self.cache).set(self._stats.bytes)
        return refused

    def _calls(self, items: dict[str, bytes], deletes: list[str]) -> Iterator[tuple[int, list[str], list[str]]]:
        """(shard, keys to write, keys to delete) per script call: one shard each, at most
        MAX_KEYS_PER_CALL keys, puts first (the placement's order)."""
        puts, dels = self.by_shard(list(items)), self.by_shard(deletes)
        for shard in sorted(set(puts) | set(dels)):
            p, d = puts.get(shard, []), dels.get(shard, [])
            while p or d:
                chunk, p = p[:MAX_KEYS_PER_CALL], p[MAX_KEYS_PER_CALL:]
                dchunk, d = d[: MAX_KEYS_PER_CALL - len(chunk)], d[MAX_KEYS_PER_CALL - len(chunk):]
                yield shard, chunk, dchunk

    def delete_many(self, keys: list[str]) -> int:
        if not keys:
            return 0
        ns = metrics.namespace_of(keys[0])
        return sum(self._delete_names(shard, [self.physical(k) for k in ks], ns)
                   for shard, ks in self.by_shard(keys).items())

    def _delete_names(self, shard: int, names: list[str], ns: str = "-") -> int:
        deleted = 0
        for chunk in _chunks(names, MAX_KEYS_PER_CALL):
            deleted += int(self._call("delete", self._delete, [*self._meta[shard], *chunk], [], ns=ns))
        return deleted

    def size_bytes(self) -> int:
        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for _, total in self._meta:
                pipe.get(total)
            return pipe.execute()

        try:
            raw = self._call("size", read)
        except TierUnavailable:
            return self._stats.bytes  # last known: a dashboard should not go blank on an outage
        self._shard_bytes = [int(v or 0) for v in raw]
        self._stats.bytes = sum(self._shard_bytes)
        return self._stats.bytes

    def stats(self) -> TierStats:
        self.size_bytes()

        def entries() -> int:
            pipe = self.client.pipeline(transaction=False)
            for sizes, _ in self._meta:
                pipe.hlen(sizes)
            return sum(int(n) for n in pipe.execute())

        with contextlib.suppress(TierUnavailable):
            self._stats.entries = int(self._call("entries", entries))
        return self._stats

    # -- maintenance ------------------------------------------------------------------------
    def scan_prefix(self, prefix: str, count: int = 1000) -> Iterator[str]:
        """Keys starting with prefix (SCAN, never KEYS: it does not block the server); on a
        cluster, every primary's keys of every shard of this tier."""
        pattern = _glob_escape(prefix) + "*"
        if self.tagged:
            pattern = _glob_escape("{" + self.base + "#") + "*" + _glob_escape("}") + pattern
        # Listed inside the guarded call: a generator would raise its Redis errors unguarded.
        found = self._call("scan", lambda: list(scan_keys(self.client, pattern, count)))
        for raw in found:
            yield self.logical(raw.decode() if isinstance(raw, bytes) else raw)

    def reconcile(self) -> int:
        """Forget the sizes of keys Redis expired (TTL) so the byte total stays honest: a whole
        pass over every shard, in bounded steps. Returns how many were forgotten."""
        n = 0
        for shard in range(self.shards):
            cursor = 0
            while True:
                cursor, forgotten = self._reconcile_slice(shard, cursor)
                n += forgotten
                if cursor == 0:
                    break
        return n

    def reconcile_step(self, count: int = RECONCILE_CHUNK) -> int:
        """One bounded slice of `reconcile`: one HSCAN of ~`count` fields of one shard's sizes
        hash and one script call that forgets the gone ones, resumed where the last step
        stopped (the next shard once a shard's cursor wraps). Raises TierUnavailable."""
        at = self._reconcile_at
        cursor, forgotten = self._reconcile_slice(at.group, at.cursor, count)
        at.advance(cursor)
        return forgotten

    @property
    def reconcile_wrapped(self) -> bool:
        """True when the last reconcile_step finished a sweep of every shard."""
        return self._reconcile_at.wrapped

    def _reconcile_slice(self, shard: int, cursor: int, count: int = RECONCILE_CHUNK) -> tuple[int, int]:
        """(next cursor, sizes forgotten) for one HSCAN page; every call through the breaker."""
        sizes, _ = self._meta[shard]
        cursor, fields = self._call("reconcile", self.client.hscan, sizes, cursor, None, count)
        names = [f.decode() if isinstance(f, bytes) else str(f) for f in fields]
        forgotten = 0
        for chunk in _chunks(names, MAX_KEYS_PER_CALL):
            n, total = self._call("reconcile", self._reconcile, [*self._meta[shard], *chunk], [])
            self._book(shard, total)
            forgotten += int(n)
        if forgotten:
            metrics.BYTES.labels(tier=self.name, namespace=self.cache).set(self._stats.bytes)
        return int(cursor), forgotten

    def close(self) -> None:
        self.client.close()


def _px(keys: list[str], ttl_s: float | None, expires_at: Mapping[str, float] | None) -> dict[str, int]:
    """Each value's TTL for the write scripts (ms): the ms left to its absolute expiry in
    `expires_at` when it has one there, else `ttl_s`'s. Computed just before the call, rounded
    down (never a ms more than the value had left); PX_EXPIRED when none is left."""
    default = int(ttl_s * 1000) if ttl_s else PX_NEVER
    if not expires_at:
        return dict.fromkeys(keys, default)
    now = time.time()
    out: dict[str, int] = {}
    for k in keys:
        expiry = expires_at.get(k)
        if expiry is None:
            out[k] = default
        elif expiry == NO_EXPIRY:
            out[k] = PX_NEVER
        else:
            left = int((expiry - now) * 1000)
            out[k] = left if left > 0 else PX_EXPIRED
    return out


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
