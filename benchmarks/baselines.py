"""The baselines the placement benchmarks compare tierserve's W-TinyLFU against.

- `LRUPolicy`: promote every miss, evict the least recently read: what a plain LRU RAM tier does.
- `BeladyPolicy`: clairvoyant (Belady's MIN, sized in bytes): the upper bound no online policy
  reaches. It needs the whole trace up front.
Both implement `caches.admission.PlacementPolicy`, so benchmarks/simulate_policies.py (offline)
and benchmarks/feature_tiers.py (through a real TieredCache) swap them in over identical tiers.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Sequence

from caches.admission import Placement, PlacementPolicy, split_placement


class _ResidentBytes(PlacementPolicy):
    """What the two reference policies share: `entries` (key -> bytes) and their byte total."""

    entries: dict[str, int]
    used: int

    def remove(self, keys: Sequence[str]) -> None:
        for k in keys:
            if k in self.entries:
                self.used -= self.entries.pop(k)

    def resident_bytes(self) -> int:
        return self.used

    def resident_keys(self, prefix: str = "") -> list[str]:
        return [k for k in self.entries if k.startswith(prefix)]


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
        return split_placement(list(sizes), evicted)


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
        return split_placement(list(sizes), evicted)
