"""Exact top-k against the single FAISS pass it replaced, on the project's own catalogue.

    python -m benchmarks.recs_topk [--repo feature_store] [--k 10] [--pool 200] [--rounds 3]

The score is the embedding similarity plus small nudges (mean rating, genres: see
deployments/recommender.py), so the `pool` items FAISS finds nearest need not hold the `k` best
scores. `deployments.recommender_model.top_k` widens the pool until no item outside it can
outscore the k-th (a threshold test); the baseline is the one pass the Recommender made before.
For every user of the built repo, with their pipeline ratings filtered out as the Recommender
does, in the same run:

- `wrong`: users whose single-pass top k differs from scoring the whole catalogue (the truth);
  the exact path's must be 0;
- `widened`: users for whom the exact path needed a larger pool;
- `ms`: mean and p50/p99 of each path's time per user (in process: no Serve hop, no Redis).

Results go to benchmarks/results/recs_topk.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.app_runner import REPO_ROOT, report
from deployments.recommender import W_GENRE, W_MEAN_RATING
from deployments.recommender_model import ItemIndex, ItemTable, score_items, top_k
from feature_store import names
from feature_store.pipeline import RepoInfo

RESULTS = Path(__file__).resolve().parent / "results" / "recs_topk.json"


def single_pass(index: ItemIndex, table: ItemTable, user: np.ndarray, affinity: np.ndarray, seen: set[int],
                k: int, pool: int) -> list[int]:
    """The Recommender's ranking before the exact top k: one FAISS pass of `pool` past the seen."""
    ids, sims = index.search_scored(user, pool + len(seen))
    if seen:
        keep = ~np.isin(ids, np.fromiter(seen, dtype=np.int64, count=len(seen)))
        ids, sims = ids[keep], sims[keep]
    rows = table.rows(ids)
    scores = score_items(sims, table.mean_rating[rows], table.genre_matrix[rows], affinity,
                         w_mean_rating=W_MEAN_RATING, w_genre=W_GENRE)
    return [int(i) for i in ids[np.argsort(-scores, kind="stable")[:k]]]


def truth(index: ItemIndex, table: ItemTable, user: np.ndarray, affinity: np.ndarray, seen: set[int],
          k: int) -> list[int]:
    """Every unseen item scored and fully sorted (score, then id among equal scores): what a top
    k must equal. Written apart from `top_k`'s scan: the per-item `score_items` and a full sort."""
    ids = index.id_array
    keep = ~np.isin(ids, np.fromiter(seen, dtype=np.int64, count=len(seen))) if seen else np.ones(ids.size, bool)
    ids, sims = ids[keep], (index.vectors[keep] @ user).astype(np.float32)
    rows = table.rows(ids)
    scores = score_items(sims, table.mean_rating[rows], table.genre_matrix[rows], affinity,
                         w_mean_rating=W_MEAN_RATING, w_genre=W_GENRE)
    return [int(i) for i in ids[np.lexsort((ids, -scores))][:k]]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=REPO_ROOT / "feature_store")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--pool", type=int, default=200, help="the first pool (the Recommender's `candidates`)")
    p.add_argument("--rounds", type=int, default=3, help="timed passes over every user (alternating paths)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    info = RepoInfo.load(args.repo)
    index, table = ItemIndex(info.files["item_features"]), ItemTable(info.files["item_features"], list(info.genres))
    users = pd.read_parquet(info.files["user_features"])
    rated = pd.read_parquet(info.files["rated"])
    seen_of = {int(u): set(map(int, i)) for u, i in zip(rated[names.USER_KEY], rated["item_ids"], strict=True)}
    people = [(int(r[names.USER_KEY]), np.asarray(r["embedding"], dtype=np.float32),
               np.asarray(r["genre_affinity"], dtype=np.float32)) for _, r in users.iterrows()]

    wrong = {"single_pass": 0, "exact": 0}
    widened = 0
    for user, emb, aff in people:
        seen = seen_of.get(user, set())
        best = truth(index, table, emb, aff, seen, args.k)
        exact = top_k(index, table, emb, aff, seen, args.k, args.pool, w_mean_rating=W_MEAN_RATING, w_genre=W_GENRE)
        wrong["exact"] += exact.ids.tolist() != best
        wrong["single_pass"] += single_pass(index, table, emb, aff, seen, args.k, args.pool) != best
        widened += exact.sources["model"] > args.pool + len(seen)

    times: dict[str, list[float]] = {"single_pass": [], "exact": []}
    for _ in range(args.rounds):
        for user, emb, aff in people:
            seen = seen_of.get(user, set())
            t0 = time.perf_counter()
            single_pass(index, table, emb, aff, seen, args.k, args.pool)
            t1 = time.perf_counter()
            top_k(index, table, emb, aff, seen, args.k, args.pool, w_mean_rating=W_MEAN_RATING, w_genre=W_GENRE)
            t2 = time.perf_counter()
            times["single_pass"].append((t1 - t0) * 1e3)
            times["exact"].append((t2 - t1) * 1e3)

    def summary(ms: list[float]) -> dict[str, float]:
        return {"mean": round(float(np.mean(ms)), 3), "p50": round(float(np.percentile(ms, 50)), 3),
                "p99": round(float(np.percentile(ms, 99)), 3)}

    out = {
        "benchmark": "recs_topk", "repo": str(args.repo), "users": len(people), "items": index.size,
        "k": args.k, "pool": args.pool, "rounds": args.rounds,
        "command": "python -m benchmarks.recs_topk " + " ".join(argv or []),
        "wrong_top_k": wrong, "widened": widened,
        "ms": {name: summary(ms) for name, ms in times.items()},
    }
    out["exact_mean_over_single_pass"] = round(out["ms"]["exact"]["mean"] / out["ms"]["single_pass"]["mean"], 2)
    report(out, args.out)
    return out


if __name__ == "__main__":
    main()
