"""W-TinyLFU placement in plain Python (in-process state), sized in bytes, after Caffeine.

Design:
- Frequency: the count-min sketch of `sketch.py`; every read of every key counts once.
- Placement: a small LRU *window* (`WINDOW_FRACTION` of the RAM budget) takes every new entry, so a
  user's burst of reads is served from RAM even before the sketch knows the user. Entries leaving
  the window are *candidates* for the *main* region (segmented LRU: probation + protected, a hit
  in probation promotes to protected). A candidate enters main only if the sketch says it is read
  more often than the main victim it would displace; the loser of that duel (candidate or victim)
  is demoted to the SSD tier. Frequency-only admission would send a new user's keys straight to
  SSD; recency-only (LRU) lets one-off reads flush the hot set: the window + filter gets both.
- Adaptive window (Caffeine's simple hill climber, `HillClimber`): every CLIMB_SAMPLE_PER_ENTRY x
  capacity reads, move the window one step in the direction that last improved the hit ratio.
- `WTinyLFU` is the reference the Lua version (`shared.py`) is tested against decision by
  decision, and what the offline simulator (benchmarks/simulate_policies.py) runs. Numbers that
  the Lua copy keeps as strings are rounded as Lua prints them (`lua_number`), so both agree.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from caches.admission.policy import Placement, PlacementPolicy, split_placement
from caches.admission.sketch import DEFAULT_ENTRY_BYTES, CountMinSketch, aging_sample, sketch_width

# Caffeine's defaults; the simulator (benchmarks/simulate_policies.py) confirms them on ratings
# traces: a 1% window is enough because a burst's key is re-read (and counted) within the burst.
WINDOW_FRACTION = 0.01
PROTECTED_FRACTION = 0.80
# Adaptive window (Caffeine's simple hill climber): every CLIMB_SAMPLE_PER_ENTRY x capacity reads,
# move the window size one step in the direction that last improved the hit ratio; the step
# decays geometrically and restarts at full size when the hit ratio jumps (a workload change).
CLIMB_SAMPLE_PER_ENTRY = 3  # Caffeine uses 10; 3 adapts in time on traces of ~20x capacity (simulated)
CLIMB_STEP_FRACTION = 0.0625
CLIMB_STEP_DECAY = 0.98
CLIMB_RESTART_THRESHOLD = 0.05
MAX_WINDOW_FRACTION = 0.80


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
        self.step = lua_number(cfg.climb_step)
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
        self.prev_rate = lua_number(rate)
        self.step = lua_number(self.step)
        self.window = lua_number(
            min(float(self.cfg.max_window_bytes), max(float(self.cfg.min_window_bytes), self.window + amount))
        )
        self.hits = self.reads = 0


def lua_number(x: float) -> float:
    """Round as Lua's tostring does (%.14g): the Redis copy of this state goes through strings."""
    return float(f"{x:.14g}")


class WTinyLFU(PlacementPolicy):
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
        return split_placement(list(sizes), evicted)

    def remove(self, keys: Sequence[str]) -> None:
        for k in keys:
            found = self._region(k)
            if found is not None:
                self.bytes[found[0]] -= found[1].pop(k)

    def resident_bytes(self) -> int:
        return sum(self.bytes.values())

    def resident_keys(self, prefix: str = "") -> list[str]:
        return [k for region in (self.window, self.probation, self.protected) for k in region if k.startswith(prefix)]
