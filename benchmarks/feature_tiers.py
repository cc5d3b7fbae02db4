"""Tiered feature cache benchmark: tierserve (W-TinyLFU) vs LRU vs Belady on a ratings trace.

    python -m benchmarks.feature_tiers --ratings FILE.csv [--user-col userId --item-col movieId
        --time-col timestamp] [--ram-budget-frac 0.05] [--ssd-budget-frac 0.5] [--limit N]

1. Builds a Feast repo in a temporary folder from the ratings file alone (`build_repo`: user and
   item features with a 32-dim embedding, materialised into a sqlite online store).
2. Replays the rows in timestamp order; each row is one batched read of that user's and that
   item's features through a TieredCache over real tiers: Redis (embedded unless REDIS_URL is
   set; the database is flushed between systems), RocksDB in a temp folder, Feast.
3. Runs `tierserve` (the cluster-wide W-TinyLFU in Redis), `lru` (plain LRU promotion of every
   miss) and `optimal` (Belady: clairvoyant RAM placement) with the same budgets, in this process.
   Budgets are fractions of the trace's total bytes (key + msgpack value of every distinct entity).
4. Prints RAM/SSD hit ratios, cold (Feast) reads, p50/p99 read latency, bytes per tier and
   `lost` (entities whose cached value differs from Feast's at the end, or that no tier nor Feast
   answers; must be 0). The last line is one JSON object with those figures by system.
5. Plots RAM hit ratio against RAM budget to benchmarks/results/. The sweep replays the same
   trace and sizes through the same policy classes *offline* (benchmarks/simulate_policies.py; the
   in-process W-TinyLFU makes the same decisions as the Lua one) because a full run through Redis
   per budget would take minutes each; the real runs are marked on the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import redis

from benchmarks.baselines import BeladyPolicy, LRUPolicy
from benchmarks.simulate_policies import load_ratings_trace, sweep
from caches.admission import PlacementPolicy, SharedWTinyLFU, WTinyLFUConfig
from caches.keys import make_key
from caches.tiered import TieredCache
from caches.tiers.feast import FeastTier, FeastView, decode_features
from caches.tiers.redis import RedisTier
from caches.tiers.rocksdb import RocksDBTier

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SYSTEMS = ("tierserve", "lru", "optimal")
DEFAULT_SWEEP = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
USER_VIEW, ITEM_VIEW = "user_features", "item_features"
USER_KEY, ITEM_KEY = "user_id", "item_id"
NAMESPACE = "features"
SIZING_CHUNK = 1000  # keys per Feast call when reading every entity once to size the budgets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratings", type=Path, required=True)
    p.add_argument("--user-col", default="userId")
    p.add_argument("--item-col", default="movieId")
    p.add_argument("--time-col", default="timestamp")
    p.add_argument("--rating-col", default="rating", help="used when present in the file")
    p.add_argument("--ram-budget-frac", type=float, default=0.05)
    p.add_argument("--ssd-budget-frac", type=float, default=0.5)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--sweep", default=",".join(map(str, DEFAULT_SWEEP)), help="RAM budgets to plot ('' to skip)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--work-dir", type=Path, default=None, help="keep the Feast repo and RocksDB here")
    return p.parse_args(argv)


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_system(
    system: str, *, redis_url: str, work: Path, store: Any, batches: list[list[str]], ram_budget: int,
    ssd_budget: int, reference: dict[str, bytes],
) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    ram = RedisTier(redis_url, meta_prefix=f"bench:{system}")
    ssd_dir = work / f"rocksdb-{system}"
    shutil.rmtree(ssd_dir, ignore_errors=True)
    ssd = RocksDBTier(ssd_dir)
    cold = FeastTier(views=[FeastView(USER_VIEW, USER_KEY), FeastView(ITEM_VIEW, ITEM_KEY)], store=store)
    policy: PlacementPolicy
    if system == "tierserve":
        policy = SharedWTinyLFU(ram, WTinyLFUConfig(ram_budget, entry_bytes=_mean_size(reference)),
                                prefix=f"bench:{system}:placement")
    elif system == "lru":
        policy = LRUPolicy(ram_budget)
    else:
        policy = BeladyPolicy(ram_budget, batches)
    cache = TieredCache(ram=ram, ssd=ssd, cold=cold, policy=policy, ssd_budget_bytes=ssd_budget, name=system)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    lat = np.zeros(len(batches), dtype=np.float64)
    ram_hits = ssd_hits = cold_reads = missing = degraded = 0
    t_start = time.perf_counter()
    with Progress(TextColumn(f"[bold]{system:>9}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task(system, total=len(batches))
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            res = cache.get_many(batch)
            lat[i] = time.perf_counter() - t0
            ram_hits += res.ram_hits
            ssd_hits += res.ssd_hits
            cold_reads += res.cold_hits
            missing += len(res.missing)
            degraded += res.degraded
            if i % 2000 == 0:
                progress.update(task, completed=i)
    seconds = time.perf_counter() - t_start

    # lost: every entity's value, from the highest tier holding it, against Feast's own.
    keys = list(reference)
    in_ram = ram.get_many(keys)
    in_ssd = ssd.get_many([k for k in keys if k not in in_ram])
    lost = 0
    for k in keys:
        held = in_ram.get(k) or in_ssd.get(k)
        if held is None:
            held = cold.get_many([k]).get(k)
        if held is None or decode_features(held) != decode_features(reference[k]):
            lost += 1
    reads = sum(len(b) for b in batches)
    out = {
        "reads": reads,
        "ram_hit_ratio": round(ram_hits / reads, 4),
        "ssd_hit_ratio": round(ssd_hits / reads, 4),
        "cold_reads": cold_reads,
        "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 3),
        "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 3),
        "ram_bytes": ram.size_bytes(),
        "ssd_bytes": ssd.size_bytes(),
        "ram_budget_bytes": ram_budget,
        "ssd_budget_bytes": ssd_budget,
        "promotions": cache.counters.promotions,
        "demotions": cache.counters.demotions,
        "ssd_drops": cache.counters.ssd_drops,
        "missing_reads": missing,
        "degraded_reads": degraded,
        "lost": lost,
        "seconds": round(seconds, 1),
    }
    cache.close()
    client.close()
    return out


def _mean_size(reference: dict[str, bytes]) -> int:
    return max(1, int(sum(len(k) + len(v) for k, v in reference.items()) / max(1, len(reference))))


def plot(sweep_result: dict[str, dict[float, float]], real: dict[str, dict[str, Any]], frac: float,
         path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system, row in sweep_result.items():
        xs = sorted(row)
        line, = ax.plot([x * 100 for x in xs], [row[x] * 100 for x in xs], marker="o", label=f"{system} (simulated)")
        if system in real:
            ax.scatter([frac * 100], [real[system]["ram_hit_ratio"] * 100], marker="*", s=160,
                       color=line.get_color(), edgecolor="black", zorder=5, label=f"{system} (real run)")
    ax.set_xscale("log")
    ax.set_xlabel("RAM budget (% of the trace's bytes)")
    ax.set_ylabel("RAM hit ratio (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    header = pd.read_csv(args.ratings, nrows=0).columns
    for col in (args.user_col, args.item_col, args.time_col):
        if col not in header:
            raise SystemExit(f"{args.ratings}: no column {col!r} (columns: {list(header)})")
    rating_col = args.rating_col if args.rating_col in header else None

    with ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tierserve-bench-")))
        work.mkdir(parents=True, exist_ok=True)
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            from caches.redis_server import EmbeddedRedis

            redis_url = stack.enter_context(EmbeddedRedis()).url

        t0 = time.perf_counter()
        from feature_store.pipeline import build_repo, open_store

        info = build_repo(args.ratings, work / "repo", user_col=args.user_col, item_col=args.item_col,
                          rating_col=rating_col, time_col=args.time_col, limit=args.limit, progress=sys.stderr.isatty())
        store = open_store(info.repo_dir)
        _say(f"feast repo built in {time.perf_counter() - t0:.1f}s (model_version {info.model_version})")

        pairs = load_ratings_trace(args.ratings, user_col=args.user_col, item_col=args.item_col,
                                   time_col=args.time_col, limit=args.limit)
        version = info.model_version

        def ukey(u: int) -> str:
            return make_key(NAMESPACE, USER_VIEW, version, str(u))

        def ikey(i: int) -> str:
            return make_key(NAMESPACE, ITEM_VIEW, version, str(i))

        batches = [[ukey(u), ikey(i)] for u, i in pairs]
        distinct = list(dict.fromkeys(k for b in batches for k in b))
        # Feast's value of every entity: sizes for the budgets and the reference for `lost`.
        sizing = FeastTier(views=[FeastView(USER_VIEW, USER_KEY), FeastView(ITEM_VIEW, ITEM_KEY)], store=store)
        reference: dict[str, bytes] = {}
        for i in range(0, len(distinct), SIZING_CHUNK):
            reference.update(sizing.get_many(distinct[i : i + SIZING_CHUNK]))
        unknown = len(distinct) - len(reference)
        total = sum(len(k) + len(v) for k, v in reference.items())
        ram_budget = int(total * args.ram_budget_frac)
        ssd_budget = int(total * args.ssd_budget_frac)
        _say(f"trace: {len(batches)} rows, {len(batches) * 2} reads, {len(distinct)} entities ({unknown} unknown to "
             f"Feast), {total / 1e6:.2f} MB; RAM budget {ram_budget} B ({args.ram_budget_frac:.1%}), "
             f"SSD budget {ssd_budget} B ({args.ssd_budget_frac:.1%})")

        results: dict[str, dict[str, Any]] = {}
        for system in systems:
            results[system] = run_system(system, redis_url=redis_url, work=work, store=store, batches=batches,
                                         ram_budget=ram_budget, ssd_budget=ssd_budget, reference=reference)
            r = results[system]
            _say(f"{system:>9}: RAM hits {r['ram_hit_ratio']:.2%}  SSD hits {r['ssd_hit_ratio']:.2%}  cold reads "
                 f"{r['cold_reads']}  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  RAM {r['ram_bytes']} B  "
                 f"SSD {r['ssd_bytes']} B  lost {r['lost']}  ({r['seconds']}s)")

    sweep_fracs = sorted({float(x) for x in args.sweep.split(",") if x} | {args.ram_budget_frac}) if args.sweep else []
    stem = args.ratings.stem if args.ratings.parent.name == "" else f"{args.ratings.parent.name}_{args.ratings.stem}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"ratings": str(args.ratings), "rows": len(batches), "entities": len(distinct),
                               "ram_budget_frac": args.ram_budget_frac, "ssd_budget_frac": args.ssd_budget_frac,
                               "systems": results}
    if sweep_fracs:
        t0 = time.perf_counter()
        sizes = {k: len(k) + len(v) for k, v in reference.items()}
        # Same config as the real run (entry size sets the sketch width and the sample periods).
        sim = sweep(batches, lambda k: sizes.get(k, 0), sweep_fracs, systems=systems, entry_bytes=_mean_size(reference))
        summary["simulated_sweep"] = {s: {str(f): round(v, 4) for f, v in row.items()} for s, row in sim.items()}
        png = args.out_dir / f"feature_tiers_{stem}.png"
        plot(sim, results, args.ram_budget_frac, png, f"RAM hit ratio vs budget: {stem}")
        _say(f"sweep ({time.perf_counter() - t0:.1f}s, offline simulation) -> {png}")
        for s, row in sim.items():
            _say(f"{s:>9} " + "  ".join(f"{f:.1%}: {v:.2%}" for f, v in sorted(row.items())))
    (args.out_dir / f"feature_tiers_{stem}.json").write_text(json.dumps(summary, indent=2))
    last = {s: {k: r[k] for k in ("ram_hit_ratio", "ssd_hit_ratio", "cold_reads", "p50_ms", "p99_ms", "ram_bytes",
                                  "ssd_bytes", "lost")} for s, r in results.items()}
    print(json.dumps(last), flush=True)
    return summary


if __name__ == "__main__":
    main()
