"""Offline simulator: RAM hit ratio of the placement policies on a ratings trace, no I/O.

    python -m benchmarks.simulate_policies --ratings FILE.csv [--budgets 0.01,0.05,0.1] [--limit N]

It runs the very policy classes the TieredCache uses (`caches.admission`, baselines in `benchmarks.baselines`: the in-process
`WTinyLFU` is decision-for-decision the Lua `SharedWTinyLFU`, see the integration tests) over the
same batches the real benchmark replays (one batch = the user key and the item key of a rating),
so a budget sweep costs seconds instead of a full run through Redis, RocksDB and Feast per budget.
Budgets are fractions of the trace's total bytes (sum of entry sizes of every distinct key).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from benchmarks.baselines import BeladyPolicy, LRUPolicy
from caches.admission import PlacementPolicy, WTinyLFU, WTinyLFUConfig

DEFAULT_BUDGETS = (0.01, 0.02, 0.05, 0.1, 0.2)
UNIFORM_ENTRY_BYTES = 512


def load_ratings_trace(
    ratings: Path, *, user_col: str = "userId", item_col: str = "movieId", time_col: str = "timestamp",
    limit: int | None = None,
) -> list[tuple[int, int]]:
    """(user, item) pairs in timestamp order; ties keep file order (a user's burst stays intact)."""
    frame = pd.read_csv(ratings, usecols=[user_col, item_col, time_col], nrows=limit)
    frame = frame.dropna().sort_values(time_col, kind="stable")
    return list(zip(frame[user_col].astype("int64").tolist(), frame[item_col].astype("int64").tolist(), strict=True))


def simulate(policy: PlacementPolicy, batches: Sequence[Sequence[str]], sizes: Callable[[str], int]) -> dict[str, float]:
    """Hits as the TieredCache counts them: record the batch, then admit its misses."""
    resident: set[str] = set()
    hits = reads = 0
    for batch in batches:
        found = {k for k in batch if k in resident}
        hits += len(found)
        reads += len(batch)
        policy.record(batch, found)
        placement = policy.admit({k: sizes(k) for k in batch if k not in found})
        resident.update(placement.admitted)
        resident.difference_update(placement.demoted)
        resident.difference_update(placement.rejected)
        resident.intersection_update(_resident_view(policy, resident))
    return {"ram_hit_ratio": hits / max(1, reads), "reads": reads}


def _resident_view(policy: PlacementPolicy, resident: set[str]) -> set[str]:
    # `record` forgets ghosts itself; nothing else removes entries behind the simulator's back.
    return resident


def make_policy(name: str, budget: int, batches: Sequence[Sequence[str]], **kw: float) -> PlacementPolicy:
    if name == "lru":
        return LRUPolicy(budget)
    if name == "optimal":
        return BeladyPolicy(budget, batches)
    return WTinyLFU(WTinyLFUConfig(budget, **kw))  # type: ignore[arg-type]


def sweep(
    batches: Sequence[Sequence[str]], sizes: Callable[[str], int], budget_fracs: Sequence[float],
    systems: Sequence[str] = ("tierserve", "lru", "optimal"), **kw: float,
) -> dict[str, dict[float, float]]:
    total = sum(sizes(k) for k in {k for b in batches for k in b})
    out: dict[str, dict[float, float]] = {s: {} for s in systems}
    for frac in budget_fracs:
        for system in systems:
            policy = make_policy(system, int(total * frac), batches, **kw)
            out[system][frac] = simulate(policy, batches, sizes)["ram_hit_ratio"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratings", type=Path, required=True)
    parser.add_argument("--user-col", default="userId")
    parser.add_argument("--item-col", default="movieId")
    parser.add_argument("--time-col", default="timestamp")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)))
    parser.add_argument("--window", type=float, default=None, help="W-TinyLFU window fraction")
    args = parser.parse_args()
    pairs = load_ratings_trace(args.ratings, user_col=args.user_col, item_col=args.item_col,
                               time_col=args.time_col, limit=args.limit)
    batches = [[f"u:{u}", f"i:{i}"] for u, i in pairs]
    kw = {"window_fraction": args.window} if args.window is not None else {}
    t0 = time.perf_counter()
    result = sweep(batches, lambda _k: UNIFORM_ENTRY_BYTES, [float(b) for b in args.budgets.split(",")], **kw)
    for system, row in result.items():
        print(f"{system:>10} " + " ".join(f"{f:>6.0%}: {r:6.2%}" for f, r in row.items()))
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), **{s: {str(f): round(r, 4) for f, r in row.items()} for s, row in result.items()}}))


if __name__ == "__main__":
    main()
