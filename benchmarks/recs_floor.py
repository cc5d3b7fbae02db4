"""How close `POST /v1/recommendations` is to its floor, over HTTP, in one run.

    python -m benchmarks.recs_floor [--label NAME] [--sequential N] [--concurrency 8] [--duration S]
        [--rounds R] [--warmup S] [--profile]

The floor of one recommendation is one Serve hop, a Redis read of the user's features, a FAISS
search and a small numpy score. The app's own `GET /healthz` (one Serve hop to the Ingress and one
Redis PING) stands for "one hop"; every figure below comes from the same run:

0. priming: one unmeasured request per user of the ratings file, so every row sits in the RAM
   tier (the result cache is off: "uncached" below means every request computes its answer).
1. sequential, uncached: `--sequential` users (all by default) once each, in random order, one
   request at a time, each recommendation followed by a `/healthz`, a Feast-only and a two-hop
   recommendation and a `post_floor` request (so noise from neighbours on a shared machine hits
   all five alike). Target: p50 <= 1.5 x healthz p50. `post_floor` is a replica that validates
   the same body and answers at once: what any POST costs through Serve's proxy, which `GET
   /healthz` does not show (the replica fetches a request's body from the proxy in a second call).
2. concurrency: `--concurrency` closed-loop clients, the tiered, Feast-only and two-hop arms
   alternating in `--rounds` rounds (benchmarks.recommend_load.drive). Targets: tiered requests/s
   >= 3 x Feast-only's, and tiered p99 <= 3 x its p50.
3. what the second hop costs: the same rows through the route the app takes with
   `recommendations_app: null` (proxy -> Ingress -> Recommender), beside the one-hop arms.
4. with `--profile`: py-spy samples the proxy and the Recommender (only threads holding the
   GIL, i.e. running Python: `py-spy record --gil -f raw`) during one more concurrent round of the
   tiered arm, and each sample is charged to the stage of its innermost recognised frame
   (`STAGES`): CPU ms per request per process and stage. The flame data itself lands under
   benchmarks/results/recs_floor_profile/.

The apps: Ray, an embedded Redis and Serve on a free port, here, with the result cache off (every
request computes), as configs/local.yaml deploys them: `recs` at `/v1/recommendations`, the
Recommender answering HTTP itself (`tiers: all`, deployments/recommender_http.py: one hop);
`recs-feast-only` at `/feast-only/v1/recommendations`, the same with `tiers: feast-only` (every
feature read is a Feast call); `ingress` at `/`, for `/healthz`; `recs-two-hops` at `/two-hops`,
an Ingress owning its own Recommender (`tiers: all`, item 3 above). The chat deployments are not
on this path, so none is started: an Ingress gets a Recommender's handle in their slots (it calls
them only on chat routes and in `/metrics`, which this benchmark does not read). The figures go
to benchmarks/results/recs_floor_<label>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.app_runner import REPO_ROOT, report, serve_here, wait_running
from benchmarks.recommend_load import DEFAULT_RATINGS, RESULTS_DIR, UserStream, drive, user_weights

TARGET_HEALTHZ_RATIO = 1.5
TARGET_SPEEDUP = 3.0
TARGET_TAIL = 3.0
PY_SPY = Path(os.environ.get("VIRTUAL_ENV", REPO_ROOT / ".venv")) / "bin" / "py-spy"
# (stage, regex on a frame "function (file:line)"): the innermost frame that matches decides, the
# first stage listed wins on one frame (decode_features lives in tiers/feast.py but is msgpack).
STAGES: list[tuple[str, re.Pattern[str]]] = [
    (name, re.compile(pat)) for name, pat in [
        ("serialisation", r"\((json|msgpack|pickle|pydantic|pydantic_core|cloudpickle)/|jsonable_encoder|serializ|decode_features"),
        ("feast", r"\((feast|sqlite3)/|tiers/feast\.py"),
        ("redis", r"\(redis/|caches/redis_client\.py|tiers/redis\.py|admission/shared\.py|invalidation\.py"),
        ("faiss", r"\(faiss/|vector_index\.py|search(_scored)? \(deployments/recommender_model\.py"),
        ("tiered-cache bookkeeping", r"caches/(tiered\w*|features|admission/\w+)\.py|tiers/rocksdb\.py|\(rocksdict/"),
        ("recommender: scoring, loops", r"deployments/recommender(_model)?\.py|\(numpy/|caches/versions\.py"),
        ("ingress route", r"deployments/(ingress|metrics)\.py|\(prometheus_client/"),
        ("http (uvicorn/starlette/fastapi)", r"\((starlette|fastapi|uvicorn|h11|httptools|anyio)/"),
        ("serve/ray plumbing", r"\(ray/|_raylet|\(grpc/"),
        ("asyncio/threads", r"\((asyncio|threading|concurrent|selectors)"),
    ]
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="run", help="results file suffix (e.g. before / after)")
    p.add_argument("--ratings", type=Path, default=DEFAULT_RATINGS)
    p.add_argument("--sequential", type=int, default=0, help="users in the sequential part (0: all)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per arm at concurrency")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=float, default=10.0, help="unmeasured seconds per arm first")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="py-spy the tiered arm's processes (one more round)")
    p.add_argument("--profile-seconds", type=float, default=15.0)
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra environment variable for the Ray processes (e.g. a Serve flag to compare)")
    p.add_argument("--reclassify", action="store_true", help="only redo --label's stage table from its raw files")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    # feature_repo() reads these (the ratings file's column names)
    p.add_argument("--movies", type=Path, default=None)
    p.add_argument("--user-col", default="userId")
    p.add_argument("--item-col", default="movieId")
    p.add_argument("--time-col", default="timestamp")
    p.add_argument("--rating-col", default="rating")
    return p.parse_args(argv)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(xs), q)) * 1000, 2) if xs else None


# ------------------------------------------------------------------------------ the apps
@contextmanager
def recs_apps(args: argparse.Namespace) -> Iterator[dict[str, str]]:
    from ray import serve

    extra_env = dict(kv.split("=", 1) for kv in args.serve_env)
    with serve_here(args, prefix="recs-floor-", ray_prefix="rfray-", extra_env=extra_env) as here:
        from benchmarks.post_floor import post_floor_app
        from deployments.app import RECS_ROUTE_PREFIX, build_recs_app
        from deployments.config import AppSettings
        from deployments.ingress import Ingress
        from deployments.recommender import RecommenderDeployment

        cfg = here.cfg
        app_args = dict(cfg.get("args") or {})

        def args_for(tiers: str) -> dict[str, Any]:
            recommender = {**(cfg["args"].get("recommender") or {}), "tiers": tiers, "result_cache": False}
            return {**app_args, "recommender": recommender}

        # The app's route (configs/local.yaml's `recs` application) and its Feast-only twin: one hop.
        serve.run(build_recs_app(args_for("all")), name="recs", route_prefix=RECS_ROUTE_PREFIX, blocking=False)
        serve.run(build_recs_app(args_for("feast-only")), name="recs-feast-only",
                  route_prefix=f"/feast-only{RECS_ROUTE_PREFIX}", blocking=False)
        # The floor of any POST through Serve's proxy: the same body, validated, and no work.
        serve.run(post_floor_app(), name="post-floor", route_prefix=f"/post-floor{RECS_ROUTE_PREFIX}", blocking=False)
        # /healthz: an Ingress at / (the chat slots get the Recommender's handle: never called here).
        recs = serve.get_deployment_handle("Recommender", app_name="recs")
        settings = AppSettings.from_args(args_for("all"))
        serve.run(Ingress.bind(settings.model_dump(), recs, recs, recs, recs), name="ingress", route_prefix="/",
                  blocking=False)
        # The two-hop route: an Ingress owning its own Recommender (`recommendations_app: null`).
        settings.recommendations_app = None
        rec = RecommenderDeployment.bind(settings.redis, settings.state_dir, settings.recommender.model_dump())
        serve.run(Ingress.bind(settings.model_dump(), rec, rec, rec, rec), name="recs-two-hops",
                  route_prefix="/two-hops", blocking=False)
        wait_running(["recs", "recs-feast-only", "post-floor", "ingress", "recs-two-hops"])
        yield {"tiered": here.base, "feast_only": f"{here.base}/feast-only", "two_hops": f"{here.base}/two-hops",
               "post_floor": f"{here.base}/post-floor"}


def replica_pids() -> dict[str, int]:
    """This driver's Serve processes by role (Ray names them in their process title)."""
    import psutil

    roles = {"proxy": "ProxyActor", "recommender": "ServeReplica:recs:Recommender"}
    out: dict[str, int] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        for role, marker in roles.items():
            if marker in title and role not in out:
                out[role] = proc.pid
    return out


