"""Recommendation load: the tiered feature cache against Feast-only reads, over HTTP, in one run.

    python -m benchmarks.recommend_load [--url URL [--baseline-url URL]] [--ratings FILE.csv]
        [--concurrency C] [--duration S] [--k K] [--rounds N]

Requests: `POST /v1/recommendations` for users drawn with the ratings file's skew (each user with
probability proportional to their number of rows), `k` fixed. Each arm reports requests/s, p50/p99
latency as the client sees it, errors, and per-tier hit ratios of the feature reads, read from the
app's own `/metrics` (`tierserve_tier_hits_total` / `tierserve_tier_misses_total`, namespace
`features`) as the difference between a scrape before and after each measured round.

The two arms:
- `tiered`: the Recommender as deployed (`recommender.tiers: all`): Redis -> RocksDB -> Feast.
- `feast_only`: the same Recommender with `recommender.tiers: feast-only`: every feature read is
  one Feast online-store call, no RAM or SSD tier.
The recommendation result cache is off in both (`recommender.result_cache: false`): with it on, a
repeated user would be one Redis GET and the feature reads this benchmark compares would not
happen at all.

Where the apps come from:
- No `--url` (the measured figures in benchmarks/results/ come from this): the benchmark builds
  (or copies, when the project's repo was built from the same file) a Feast repo for `--ratings`
  in a temp folder, starts Ray, an embedded Redis (unless REDIS_URL is set) and Serve on a free
  port, and deploys the real application as configs/local.yaml does (`deployments.app:build_app`
  at `/` and `build_recs_app` at `/v1/recommendations`, which answers recommendations one hop from
  the proxy) with `tiers: all`, plus a third application at `/feast-only/v1/recommendations`: a
  Recommender with `tiers: feast-only`, answering the same way (and an Ingress at `/feast-only`
  whose `/metrics` shows that Recommender's tier counters). Both arms run side by side on the
  same Redis, repo and machine.
- `--url URL`: the app already running there is measured as it is configured (its arm name is
  read from `/v1/cache/stats`); pass `--baseline-url` for an app started with
  `recommender.tiers: feast-only` (and, for the comparison to mean anything, `result_cache: false`
  on both) to get both arms. The users must exist in that app's feature repo.

The arms alternate in short rounds (tiered, feast-only, tiered, ...) after a warm-up of each, so
a noisy neighbour on a shared machine slows both alike instead of whichever ran second.
The last line printed is one JSON object with the figures; the same object goes to
benchmarks/results/recommend_load_<ratings folder>_<ratings file stem>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

from benchmarks.app_runner import REPO_ROOT, report, serve_here, wait_running

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_RATINGS = REPO_ROOT.parent / "shared" / "data" / "movielens_latest_small_2015" / "ratings.csv"
TIER_FAMILIES = {"tierserve_tier_hits_total": "hits", "tierserve_tier_misses_total": "misses"}
FEATURE_NAMESPACE = "features"
ARM_TIERED, ARM_FEAST = "tiered", "feast_only"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running app (default: start one for each arm here)")
    p.add_argument("--baseline-url", default=None, help="with --url: a running feast-only app")
    p.add_argument("--ratings", type=Path, default=DEFAULT_RATINGS)
    p.add_argument("--movies", type=Path, default=None, help="default: movies.csv next to the ratings, if any")
    p.add_argument("--user-col", default="userId")
    p.add_argument("--item-col", default="movieId")
    p.add_argument("--time-col", default="timestamp")
    p.add_argument("--rating-col", default="rating", help="'' for implicit feedback")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per arm")
    p.add_argument("--warmup", type=float, default=10.0, help="unmeasured seconds per arm first")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds the duration is split into")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def _say(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- the workload
def user_weights(ratings: Path, user_col: str) -> tuple[np.ndarray, np.ndarray]:
    """Distinct users and their share of the file's rows (the request skew)."""
    counts = pd.read_csv(ratings, usecols=[user_col])[user_col].value_counts()
    users = counts.index.to_numpy(dtype=np.int64)
    weights = counts.to_numpy(dtype=np.float64)
    return users, weights / weights.sum()


