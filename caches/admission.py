"""Access counting and placement: which entries live in the RAM tier, which go down to SSD.

Design (after Caffeine's W-TinyLFU, sized in bytes):
- Frequency: a count-min sketch of 4-bit saturating counters (`SKETCH_DEPTH` rows). Every read of
  every key counts once. When the number of counted reads reaches `AGING_SAMPLE_PER_ENTRY` x the
  cache's capacity in entries, every counter is halved: yesterday's hot keys cool down, and the
  4-bit counters never sit saturated.
- Placement: a small LRU *window* (`WINDOW_FRACTION` of the RAM budget) takes every new entry, so a
  user's burst of reads is served from RAM even before the sketch knows the user. Entries leaving
  the window are *candidates* for the *main* region (segmented LRU: probation + protected, a hit
  in probation promotes to protected). A candidate enters main only if the sketch says it is read
  more often than the main victim it would displace; the loser of that duel (candidate or victim)
  is demoted to the SSD tier. Frequency-only admission would send a new user's keys straight to
  SSD; recency-only (LRU) lets one-off reads flush the hot set: the window + filter gets both.
- Cluster-wide: `SharedWTinyLFU` keeps the sketch *and* the placement metadata (regions, LRU
  order, sizes, byte totals) in the same Redis as the RAM tier, updated by Lua scripts (one call
  per batch, atomic, so replicas never race on a victim). Why shared: the RAM budget is one shared
  Redis, so the eviction order must see every replica's reads; and metadata that lives and dies
  with the values (a Redis restart empties both) can never describe entries that are not there
  for long (a key whose value expired by TTL is dropped from the metadata on its next read).
  Per-replica metadata would evict on a partial view and split one budget into N guesses.
- `WTinyLFU` is the same algorithm in plain Python (local state): the reference the Lua version
  is tested against decision by decision, and what the offline simulator runs. `LRUPolicy` and
  `BeladyPolicy` (clairvoyant, for the benchmark's upper bound) share the `PlacementPolicy`
  protocol so the benchmark swaps policies over identical tiers.
- Sketch hashing is SHA-1 of the key (Redis Lua has `redis.sha1hex`), so Python and Lua agree.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from caches.tiers.redis import RedisTier

T = TypeVar("T")

# Caffeine's defaults; the simulator (benchmarks/simulate_policies.py) confirms them on ratings
# traces: a 1% window is enough because a burst's key is re-read (and counted) within the burst.
WINDOW_FRACTION = 0.01
PROTECTED_FRACTION = 0.80
SKETCH_DEPTH = 4
SKETCH_COUNTERS_PER_ENTRY = 4  # per row; fewer collisions than Caffeine's 1 at 4 KiB per 1k entries
AGING_SAMPLE_PER_ENTRY = 10  # halve after 10 x capacity reads (Caffeine's sample size)
COUNTER_MAX = 15  # 4-bit counters
DEFAULT_ENTRY_BYTES = 512  # guess used to turn a byte budget into an entry count for the sketch
MIN_SKETCH_WIDTH = 256
HALVING_CHUNK_BYTES = 64 << 10  # aging in slices keeps each Redis script call well under 1 ms
PENDING_MAX_KEYS = 100_000
# Adaptive window (Caffeine's simple hill climber): every CLIMB_SAMPLE_PER_ENTRY x capacity reads,
# move the window size one step in the direction that last improved the hit ratio; the step
# decays geometrically and restarts at full size when the hit ratio jumps (a workload change).
CLIMB_SAMPLE_PER_ENTRY = 3  # Caffeine uses 10; 3 adapts in time on traces of ~20x capacity (simulated)
CLIMB_STEP_FRACTION = 0.0625
CLIMB_STEP_DECAY = 0.98
CLIMB_RESTART_THRESHOLD = 0.05
MAX_WINDOW_FRACTION = 0.80  # access counts buffered while Redis is down, flushed on return
# Keys per placement script call. Redis' Lua caps `unpack` (and a C call's arguments) near 8,000
# values; the record script unpacks 4 BITFIELD words per sketch row per key (16 per key), so a
# batch of ~500 keys failed with `too many results to unpack`. 256 keys = 4,096 values: half the
# cap, and it bounds each call's run time (the server is single-threaded). Chunks of one batch
# are applied in order, which is what one call over the whole batch would have done.
MAX_KEYS_PER_SCRIPT = 256
# Sketch counters per BITFIELD command when flushing the counts buffered during an outage.
MAX_COUNTERS_PER_FLUSH = 1024


# --------------------------------------------------------------------------------------------
# sketch
# --------------------------------------------------------------------------------------------
def sketch_width(budget_bytes: int, entry_bytes: int = DEFAULT_ENTRY_BYTES) -> int:
    entries = max(1, budget_bytes // max(1, entry_bytes))
    return max(MIN_SKETCH_WIDTH, 1 << math.ceil(math.log2(entries * SKETCH_COUNTERS_PER_ENTRY)))


def aging_sample(budget_bytes: int, entry_bytes: int = DEFAULT_ENTRY_BYTES) -> int:
    return max(100, AGING_SAMPLE_PER_ENTRY * max(1, budget_bytes // max(1, entry_bytes)))


def sketch_indexes(key: str, width: int, depth: int = SKETCH_DEPTH) -> list[int]:
    """Counter offsets of a key, row-major (row j at j*width); mirrors the Lua `offsets`."""
    h = hashlib.sha1(key.encode()).hexdigest()
    return [j * width + int(h[8 * j : 8 * j + 8], 16) % width for j in range(depth)]


class CountMinSketch:
    """4-bit saturating count-min sketch with halving; in-process (reference + local fallback).

    One counter per byte (a bytearray) rather than packed nibbles: the per-key Python work is
    what costs here, and `bytes.translate` halves the whole table in one C call."""

    def __init__(self, width: int, sample: int, depth: int = SKETCH_DEPTH) -> None:
        self.width, self.depth, self.sample = width, depth, sample
        self.table = bytearray(width * depth)
        self.adds = 0
        self.agings = 0

    def increment(self, keys: Iterable[str]) -> bool:
        """Count one access per key; returns True when this call triggered an aging."""
        table = self.table
        n = 0
        for key in keys:
            for i in _cached_indexes(key, self.width, self.depth):
                if table[i] < COUNTER_MAX:
                    table[i] += 1
            n += 1
        self.adds += n
        if self.adds >= self.sample:
            self.age()
            return True
        return False

    def age(self) -> None:
        self.table = bytearray(self.table.translate(_HALVE_TABLE))
        self.adds //= 2
        self.agings += 1

    def estimate(self, key: str) -> int:
        table = self.table
        return min(table[i] for i in _cached_indexes(key, self.width, self.depth))


_HALVE_TABLE = bytes(b >> 1 for b in range(256))


@lru_cache(maxsize=1 << 17)
def _cached_indexes(key: str, width: int, depth: int) -> tuple[int, ...]:
    return tuple(sketch_indexes(key, width, depth))


# --------------------------------------------------------------------------------------------
# policies
# --------------------------------------------------------------------------------------------
@dataclass
class Placement:
    """What one `admit` decided; the TieredCache moves the bytes."""

    admitted: list[str] = field(default_factory=list)  # candidates now resident in RAM: write them
    demoted: list[str] = field(default_factory=list)  # were resident, displaced: write SSD, then delete RAM
    rejected: list[str] = field(default_factory=list)  # candidates not kept in RAM: SSD must hold them


class PlacementPolicy(Protocol):
    name: str

    def record(self, keys: Sequence[str], hits: set[str]) -> None:
        """Count an access for every key; `hits` are those the RAM tier answered."""
        ...

    def admit(self, sizes: dict[str, int]) -> Placement:
        """Candidates (fetched from below, in access order) with their sizes in bytes."""
        ...

    def remove(self, keys: Sequence[str]) -> None: ...

    def resident_bytes(self) -> int: ...


def _split(candidates: Sequence[str], evicted: Sequence[str]) -> Placement:
    cands = set(candidates)
    gone = set(evicted)
    return Placement(
        admitted=[k for k in candidates if k not in gone],
        demoted=[k for k in dict.fromkeys(evicted) if k not in cands],
        rejected=[k for k in candidates if k in gone],
    )


class _ResidentBytes:
    """What the two reference policies share: `entries` (key -> bytes) and their byte total."""

    entries: dict[str, int]
    used: int

    def remove(self, keys: Sequence[str]) -> None:
        for k in keys:
            if k in self.entries:
                self.used -= self.entries.pop(k)

    def resident_bytes(self) -> int:
        return self.used


class LRUPolicy(_ResidentBytes):
    """Plain LRU promotion of every miss: the baseline."""

    name = "lru"

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.entries: OrderedDict[str, int] = OrderedDict()
        self.used = 0

    def record(self, keys: Sequence[str], hits: set[str]) -> None:
        for k in keys:
            if k in self.entries:
                if k in hits:
                    self.entries.move_to_end(k)
                else:
                    self.used -= self.entries.pop(k)

    def admit(self, sizes: dict[str, int]) -> Placement:
        evicted: list[str] = []
        for k, size in sizes.items():
            if k in self.entries:
                continue
            self.entries[k] = size
            self.used += size
            while self.used > self.budget and self.entries:
                victim, vsize = self.entries.popitem(last=False)
                self.used -= vsize
                evicted.append(victim)
        return _split(list(sizes), evicted)


class BeladyPolicy(_ResidentBytes):
    """Clairvoyant RAM placement (evict the entry read furthest in the future, bypass a
    candidate read later than every resident): the upper bound. Needs the whole trace up front,
    as the batches `record` will see, in order."""

    name = "optimal"
    NEVER = math.inf

    def __init__(self, budget_bytes: int, trace: Sequence[Sequence[str]]) -> None:
        self.budget = budget_bytes
        flat = [k for batch in trace for k in batch]
        self._next: list[float] = [self.NEVER] * len(flat)
        last: dict[str, int] = {}
        for i in range(len(flat) - 1, -1, -1):
            self._next[i] = last.get(flat[i], self.NEVER)
            last[flat[i]] = i
        self._flat = flat
        self._pos = 0
        self.next_use: dict[str, float] = {}
        self.entries: dict[str, int] = {}
        self._heap: list[tuple[float, str]] = []  # (-next use, key), lazily invalidated
        self.used = 0

    def record(self, keys: Sequence[str], hits: set[str]) -> None:
        for k in keys:
            if self._pos < len(self._flat) and self._flat[self._pos] == k:
                self.next_use[k] = self._next[self._pos]
                self._pos += 1
            else:  # off-trace access (a test, a final check): no future knowledge
                self.next_use[k] = self.NEVER
            if k in self.entries:
                if k in hits:
                    heapq.heappush(self._heap, (-self.next_use[k], k))
                else:
                    self.used -= self.entries.pop(k)

    def _furthest(self) -> str | None:
        while self._heap:
            neg, k = self._heap[0]
            if k in self.entries and -neg == self.next_use.get(k):
                return k
            heapq.heappop(self._heap)
        return None

    def admit(self, sizes: dict[str, int]) -> Placement:
        evicted: list[str] = []
        for k, size in sizes.items():
            if k in self.entries:
                continue
            nxt = self.next_use.get(k, self.NEVER)
            rejected = False
            while self.used + size > self.budget:
                victim = self._furthest()
                if victim is None or self.next_use[victim] <= nxt:
                    rejected = True
                    break
                heapq.heappop(self._heap)
                self.used -= self.entries.pop(victim)
                evicted.append(victim)
            if rejected:
                evicted.append(k)
                continue
            self.entries[k] = size
            self.used += size
            heapq.heappush(self._heap, (-nxt, k))
        return _split(list(sizes), evicted)


@dataclass
class WTinyLFUConfig:
    budget_bytes: int
    window_fraction: float = WINDOW_FRACTION
    protected_fraction: float = PROTECTED_FRACTION
    entry_bytes: int = DEFAULT_ENTRY_BYTES
    adaptive: bool = True

    @property
    def min_window_bytes(self) -> int:
        # The climber may shrink the window to nothing (pure TinyLFU) when that scores better:
        # it did on the MovieLens trace; a floor of one entry cost 0.7 points there.
        return 1

    @property
    def window_bytes(self) -> int:
        """The initial window, at least one entry (a smaller one would admit nothing until the
        climber grows it); the climber then moves it within [min_window_bytes, max_window_bytes]."""
        return max(max(1, min(self.entry_bytes, self.budget_bytes // 2)), int(self.budget_bytes * self.window_fraction))

    @property
    def max_window_bytes(self) -> int:
        return max(1, int(self.budget_bytes * MAX_WINDOW_FRACTION))

    @property
    def climb_sample(self) -> int:
        return max(100, CLIMB_SAMPLE_PER_ENTRY * max(1, self.budget_bytes // max(1, self.entry_bytes)))

    @property
    def climb_step(self) -> float:
        return CLIMB_STEP_FRACTION * self.budget_bytes

    @property
    def width(self) -> int:
        return sketch_width(self.budget_bytes, self.entry_bytes)

    @property
    def sample(self) -> int:
        return aging_sample(self.budget_bytes, self.entry_bytes)


class HillClimber:
    """Window size by hill climbing on the sampled hit ratio (state shared as plain numbers so
    the Lua version can keep the same fields in a Redis hash)."""

    def __init__(self, cfg: WTinyLFUConfig) -> None:
        self.cfg = cfg
        self.window = float(cfg.window_bytes)
        self.step = _lua_number(cfg.climb_step)
        self.prev_rate = 0.0
        self.hits = 0
        self.reads = 0

    def observe(self, reads: int, hits: int) -> None:
        if not self.cfg.adaptive:
            return
        self.reads += reads
        self.hits += hits
        if self.reads < self.cfg.climb_sample:
            return
        rate = self.hits / self.reads
        change = rate - self.prev_rate
        amount = self.step if change >= 0 else -self.step
        if abs(change) >= CLIMB_RESTART_THRESHOLD:
            self.step = self.cfg.climb_step * (1 if amount >= 0 else -1)
        else:
            self.step = CLIMB_STEP_DECAY * amount
        self.prev_rate = _lua_number(rate)
        self.step = _lua_number(self.step)
        self.window = _lua_number(
            min(float(self.cfg.max_window_bytes), max(float(self.cfg.min_window_bytes), self.window + amount))
        )
        self.hits = self.reads = 0


def _lua_number(x: float) -> float:
    """Round as Lua's tostring does (%.14g): the Redis copy of this state goes through strings."""
    return float(f"{x:.14g}")