# ----------------------------------------------------------------------------- measuring
def sequential(arms: dict[str, str], users: list[int], k: int) -> dict[str, Any]:
    """Each user once per arm, one request at a time, interleaved with /healthz."""
    lat: dict[str, list[float]] = defaultdict(list)
    sources: Counter[str] = Counter()
    bad: Counter[str] = Counter()
    with httpx.Client(timeout=60) as client:
        for user in users:
            for name, url, path, body in (
                ("tiered", arms["tiered"], "/v1/recommendations", {"user_id": user, "k": k}),
                ("healthz", arms["tiered"], "/healthz", None),
                ("feast_only", arms["feast_only"], "/v1/recommendations", {"user_id": user, "k": k}),
                ("two_hops", arms["two_hops"], "/v1/recommendations", {"user_id": user, "k": k}),
                ("post_floor", arms["post_floor"], "/v1/recommendations", {"user_id": user, "k": k}),
            ):
                t0 = time.perf_counter()
                resp = client.post(url + path, json=body) if body else client.get(url + path)
                dt = time.perf_counter() - t0
                if resp.status_code != 200:
                    bad[f"{name}:{resp.status_code}"] += 1
                    continue
                lat[name].append(dt)
                if name == "tiered":
                    sources[str(resp.json().get("sources", {}).get("user"))] += 1
    out: dict[str, Any] = {n: {"p50_ms": _pct(v, 50), "p99_ms": _pct(v, 99), "n": len(v)} for n, v in lat.items()}
    out["tiered_user_feature_sources"] = dict(sources)
    out["errors"] = dict(bad)
    if lat["tiered"] and lat["healthz"]:
        out["tiered_p50_over_healthz_p50"] = round(out["tiered"]["p50_ms"] / out["healthz"]["p50_ms"], 2)
    if lat["post_floor"] and lat["healthz"]:
        out["post_floor_p50_over_healthz_p50"] = round(out["post_floor"]["p50_ms"] / out["healthz"]["p50_ms"], 2)
    if lat["two_hops"] and lat["healthz"]:
        out["two_hops_p50_over_healthz_p50"] = round(out["two_hops"]["p50_ms"] / out["healthz"]["p50_ms"], 2)
    return out


