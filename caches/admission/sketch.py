"""The frequency sketch behind admission: how often has a key been read lately?

Design:
- A count-min sketch (Cormode & Muthukrishnan, "An improved data stream summary: the count-min
  sketch and its applications", J. Algorithms 55(1), 2005): `SKETCH_DEPTH` rows of counters, a key
  adds one to one counter per row (its hashed column), and its estimate is the minimum over the
  rows. Collisions only ever inflate a count, so the estimate is an upper bound whose error
  shrinks with the width; we size the width at `SKETCH_COUNTERS_PER_ENTRY` x the cache's capacity
  in entries.
- As in TinyLFU (Einziger, Friedman & Manes, "TinyLFU: A Highly Efficient Cache Admission
  Policy", ACM Transactions on Storage 13(4), 2017): 4-bit saturating counters (an admission duel
  only needs to know "more often than the victim", not by how much) and *reset by halving*: once
  the number of counted reads reaches `AGING_SAMPLE_PER_ENTRY` x capacity, every counter is halved,
  so yesterday's hot keys cool down and the counters never sit saturated.
- Hashing is SHA-1 of the key, 32 bits per row: Redis Lua has `redis.sha1hex`, so the Python
  sketch here and the one the Lua scripts keep in a Redis BITFIELD (`shared.py`) agree counter
  for counter.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from functools import lru_cache

SKETCH_DEPTH = 4
SKETCH_COUNTERS_PER_ENTRY = 4  # per row; fewer collisions than Caffeine's 1 at 4 KiB per 1k entries
AGING_SAMPLE_PER_ENTRY = 10  # halve after 10 x capacity reads (Caffeine's sample size)
COUNTER_MAX = 15  # 4-bit counters
DEFAULT_ENTRY_BYTES = 512  # guess used to turn a byte budget into an entry count for the sketch
MIN_SKETCH_WIDTH = 256


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