class WTinyLFU:
    """In-process W-TinyLFU (byte-sized, adaptive window); the reference for `SharedWTinyLFU`."""

    name = "tierserve-local"

    def __init__(self, config: WTinyLFUConfig) -> None:
        self.cfg = config
        self.sketch = CountMinSketch(config.width, config.sample)
        self.climber = HillClimber(config)
        self.window: OrderedDict[str, int] = OrderedDict()
        self.probation: OrderedDict[str, int] = OrderedDict()
        self.protected: OrderedDict[str, int] = OrderedDict()
        self.bytes = {"w": 0, "p": 0, "q": 0}

    @property
    def window_bytes(self) -> int:
        return int(self.climber.window)

    @property
    def main_bytes(self) -> int:
        return self.cfg.budget_bytes - self.window_bytes

    def _region(self, key: str) -> tuple[str, OrderedDict[str, int]] | None:
        for name, region in (("w", self.window), ("p", self.probation), ("q", self.protected)):
            if key in region:
                return name, region
        return None

    def record(self, keys: Sequence[str], hits: set[str]) -> None:
        pcap = int(self.main_bytes * self.cfg.protected_fraction)
        n_hits = 0
        for k in keys:
            if k in hits:
                n_hits += 1
            found = self._region(k)
            if found is None:
                continue
            name, region = found
            if k not in hits:  # the value is gone (TTL, restart): forget the entry
                self.bytes[name] -= region.pop(k)
            elif name == "p":
                size = self.probation.pop(k)
                self.bytes["p"] -= size
                self.protected[k] = size
                self.bytes["q"] += size
                while self.bytes["q"] > pcap and self.protected:
                    old, osize = self.protected.popitem(last=False)
                    self.bytes["q"] -= osize
                    self.probation[old] = osize
                    self.bytes["p"] += osize
            else:
                region.move_to_end(k)
        self.sketch.increment(keys)
        self.climber.observe(len(keys), n_hits)

    def _main_victim(self) -> tuple[str, OrderedDict[str, int], str] | None:
        if self.probation:
            return next(iter(self.probation)), self.probation, "p"
        if self.protected:
            return next(iter(self.protected)), self.protected, "q"
        return None

    def admit(self, sizes: dict[str, int]) -> Placement:
        evicted: list[str] = []
        freq = self.sketch.estimate
        wcap, mcap, budget = self.window_bytes, self.main_bytes, self.cfg.budget_bytes
        for k, size in sizes.items():
            if self._region(k) is not None:
                continue
            self.window[k] = size
            self.bytes["w"] += size
            while self.bytes["w"] > wcap and self.window:
                cand, csize = self.window.popitem(last=False)
                self.bytes["w"] -= csize
                if csize > mcap:
                    evicted.append(cand)
                    continue
                while True:
                    if self.bytes["p"] + self.bytes["q"] + csize <= mcap:
                        self.probation[cand] = csize
                        self.bytes["p"] += csize
                        break
                    found = self._main_victim()
                    if found is None:
                        evicted.append(cand)
                        break
                    victim, region, rname = found
                    if freq(cand) > freq(victim):
                        self.bytes[rname] -= region.pop(victim)
                        evicted.append(victim)
                    else:
                        evicted.append(cand)
                        break
            # The window grew (climber): main gives the room back, oldest probation first.
            while sum(self.bytes.values()) > budget:
                found = self._main_victim()
                if found is None:
                    break
                victim, region, rname = found
                self.bytes[rname] -= region.pop(victim)
                evicted.append(victim)
        return _split(list(sizes), evicted)

    def remove(self, keys: Sequence[str]) -> None:
        for k in keys:
            found = self._region(k)
            if found is not None:
                self.bytes[found[0]] -= found[1].pop(k)

    def resident_bytes(self) -> int:
        return sum(self.bytes.values())


