"""RAM tier: Redis, shared by every replica of the app.

Why these choices:
- One round trip per batch: MGET for reads, a Lua script for writes and deletes (the script also
  keeps a per-key size hash and a byte total, so `size_bytes` is the cluster-wide logical size
  without a SCAN; bytes = len(key) + len(value), Redis' own per-key overhead is not counted).
- Failure is normal: any Redis error (connection, timeout, OOM, BUSY, a script error) becomes
  `TierUnavailable` (callers degrade to the tiers below); the breaker and the client factory are
  caches/redis_client.py's, shared by every cache. redis-py drops a broken connection from its
  pool, so the first call after the breaker reopens reconnects by itself.
- Retries are off in the client: the tiered cache has a better fallback (the next tier) than
  waiting for Redis.
- Scripts travel by EVALSHA with an automatic reload (redis-py `Script`), so a restarted, empty
  Redis works without anyone re-registering them.
- Not Redis-Cluster ready: the scripts touch keys not declared in KEYS (a single shard is fine).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from caches import metrics
from caches.redis_client import REDIS_ERRORS, RETRY_AFTER_S, Breaker, make_client
from caches.tiers.base import TierStats, TierUnavailable

__all__ = ["MAX_KEYS_PER_CALL", "REDIS_ERRORS", "RETRY_AFTER_S", "RedisTier", "make_client"]

# Keep single commands bounded: one huge MGET blocks the (single-threaded) server for everyone.
MAX_KEYS_PER_CALL = 1000

# Shared by the write scripts: one value written with its size booked in the sizes hash
# (KEYS[1]), one key deleted with its size given back; each returns the byte delta.
_BOOKKEEPING = """
local function put_one(k, v, ttl)
  if ttl > 0 then redis.call('SET', k, v, 'PX', ttl) else redis.call('SET', k, v) end
  local n = #k + #v
  local old = tonumber(redis.call('HGET', KEYS[1], k) or '0')
  redis.call('HSET', KEYS[1], k, n)
  return n - old
end
local function delete_one(k)
  redis.call('DEL', k)
  local old = redis.call('HGET', KEYS[1], k)
  if not old then return 0 end
  redis.call('HDEL', KEYS[1], k)
  return -tonumber(old)
end
"""

# Admitted values in, displaced values out, one round trip: ARGV ttl_ms, n_puts, puts..., deletes...
_PUT_DELETE = _BOOKKEEPING + """
local ttl, nput = tonumber(ARGV[1]), tonumber(ARGV[2])
local delta = 0
for i = 3, 2 + 2 * nput, 2 do
  delta = delta + put_one(ARGV[i], ARGV[i + 1], ttl)
end
for i = 3 + 2 * nput, #ARGV do
  delta = delta + delete_one(ARGV[i])