class UserStream:
    def __init__(self, users: np.ndarray, probs: np.ndarray, seed: int) -> None:
        self.users, self.probs = users, probs
        self.rng = np.random.default_rng(seed)
        self._buf: list[int] = []

    def next(self) -> int:
        if not self._buf:
            self._buf = self.rng.choice(self.users, size=4096, p=self.probs).tolist()
        return int(self._buf.pop())


async def drive(url: str, stream: UserStream, *, k: int, concurrency: int, seconds: float) -> dict[str, Any]:
    """`concurrency` closed-loop clients for `seconds`; latencies of successful requests."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    degraded = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal degraded
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    resp = await client.post("/v1/recommendations", json={"user_id": stream.next(), "k": k})
                    status = resp.status_code
                except httpx.HTTPError:
                    status = -1
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                    degraded += bool(resp.json().get("degraded"))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"latencies": latencies, "statuses": statuses, "elapsed": elapsed, "degraded": degraded}


def tier_counters(url: str) -> dict[tuple[str, str], float]:
    """(tier, hits|misses) -> counter value for the feature namespace, from the app's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=60).text
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            kind = TIER_FAMILIES.get(s.name)
            if kind and s.labels.get("namespace") == FEATURE_NAMESPACE:
                key = (s.labels["tier"], kind)
                out[key] = out.get(key, 0.0) + s.value
    return out


def summarise(runs: list[dict[str, Any]], tiers: dict[tuple[str, str], float]) -> dict[str, Any]:
    latencies = np.asarray([x for r in runs for x in r["latencies"]], dtype=np.float64)
    statuses: dict[str, int] = {}
    for r in runs:
        for code, n in r["statuses"].items():
            statuses[str(code)] = statuses.get(str(code), 0) + n
    elapsed = sum(r["elapsed"] for r in runs)
    ok = int(latencies.size)
    names = sorted({t for t, _ in tiers})
    asked = None
    ratios: dict[str, float | None] = {}
    lookups: dict[str, int] = {}
    for t in names:
        hits, misses = tiers.get((t, "hits"), 0.0), tiers.get((t, "misses"), 0.0)
        ratios[t] = round(hits / (hits + misses), 4) if hits + misses else None
        lookups[t] = int(hits + misses)
    # Share of all feature keys each tier answered: keys asked = lookups of the first tier asked.
    for first in ("redis", "rocksdb", "feast"):
        if lookups.get(first):
            asked = lookups[first]
            break
    share = {t: round(tiers.get((t, "hits"), 0.0) / asked, 4) for t in names} if asked else {}
    return {
        "requests_per_s": round(ok / elapsed, 2) if elapsed else 0.0,
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 2) if ok else None,
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 2) if ok else None,
        "requests": ok,
        "errors": sum(n for code, n in statuses.items() if code != "200"),
        "statuses": statuses,
        "degraded": sum(r["degraded"] for r in runs),
        "seconds": round(elapsed, 2),
        "tier_hit_ratio": ratios,
        "tier_share_of_feature_keys": share,
        "feature_keys_asked": asked or 0,
    }


def arm_name(url: str) -> str:
    stats = httpx.get(f"{url}/v1/cache/stats", timeout=60).json()
    rec = stats.get("recommender") or {}
    return ARM_FEAST if rec.get("tiers") == "feast-only" else ARM_TIERED


def measure(arms: dict[str, str], stream_factory: Any, args: argparse.Namespace) -> dict[str, Any]:
    for name, url in arms.items():
        _say(f"[{name}] warm-up {args.warmup:.0f}s at {url}")
        asyncio.run(drive(url, stream_factory(name, -1), k=args.k, concurrency=args.concurrency, seconds=args.warmup))
    per_round = args.duration / max(args.rounds, 1)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in arms}
    tiers: dict[str, dict[tuple[str, str], float]] = {n: {} for n in arms}
    for rnd in range(max(args.rounds, 1)):
        for name, url in arms.items():
            before = tier_counters(url)
            run = asyncio.run(drive(url, stream_factory(name, rnd), k=args.k, concurrency=args.concurrency,
                                    seconds=per_round))
            after = tier_counters(url)
            for key in set(before) | set(after):
                tiers[name][key] = tiers[name].get(key, 0.0) + after.get(key, 0.0) - before.get(key, 0.0)
            runs[name].append(run)
            ok = len(run["latencies"])
            _say(f"[{name}] round {rnd + 1}/{args.rounds}: {ok / run['elapsed']:.1f} req/s, "
                 f"statuses {run['statuses']}")
    return {n: summarise(runs[n], tiers[n]) for n in arms}