# --------------------------------------------------------------------------------------------
# the cluster-wide policy: same algorithm, state in Redis, one Lua call per batch
# --------------------------------------------------------------------------------------------
# KEYS: 1 window zset, 2 probation zset, 3 protected zset, 4 region hash, 5 size hash,
#       6 bytes hash (w/p/q), 7 tick, 8 sketch (BITFIELD u4), 9 sketch adds, 10 climber hash
# ARGV (common): width, depth, budget, initial window, protected fraction
_LUA_COMMON = """
local W, P, Q, R, S, B, T, C, A, H = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local width, depth = tonumber(ARGV[1]), tonumber(ARGV[2])
local budget, pfrac = tonumber(ARGV[3]), tonumber(ARGV[5])
local ZS = {w = W, p = P, q = Q}
local wcap = math.floor(tonumber(redis.call('HGET', H, 'window') or ARGV[4]))
local mcap = budget - wcap
local function offsets(key)
  local h = redis.sha1hex(key)
  local out = {}
  for j = 0, depth - 1 do
    out[#out + 1] = j * width + (tonumber(string.sub(h, 8 * j + 1, 8 * j + 8), 16) % width)
  end
  return out
end
local function freq(key)
  local args = {}
  for _, o in ipairs(offsets(key)) do
    args[#args + 1] = 'GET'; args[#args + 1] = 'u4'; args[#args + 1] = '#' .. o
  end
  local vals = redis.call('BITFIELD', C, unpack(args))
  local m = 15
  for _, v in ipairs(vals) do if v < m then m = v end end
  return m
end
local tick = tonumber(redis.call('GET', T) or '0')
local function nexttick() tick = tick + 1; return tick end
local function bytes(r) return tonumber(redis.call('HGET', B, r) or '0') end
local function forget(key, region)
  local size = tonumber(redis.call('HGET', S, key) or '0')
  redis.call('ZREM', ZS[region], key)
  redis.call('HDEL', R, key)
  redis.call('HDEL', S, key)
  redis.call('HINCRBY', B, region, -size)
  return size
end
local function main_victim()
  local v = redis.call('ZRANGE', P, 0, 0)[1]
  if v then return v, 'p' end
  v = redis.call('ZRANGE', Q, 0, 0)[1]
  if v then return v, 'q' end
  return nil, nil
end
"""

