"""Access counting and placement: which entries live in the RAM tier, which go down to SSD.

- `sketch`: the count-min frequency sketch with TinyLFU's 4-bit counters and halving.
- `wtinylfu`: W-TinyLFU (window LRU + TinyLFU duel into a segmented-LRU main, adaptive window)
  in plain Python: the reference, and what the offline simulator runs.
- `shared`: the same algorithm with its state in the RAM tier's Redis, driven by the Lua scripts
  in `lua/`: the production policy, one budget and one eviction order for every replica.
- `policy`: the `PlacementPolicy` protocol the TieredCache talks to, and `Placement`.
The LRU and clairvoyant (Belady) baselines live with the simulator, in benchmarks/baselines.py.
"""

from caches.admission.policy import Placement, PlacementPolicy, split_placement
from caches.admission.shared import MAX_KEYS_PER_SCRIPT, SharedWTinyLFU
from caches.admission.sketch import COUNTER_MAX, CountMinSketch, aging_sample, sketch_indexes, sketch_width
from caches.admission.wtinylfu import HillClimber, WTinyLFU, WTinyLFUConfig

__all__ = [
    "COUNTER_MAX",
    "MAX_KEYS_PER_SCRIPT",
    "CountMinSketch",
    "HillClimber",
    "Placement",
    "PlacementPolicy",
    "SharedWTinyLFU",
    "WTinyLFU",
    "WTinyLFUConfig",
    "aging_sample",
    "sketch_indexes",
    "sketch_width",
    "split_placement",
]