# --------------------------------------------------------------------- self-hosted apps
@contextmanager
def self_hosted(args: argparse.Namespace) -> Iterator[dict[str, str]]:
    """Ray + Serve + Redis here; the real app (tiered) at / and a feast-only one at /feast-only."""
    from ray import serve

    with serve_here(args, prefix="recommend-load-", ray_prefix="rlray-", redis_from_env=True) as here:
        from deployments.app import RECS_ROUTE_PREFIX, build_app, build_recs_app
        from deployments.config import AppSettings
        from deployments.ingress import Ingress

        app_args = dict(here.cfg.get("args") or {})
        app_args["recommender"] = {**(app_args.get("recommender") or {}), "tiers": "all", "result_cache": False}
        _say(f"starting the app on port {here.port} (the chat deployments too: a minute or more)")
        started = time.monotonic()
        # As configs/local.yaml deploys it: the Ingress's application and `recs`, which answers
        # /v1/recommendations itself; the Feast-only arm is a `recs` twin under /feast-only.
        serve.run(build_app(app_args), name="tierserve", route_prefix="/", blocking=False)
        serve.run(build_recs_app(app_args), name="recs", route_prefix=RECS_ROUTE_PREFIX, blocking=False)
        feast_args = {**app_args, "recommender": {**app_args["recommender"], "tiers": "feast-only"}}
        serve.run(build_recs_app(feast_args), name="recs-feast-only", route_prefix=f"/feast-only{RECS_ROUTE_PREFIX}",
                  blocking=False)
        # An Ingress at /feast-only for the arm's /metrics (its tier counters): it reaches the
        # twin's Recommender through the handle it is given (the chat slots are never called).
        feast_recs = serve.get_deployment_handle("Recommender", app_name="recs-feast-only")
        chat = [serve.get_deployment_handle(n, app_name="tierserve") for n in ("Encoder", "SemanticCache", "LLM")]
        serve.run(Ingress.bind(AppSettings.from_args(feast_args).model_dump(), *chat, feast_recs),
                  name="tierserve-feast-only", route_prefix="/feast-only", blocking=False)
        wait_running(["tierserve", "recs", "recs-feast-only", "tierserve-feast-only"])
        _say(f"apps running after {time.monotonic() - started:.0f}s")
        yield {ARM_TIERED: here.base, ARM_FEAST: f"{here.base}/feast-only"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.ratings = args.ratings.resolve()
    users, probs = user_weights(args.ratings, args.user_col)
    _say(f"{len(users)} users in {args.ratings.name}; the top 1% of users get "
         f"{float(np.sort(probs)[::-1][: max(1, len(users) // 100)].sum()):.1%} of the requests")

    def stream_factory(arm: str, rnd: int) -> UserStream:
        # The same user sequence for both arms in a round: they serve identical workloads.
        return UserStream(users, probs, seed=args.seed * 1000 + rnd + 1)

    with ExitStack() as stack:
        if args.url:
            arms = {arm_name(args.url): args.url.rstrip("/")}
            if args.baseline_url:
                arms[arm_name(args.baseline_url)] = args.baseline_url.rstrip("/")
            mode = "external"
        else:
            arms = stack.enter_context(self_hosted(args))
            mode = "self-hosted"
        results = measure(arms, stream_factory, args)

    out: dict[str, Any] = {
        "benchmark": "recommend_load",
        "ratings": str(args.ratings),
        "mode": mode,
        "concurrency": args.concurrency,
        "duration_s_per_arm": args.duration,
        "warmup_s_per_arm": args.warmup,
        "k": args.k,
        "result_cache": False if mode == "self-hosted" else "as configured",
        "users": len(users),
        "arms": results,
    }
    if ARM_TIERED in results and ARM_FEAST in results and results[ARM_FEAST]["requests_per_s"]:
        out["speedup_requests_per_s"] = round(
            results[ARM_TIERED]["requests_per_s"] / results[ARM_FEAST]["requests_per_s"], 2)
    report(out, args.out_dir / f"recommend_load_{args.ratings.parent.name}_{args.ratings.stem}.json")
    return out


if __name__ == "__main__":
    main()