# ARGV: common (5), sample, adaptive 0/1, climb sample, climb step, step decay, restart threshold,
#       max window, min window, fetch 0/1, then keys: with fetch=1 the script GETs each key itself (the RAM read
#       and the access record in one round trip) and returns {aged, value or nil...}; with fetch=0
#       (key, hit 0/1) pairs and returns {aged}.
_LUA_RECORD = _LUA_COMMON + """
local sample, adaptive = tonumber(ARGV[6]), ARGV[7] == '1'
local csample, cstep, cdecay, crestart, maxw = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local pcap = math.floor(mcap * pfrac)
local minw = tonumber(ARGV[13])
local fetch = ARGV[14] == '1'
local stride = 2
if fetch then stride = 1 end
local incr = {'OVERFLOW', 'SAT'}
local out = {0}
local n, nhits = 0, 0
for i = 15, #ARGV, stride do
  local key, hit = ARGV[i], ARGV[i + 1]
  if fetch then
    local v = redis.call('GET', key)
    out[#out + 1] = v
    if v then hit = '1' else hit = '0' end
  end
  n = n + 1
  if hit == '1' then nhits = nhits + 1 end
  for _, o in ipairs(offsets(key)) do
    incr[#incr + 1] = 'INCRBY'; incr[#incr + 1] = 'u4'; incr[#incr + 1] = '#' .. o; incr[#incr + 1] = 1
  end
  local region = redis.call('HGET', R, key)
  if region then
    if hit == '0' then
      forget(key, region)
    elseif region == 'p' then
      local size = tonumber(redis.call('HGET', S, key))
      redis.call('ZREM', P, key)
      redis.call('ZADD', Q, nexttick(), key)
      redis.call('HSET', R, key, 'q')
      redis.call('HINCRBY', B, 'p', -size)
      local bq = redis.call('HINCRBY', B, 'q', size)
      while bq > pcap do
        local old = redis.call('ZRANGE', Q, 0, 0)[1]
        if not old then break end
        local osize = tonumber(redis.call('HGET', S, old))
        redis.call('ZREM', Q, old)
        redis.call('ZADD', P, nexttick(), old)
        redis.call('HSET', R, old, 'p')
        bq = redis.call('HINCRBY', B, 'q', -osize)
        redis.call('HINCRBY', B, 'p', osize)
      end
    else
      redis.call('ZADD', ZS[region], nexttick(), key)
    end
  end
end
redis.call('SET', T, tick)
if adaptive and n > 0 then
  local reads = redis.call('HINCRBY', H, 'reads', n)
  local hits = redis.call('HINCRBY', H, 'hits', nhits)
  if reads >= csample then
    local window = tonumber(redis.call('HGET', H, 'window') or ARGV[4])
    local step = tonumber(redis.call('HGET', H, 'step') or tostring(cstep))
    local prev = tonumber(redis.call('HGET', H, 'prev') or '0')
    local rate = hits / reads
    local change = rate - prev
    local amount = step
    if change < 0 then amount = -step end
    if math.abs(change) >= crestart then
      if amount >= 0 then step = cstep else step = -cstep end
    else
      step = cdecay * amount
    end
    window = math.min(maxw, math.max(minw, window + amount))
    redis.call('HSET', H, 'window', tostring(window), 'step', tostring(step), 'prev', tostring(rate), 'reads', 0, 'hits', 0)
  end
end
if n > 0 then redis.call('BITFIELD', C, unpack(incr)) end
local adds = redis.call('INCRBY', A, n)
if adds >= sample then
  redis.call('SET', A, math.floor(adds / 2))
  out[1] = 1
end
return out
"""