end
return redis.call('INCRBY', KEYS[2], delta)
"""

# The same with a generation compare per put (caches/generations.py): ARGV ttl_ms, n_puts, then
# per put: key, value, its generation counter's key, the generation the value was read at; then
# deletes. A put lands only if the counter still holds that generation, atomically with the
# write (a bump between a separate compare and the write would let an old row in). Returns the
# byte total, then the keys refused.
_PUT_DELETE_CHECKED = _BOOKKEEPING + """
local ttl, nput = tonumber(ARGV[1]), tonumber(ARGV[2])
local delta, refused = 0, {}
local last = 2 + 4 * nput
for i = 3, last, 4 do
  if tonumber(redis.call('GET', ARGV[i + 2]) or '0') == tonumber(ARGV[i + 3]) then
    delta = delta + put_one(ARGV[i], ARGV[i + 1], ttl)
  else
    refused[#refused + 1] = ARGV[i]
  end
end
for i = last + 1, #ARGV do
  delta = delta + delete_one(ARGV[i])
end
table.insert(refused, 1, redis.call('INCRBY', KEYS[2], delta))
return refused
"""

_DELETE = """
local ttl, nput = tonumber(ARGV[1]), tonumber(ARGV[2])
local delta = 0
for i = 3, 2 + 2 * nput, 2 do
  local k, v = ARGV[i], ARGV[i + 1]
  if ttl > 0 then redis.call('SET', k, v, 'PX', ttl) else redis.call('SET', k, v) end
  local n = #k + #v
  local old = tonumber(redis.call('HGET', KEYS[1], k) or '0')
  redis.call('HSET', KEYS[1], k, n)
  delta = delta + n - old
end
for i = 3 + 2 * nput, #ARGV do
  local k = ARGV[i]
  redis.call('DEL', k)
  local old = redis.call('HGET', KEYS[1], k)
  if old then
    delta = delta - tonumber(old)
    redis.call('HDEL', KEYS[1], k)
  end
end
return redis.call('INCRBY', KEYS[2], delta)
"""

# The same with a generation compare per put (caches/generations.py): ARGV ttl_ms, n_puts, then
# per put: key, value, its generation counter's key, the generation the value was read at; then
# deletes. A put lands only if the counter still holds that generation, atomically with the
# write (a bump between a separate compare and the write would let an old row in). Returns the
# byte total, then the keys refused.
_PUT_DELETE_CHECKED = """
local ttl, nput = tonumber(ARGV[1]), tonumber(ARGV[2])
local delta, refused = 0, {}
local last = 2 + 4 * nput
for i = 3, last, 4 do
  local k, v = ARGV[i], ARGV[i + 1]
  if tonumber(redis.call('GET', ARGV[i + 2]) or '0') == tonumber(ARGV[i + 3]) then
    if ttl > 0 then redis.call('SET', k, v, 'PX', ttl) else redis.call('SET', k, v) end
    local n = #k + #v
    local old = tonumber(redis.call('HGET', KEYS[1], k) or '0')
    redis.call('HSET', KEYS[1], k, n)
    delta = delta + n - old
  else
    refused[#refused + 1] = k
  end
end
for i = last + 1, #ARGV do
  local k = ARGV[i]
  redis.call('DEL', k)
  local old = redis.call('HGET', KEYS[1], k)
  if old then
    delta = delta - tonumber(old)
    redis.call('HDEL', KEYS[1], k)
  end
end
table.insert(refused, 1, redis.call('INCRBY', KEYS[2], delta))
return refused
"""

_DELETE = """
local delta, n = 0, 0
for i = 1, #ARGV do
  local k = ARGV[i]
  n = n + redis.call('DEL', k)
  local old = redis.call('HGET', KEYS[1], k)
  if old then
    delta = delta + tonumber(old)
    redis.call('HDEL', KEYS[1], k)
  end
end
redis.call('DECRBY', KEYS[2], delta)
return n
"""


class RedisTier:
    """`get_many`/`put_many`/`delete_many` over a shared Redis; values are opaque bytes."""

    def __init__(self, url: str, *, name: str = "redis", meta_prefix: str = "tierserve:tier") -> None:
        self.name = name
        self.url = url
        self.client = make_client(url)
        self._sizes_key = f"{meta_prefix}:{name}:sizes"
        self._bytes_key = f"{meta_prefix}:{name}:bytes"
        self._delete = self.client.register_script(_DELETE)
        self._put_delete = self.client.register_script(_PUT_DELETE)
        self._put_delete_checked = self.client.register_script(_PUT_DELETE_CHECKED)
        self._stats = TierStats()
        self.breaker = Breaker(f"redis {url}")

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
    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        ns = metrics.namespace_of(keys[0])
        t0 = time.perf_counter()
        found: dict[str, bytes] = {}
        for chunk in _chunks(keys, MAX_KEYS_PER_CALL):
            values = self._call("MGET", self.client.mget, chunk, ns=ns)
            found.update({k: v for k, v in zip(chunk, values, strict=True) if v is not None})
        self.account_read(keys, found, time.perf_counter() - t0)
        return found

    def account_read(self, keys: list[str], found: dict[str, bytes], seconds: float) -> None:
        """Stats and metrics of one batched read (also used when a placement script read for us)."""
        metrics.record_read(self._stats, self.name, keys, found, seconds)

    def put_many(self, items: dict[str, bytes], ttl_s: float | None = None) -> None:
        if not items:
            return
        ttl_ms = int(ttl_s * 1000) if ttl_s else 0
        ns = metrics.namespace_of(next(iter(items)))
        for chunk in _chunks(list(items), MAX_KEYS_PER_CALL):
            args: list[Any] = [ttl_ms, len(chunk)]  # the put-and-delete script with nothing to delete
            for k in chunk:
                args += [k, items[k]]
            total = self._call("put", self._put_delete, [self._sizes_key, self._bytes_key], args, ns=ns)
            self._stats.bytes = int(total)
        metrics.BYTES.labels(tier=self.name, namespace="all").set(self._stats.bytes)

    def put_and_delete(self, items: dict[str, bytes], deletes: list[str], ttl_s: float | None = None) -> None:
        """Write `items` and delete `deletes` in one round trip (the placement's RAM-side moves)."""
        if len(items) + len(deletes) > MAX_KEYS_PER_CALL:
            self.put_many(items, ttl_s)
            self.delete_many(deletes)
            return
        if not items and not deletes:
            return
        args: list[Any] = [int(ttl_s * 1000) if ttl_s else 0, len(items)]
        for k, v in items.items():
            args += [k, v]
        args += deletes
        ns = metrics.namespace_of(next(iter(items)) if items else deletes[0])
        self._stats.bytes = int(self._call("put_delete", self._put_delete, [self._sizes_key, self._bytes_key], args, ns=ns))
        metrics.BYTES.labels(tier=self.name, namespace="all").set(self._stats.bytes)

    def put_checked(self, items: dict[str, bytes], deletes: list[str], expect: dict[str, tuple[str, int]],
                    ttl_s: float | None = None) -> list[str]:
        """Write `items`, each only while its generation counter (`expect[key]` = (counter key,
        generation)) holds that generation, and delete `deletes`; returns the keys refused."""
        if not items and not deletes:
            return []
        ttl_ms = int(ttl_s * 1000) if ttl_s else 0
        ns = metrics.namespace_of(next(iter(items)) if items else deletes[0])
        refused: list[str] = []
        puts, dels = list(items), list(deletes)
        while puts or dels:
            # Bounded calls: at most MAX_KEYS_PER_CALL keys each, puts first (the placement's order).
            chunk, puts = puts[:MAX_KEYS_PER_CALL], puts[MAX_KEYS_PER_CALL:]
            room = MAX_KEYS_PER_CALL - len(chunk)
            dchunk, dels = dels[:room], dels[room:]
            args: list[Any] = [ttl_ms, len(chunk)]
            for k in chunk:
                counter, generation = expect[k]
                args += [k, items[k], counter, generation]
            args += dchunk
            reply = self._call("put_checked", self._put_delete_checked, [self._sizes_key, self._bytes_key], args, ns=ns)
            self._stats.bytes = int(reply[0])
            refused += [r.decode() if isinstance(r, bytes) else str(r) for r in reply[1:]]
        metrics.BYTES.labels(tier=self.name, namespace="all").set(self._stats.bytes)
        return refused

    def delete_many(self, keys: list[str]) -> int:
        if not keys:
            return 0
        ns = metrics.namespace_of(keys[0])
        deleted = 0
        for chunk in _chunks(keys, MAX_KEYS_PER_CALL):
            deleted += int(self._call("delete", self._delete, [self._sizes_key, self._bytes_key], chunk, ns=ns))
        return deleted

    def size_bytes(self) -> int:
        try:
            raw = self._call("size", self.client.get, self._bytes_key)
        except TierUnavailable:
            return self._stats.bytes  # last known: a dashboard should not go blank on an outage
        self._stats.bytes = int(raw or 0)
        return self._stats.bytes

    def stats(self) -> TierStats:
        self.size_bytes()
        with contextlib.suppress(TierUnavailable):
            self._stats.entries = int(self._call("entries", self.client.hlen, self._sizes_key))
        return self._stats

    # -- maintenance ------------------------------------------------------------------------
    def scan_prefix(self, prefix: str, count: int = 1000) -> Iterator[str]:
        """Keys starting with prefix (SCAN, never KEYS: it does not block the server)."""
        # Listed inside the guarded call: a generator would raise its Redis errors unguarded.
        found = self._call("scan", lambda: list(self.client.scan_iter(f"{_glob_escape(prefix)}*", count)))
        for raw in found:
            yield raw.decode() if isinstance(raw, bytes) else raw

    def reconcile(self) -> int:
        """Forget the sizes of keys Redis expired (TTL) so the byte total stays honest."""
        gone: list[str] = []
        for raw_keys in _chunks([k.decode() for k in self.client.hkeys(self._sizes_key)], MAX_KEYS_PER_CALL):
            exists = self.client.pipeline(transaction=False)
            for k in raw_keys:
                exists.exists(k)
            gone += [k for k, e in zip(raw_keys, exists.execute(), strict=True) if not e]
        if gone:
            self.delete_many(gone)
        return len(gone)

    def close(self) -> None:
        self.client.close()


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