async def prime(url: str, users: list[int], k: int, concurrency: int) -> None:
    queue = list(users)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def worker() -> None:
            while queue:
                await client.post("/v1/recommendations", json={"user_id": queue.pop(), "k": k})

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def concurrent(arms: dict[str, str], users: np.ndarray, probs: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    per_round = args.duration / max(1, args.rounds)
    for rnd in range(max(1, args.rounds)):
        for name in ("tiered", "feast_only", "two_hops"):
            stream = UserStream(users, probs, seed=args.seed * 1000 + rnd + 1)  # same users for both arms
            run = asyncio.run(drive(arms[name], stream, k=args.k, concurrency=args.concurrency, seconds=per_round))
            runs[name].append(run)
            _say(f"[{name}] round {rnd + 1}: {len(run['latencies']) / run['elapsed']:.1f} req/s {run['statuses']}")
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        lat = [x for r in rs for x in r["latencies"]]
        elapsed = sum(r["elapsed"] for r in rs)
        statuses: Counter[str] = Counter()
        for r in rs:
            statuses.update({str(c): n for c, n in r["statuses"].items()})
        out[name] = {"requests_per_s": round(len(lat) / elapsed, 2), "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
                     "requests": len(lat), "statuses": dict(statuses), "degraded": sum(r["degraded"] for r in rs)}
        out[name]["p99_over_p50"] = round(out[name]["p99_ms"] / out[name]["p50_ms"], 2) if lat else None
    if out.get("feast_only", {}).get("requests_per_s"):
        out["speedup_requests_per_s"] = round(out["tiered"]["requests_per_s"] / out["feast_only"]["requests_per_s"], 2)
    if out.get("two_hops", {}).get("requests_per_s"):
        out["tiered_over_two_hops_requests_per_s"] = round(out["tiered"]["requests_per_s"] / out["two_hops"]["requests_per_s"], 2)
    return out


def classify(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):  # innermost first
        for name, pat in STAGES:
            if pat.search(frame):
                return name
    return "other"


def profile(arms: dict[str, str], users: np.ndarray, probs: np.ndarray, args: argparse.Namespace,
            out_dir: Path) -> dict[str, Any]:
    pids = replica_pids()
    out_dir.mkdir(parents=True, exist_ok=True)
    rate = 100
    procs = {}
    for role, pid in pids.items():
        target = out_dir / f"{args.label}_{role}.txt"
        procs[role] = (target, subprocess.Popen(
            [str(PY_SPY), "record", "-p", str(pid), "-r", str(rate), "-d", str(int(args.profile_seconds) + 2),
             "-f", "raw", "--gil", "-o", str(target), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)
    stream = UserStream(users, probs, seed=args.seed * 1000 + 99)
    run = asyncio.run(drive(arms["tiered"], stream, k=args.k, concurrency=args.concurrency, seconds=args.profile_seconds))
    for _, proc in procs.values():
        proc.wait(timeout=120)
    return stage_table(out_dir, args.label, max(1, len(run["latencies"])), rate)


def stage_table(prof_dir: Path, label: str, requests: int, rate: int) -> dict[str, Any]:
    """GIL-holding ms per request by process and stage, from the raw py-spy files of a run."""
    table: dict[str, Any] = {"requests": requests, "sample_rate_hz": rate}
    for role in ("proxy", "ingress", "recommender"):  # ingress: in runs from before the one-hop route
        target = prof_dir / f"{label}_{role}.txt"
        if not target.exists():
            continue
        stages: Counter[str] = Counter()
        for line in target.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                stages[classify(stack)] += int(count)
        # samples / rate = seconds; per request in ms
        table[role] = {s: round(c / rate / requests * 1000, 3) for s, c in stages.most_common()}
        table[role]["total"] = round(sum(stages.values()) / rate / requests * 1000, 3)
    return table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.reclassify:  # the stage table again from a run's raw files (after a change to STAGES)
        target = args.out_dir / f"recs_floor_{args.label}.json"
        out = json.loads(target.read_text())
        prof = out["profile_cpu_ms_per_request"]
        out["profile_cpu_ms_per_request"] = stage_table(args.out_dir / "recs_floor_profile", args.label,
                                                        prof["requests"], prof["sample_rate_hz"])
        target.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out["profile_cpu_ms_per_request"], indent=1))
        return out
    args.ratings = args.ratings.resolve()
    users, probs = user_weights(args.ratings, args.user_col)
    order = [int(u) for u in users]
    random.Random(args.seed).shuffle(order)
    if args.sequential:
        order = order[: args.sequential]
    out: dict[str, Any] = {"benchmark": "recs_floor", "label": args.label, "ratings": str(args.ratings), "k": args.k,
                           "concurrency": args.concurrency, "result_cache": False, "serve_env": args.serve_env,
                           "command": "python -m benchmarks.recs_floor " + " ".join(argv if argv is not None else sys.argv[1:])}
    with recs_apps(args) as arms:
        for name in ("tiered", "feast_only", "two_hops"):
            _say(f"[{name}] warm-up {args.warmup:.0f}s")
            asyncio.run(drive(arms[name], UserStream(users, probs, seed=7), k=args.k, concurrency=args.concurrency,
                              seconds=args.warmup))
        # Every user once through the tiered arm first: the sequential and concurrent parts then
        # measure the steady state (the user's row in RAM), not the first read of a user ever (a
        # Feast read, which would land in the tail of whichever part met that user first).
        _say(f"priming: {len(users)} users through the tiered and two-hop arms")
        for name in ("tiered", "two_hops"):
            asyncio.run(prime(arms[name], [int(u) for u in users], args.k, args.concurrency))
        _say(f"sequential: {len(order)} users, recs / healthz / feast-only / two-hops / post-floor interleaved")
        out["sequential"] = sequential(arms, order, args.k)
        _say(json.dumps(out["sequential"]))
        out["concurrent"] = concurrent(arms, users, probs, args)
        _say(json.dumps(out["concurrent"]))
        if args.profile:
            out["profile_cpu_ms_per_request"] = profile(arms, users, probs, args, args.out_dir / "recs_floor_profile")
            _say(json.dumps(out["profile_cpu_ms_per_request"], indent=1))
    seq, conc = out["sequential"], out["concurrent"]
    out["targets"] = {
        f"sequential p50 <= {TARGET_HEALTHZ_RATIO}x healthz p50": seq.get("tiered_p50_over_healthz_p50"),
        f"concurrency {args.concurrency} req/s >= {TARGET_SPEEDUP}x feast-only": conc.get("speedup_requests_per_s"),
        f"p99 <= {TARGET_TAIL}x p50 (concurrent)": conc["tiered"].get("p99_over_p50"),
    }
    report(out, args.out_dir / f"recs_floor_{args.label}.json")
    return out


if __name__ == "__main__":
    main()