# ARGV: common (5), then (key, size) pairs -> evicted keys
_LUA_ADMIT = _LUA_COMMON + """
local evicted = {}
for i = 6, #ARGV, 2 do
  local key, size = ARGV[i], tonumber(ARGV[i + 1])
  if not redis.call('HGET', R, key) then
    redis.call('ZADD', W, nexttick(), key)
    redis.call('HSET', R, key, 'w')
    redis.call('HSET', S, key, size)
    local bw = redis.call('HINCRBY', B, 'w', size)
    while bw > wcap do
      local cand = redis.call('ZRANGE', W, 0, 0)[1]
      if not cand then break end
      local csize = forget(cand, 'w')
      bw = bw - csize
      if csize > mcap then
        evicted[#evicted + 1] = cand
      else
        local cfreq = nil
        while true do
          if bytes('p') + bytes('q') + csize <= mcap then
            redis.call('ZADD', P, nexttick(), cand)
            redis.call('HSET', R, cand, 'p')
            redis.call('HSET', S, cand, csize)
            redis.call('HINCRBY', B, 'p', csize)
            break
          end
          local victim, vregion = main_victim()
          if not victim then evicted[#evicted + 1] = cand; break end
          cfreq = cfreq or freq(cand)
          if cfreq > freq(victim) then
            forget(victim, vregion)
            evicted[#evicted + 1] = victim
          else
            evicted[#evicted + 1] = cand
            break
          end
        end
      end
    end
    -- the window grew (climber): main gives the room back, oldest probation first
    while bytes('w') + bytes('p') + bytes('q') > budget do
      local victim, vregion = main_victim()
      if not victim then break end
      forget(victim, vregion)
      evicted[#evicted + 1] = victim
    end
  end
end
redis.call('SET', T, tick)
return evicted
"""

