"""Least-recently-read order of the keys a process' SSD tier holds (the TieredCache's SSD budget).

Local to the process (its SSD is its own), in memory: a tick per read and a heap of (tick, key)
with lazy deletion (a key re-read since is pushed again; its older heap entries are skipped when
popped), so a read costs a push and an over-budget check pops only what it drops. Recency follows
every read of the cache, not only RAM misses (why: caches/tiered.py's module note).
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable, Iterable

# The heap is rebuilt from the live ticks once it holds this many more entries than twice the
# keys it orders: every read pushes one entry, and without over-budget pops (an SSD that TTLs and
# invalidations keep small) nothing else would ever take them out.
COMPACT_SLACK = 1024


class RecencyOrder:
    def __init__(self, keys: Iterable[str] = (), held: Callable[[str], bool] | None = None) -> None:
        # The invalidation consumer thread drops keys while requests read them.
        self._lock = threading.Lock()
        # Whether the SSD holds a key now. A delete and its `forget` are two steps, and a fill of
        # the same key can land between them (its `added` a no-op: the key was still ordered);
        # forgetting it then would leave it on the SSD outside the order, where the budget never
        # drops it. So `forget` keeps a key the SSD holds again (checked under the lock `added`
        # takes, after the SSD write that precedes every `added`).
        self._held = held
        self._tick = 0
        self._ticks: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []
        for k in keys:  # entries left by a previous run of this process: oldest of all
            self._ticks[k] = 0
            self._heap.append((0, k))

    def added(self, keys: Iterable[str]) -> None:
        """Keys just written: newest, unless already known (a rewrite keeps its place)."""
        with self._lock:
            for k in keys:
                if k not in self._ticks:
                    self._tick += 1
                    self._ticks[k] = self._tick
                    heapq.heappush(self._heap, (self._tick, k))

    def touched(self, keys: Iterable[str]) -> None:
        """Keys just read (through any tier): the newest now, if held."""
        with self._lock:
            for k in keys:
                self._tick += 1
                if k in self._ticks:
                    self._ticks[k] = self._tick
                    heapq.heappush(self._heap, (self._tick, k))
            self._compact()

    def forget(self, keys: Iterable[str]) -> None:
        """Keys the SSD no longer holds (deleted, invalidated, expired): not ordered any more
        (those it holds again by now stay: see `held`)."""
        with self._lock:
            for k in keys:
                if self._held is None or not self._held(k):
                    self._ticks.pop(k, None)
            self._compact()

    def __len__(self) -> int:
        return len(self._ticks)

    def heap_size(self) -> int:
        return len(self._heap)

    def _compact(self) -> None:
        # under the lock; amortised O(1) per push: a rebuild follows at least COMPACT_SLACK pushes
        if len(self._heap) > 2 * len(self._ticks) + COMPACT_SLACK:
            self._heap = [(tick, k) for k, tick in self._ticks.items()]
            heapq.heapify(self._heap)

    def coldest(self, excess: int, size_of: Callable[[str], int | None], min_keys: int) -> list[str]:
        """Forget and return the least recently read keys until `excess` bytes are covered
        (`size_of`: a key's size on the tier, None when it is no longer there)."""
        drop: list[str] = []
        with self._lock:
            while self._heap and (excess > 0 or len(drop) < min_keys):
                tick, k = heapq.heappop(self._heap)
                if self._ticks.get(k) != tick:
                    continue  # stale heap entry (re-read since)
                size = size_of(k)
                del self._ticks[k]
                if size is None:
                    continue
                drop.append(k)
                excess -= size
                if excess <= 0:
                    break
        return drop