_LUA_REMOVE = _LUA_COMMON + """
local n = 0
for i = 6, #ARGV do
  local region = redis.call('HGET', R, ARGV[i])
  if region then forget(ARGV[i], region); n = n + 1 end
end
return n
"""

# Halve a slice of the sketch: each byte holds two 4-bit counters, (b >> 1) & 0x77 halves both.
_LUA_HALVE = """
local s = redis.call('GETRANGE', KEYS[1], ARGV[1], ARGV[2])
if #s == 0 then return 0 end
local map = {}
for b = 0, 255 do map[string.char(b)] = string.char(bit.band(bit.rshift(b, 1), 0x77)) end
local halved = string.gsub(s, '[%z\\1-\\255]', map)
redis.call('SETRANGE', KEYS[1], ARGV[1], halved)
return #s
"""


def _chunks(items: Sequence[T], n: int) -> Iterator[list[T]]:
    for i in range(0, len(items), n):
        yield list(items[i : i + n])


class SharedWTinyLFU:
    """W-TinyLFU whose sketch and metadata live in the RAM tier's Redis (see module note)."""

    name = "tierserve"

    def __init__(self, tier: RedisTier, config: WTinyLFUConfig, *, prefix: str = "tierserve:placement") -> None:
        self.tier = tier
        self.cfg = config
        self.prefix = prefix
        self.keys = [f"{prefix}:{s}" for s in ("window", "probation", "protected", "region", "size", "bytes", "tick", "sketch", "adds", "climber")]
        client = tier.client
        self._record = client.register_script(_LUA_RECORD)
        self._admit = client.register_script(_LUA_ADMIT)
        self._remove = client.register_script(_LUA_REMOVE)
        self._halve = client.register_script(_LUA_HALVE)
        self.pending: Counter[str] = Counter()  # accesses counted while Redis was down
        self.agings = 0

    @property
    def _common(self) -> list[object]:
        c = self.cfg
        return [c.width, SKETCH_DEPTH, c.budget_bytes, c.window_bytes, repr(c.protected_fraction)]

    def record(self, keys: Sequence[str], hits: set[str]) -> None:
        for chunk in _chunks(keys, MAX_KEYS_PER_SCRIPT):
            args = self._record_args(fetch=False)
            for k in chunk:
                args += [k, 1 if k in hits else 0]
            self._run_record(chunk, args)

    def lookup(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Read the RAM tier and record the accesses, one round trip per chunk (see `_LUA_RECORD`)."""
        found: dict[str, bytes] = {}
        for chunk in _chunks(keys, MAX_KEYS_PER_SCRIPT):
            reply = self._run_record(chunk, [*self._record_args(fetch=True), *chunk])
            found.update({k: v for k, v in zip(chunk, reply[1:], strict=True) if v is not None})
        return found

    def _record_args(self, *, fetch: bool) -> list[object]:
        c = self.cfg
        return [
            *self._common, c.sample, 1 if c.adaptive else 0, c.climb_sample, repr(_lua_number(c.climb_step)),
            repr(CLIMB_STEP_DECAY), repr(CLIMB_RESTART_THRESHOLD), c.max_window_bytes, c.min_window_bytes,
            1 if fetch else 0,
        ]

    def _run_record(self, keys: Sequence[str], args: list[object]) -> list:
        try:
            if self.pending:
                self._flush_pending()
            reply = self.tier._call("placement.record", self._record, self.keys, args)
        except Exception:
            # Redis is down: keep counting here so the outage's reads still count when it returns.
            if len(self.pending) < PENDING_MAX_KEYS:
                self.pending.update(keys)
            raise
        if reply[0]:
            self.age()
        return reply

    def _flush_pending(self) -> None:
        incr = [(o, min(n, COUNTER_MAX)) for key, n in self.pending.items() for o in sketch_indexes(key, self.cfg.width)]
        for chunk in _chunks(incr, MAX_COUNTERS_PER_FLUSH):
            ops: list[object] = ["OVERFLOW", "SAT"]
            for o, n in chunk:
                ops += ["INCRBY", "u4", f"#{o}", n]
            self.tier._call("placement.flush", self.tier.client.execute_command, "BITFIELD", self.keys[7], *ops)
        self.pending.clear()

    def age(self) -> None:
        """Halve every counter, slice by slice (other replicas keep counting meanwhile)."""
        total = self.cfg.width * SKETCH_DEPTH // 2
        for start in range(0, total, HALVING_CHUNK_BYTES):
            end = min(total, start + HALVING_CHUNK_BYTES) - 1
            self.tier._call("placement.age", self._halve, [self.keys[7]], [start, end])
        self.agings += 1

    def admit(self, sizes: dict[str, int]) -> Placement:
        if not sizes:
            return Placement()
        evicted: list[str] = []
        for chunk in _chunks(list(sizes), MAX_KEYS_PER_SCRIPT):
            args: list[object] = list(self._common)
            for k in chunk:
                args += [k, sizes[k]]
            reply = self.tier._call("placement.admit", self._admit, self.keys, args)
            evicted += [e.decode() if isinstance(e, bytes) else e for e in reply]
        return _split(list(sizes), evicted)

    def remove(self, keys: Sequence[str]) -> None:
        for chunk in _chunks(keys, MAX_KEYS_PER_SCRIPT):
            self.tier._call("placement.remove", self._remove, self.keys, [*self._common, *chunk])

    def resident_bytes(self) -> int:
        raw = self.tier._call("placement.bytes", self.tier.client.hvals, self.keys[5])
        return sum(int(v) for v in raw)

    def window_bytes(self) -> int:
        raw = self.tier._call("placement.window", self.tier.client.hget, self.keys[9], "window")
        return int(float(raw)) if raw is not None else self.cfg.window_bytes

    def resident_keys(self, prefix: str = "") -> list[str]:
        pattern = f"{prefix}*" if prefix else "*"
        found = self.tier._call(
            "placement.scan", lambda: list(self.tier.client.hscan_iter(self.keys[3], match=pattern, count=1000))
        )
        return [k.decode() if isinstance(k, bytes) else k for k, _ in found]

    def estimate(self, key: str) -> int:
        ops: list[object] = []
        for o in sketch_indexes(key, self.cfg.width):
            ops += ["GET", "u4", f"#{o}"]
        vals = self.tier._call("placement.estimate", self.tier.client.execute_command, "BITFIELD", self.keys[7], *ops)
        return min(int(v) for v in vals)

    def reset(self) -> None:
        """Forget everything (tests, benchmarks): metadata and counts."""
        self.tier._call("placement.reset", self.tier.client.delete, *self.keys)
