"""HTTP load and soak test against a running tierserve app.

    python -m benchmarks.http_load --url http://127.0.0.1:8000 --stream FILE.jsonl \
        [--concurrency C] [--duration S] [--recs-fraction F] [--ratings FILE.csv]

Chat traffic replays the stream file's `text` fields in order (temperature 0, so repeats in the
stream become exact or semantic hits, as they would in production); recommendation traffic asks
for users drawn from the ratings file weighted by their number of ratings (active users come back
more often), plus a share of users that do not exist (the cold-start path). The run is bounded by
--duration and --max-requests, whichever comes first, and only talks to loopback addresses.

Reported per class: requests/s and p50/p99 latency, where the class is the chat answer's `x-cache`
header (exact | semantic | miss | bypass) or, for recommendations, whether the answer came from
the result cache (cached | uncached). Errors are every non-2xx answer and every transport error,
counted by kind. Memory is read before, during and after the run: the summed RSS of the app's Ray
Serve replica processes (and their children, e.g. a vLLM engine core) and Redis `used_memory`.
The last line printed is one JSON object with every figure; it is also written to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import ipaddress
import itertools
import json
import os
import random
import socket
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RATINGS = REPO_ROOT.parent / "shared" / "data" / "movielens_latest_small_2015" / "ratings.csv"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "http_load.json"
REPLICA_MARK = "ray::ServeReplica:"
ERROR_SAMPLES = 10
CLASSES = ("chat:exact", "chat:semantic", "chat:miss", "chat:bypass", "recs:cached", "recs:uncached")


# ----------------------------------------------------------------------------- inputs
def read_stream(path: Path, max_chars: int) -> list[str]:
    """Texts of a JSONL stream, in order. Lines without a usable `text` are skipped, not fatal."""
    texts: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            text = record.get("text") if isinstance(record, dict) else None
            if isinstance(text, str) and text.strip():
                # Truncated so that an outlier line cannot exceed the model's context and turn
                # into a 400 that would read as an app error.
                texts.append(text[:max_chars])
    if not texts:
        raise SystemExit(f"{path}: no line with a non-empty `text` field")
    return texts


def read_user_activity(path: Path) -> tuple[list[int], list[int]]:
    """User ids and their rating counts from a MovieLens-style CSV (`userId` column)."""
    counts: Counter[int] = Counter()
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None) or []
        lowered = [h.strip().lower() for h in header]
        column = next((lowered.index(n) for n in ("userid", "user_id", "user") if n in lowered), None)
        if column is None:
            raise SystemExit(f"{path}: no userId column in header {header}")
        for row in reader:
            try:
                counts[int(row[column])] += 1
            except (IndexError, ValueError):
                continue
    if not counts:
        raise SystemExit(f"{path}: no user ids")
    users = list(counts)
    return users, [counts[u] for u in users]


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise SystemExit(f"cannot resolve {host!r}: {exc}") from exc
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"{url} is not a loopback address: this load generator only targets a local app")


# ----------------------------------------------------------------------------- memory
def listener_pids(port: int) -> list[int]:
    """Processes listening on `port`. More than one means SO_REUSEPORT sharing (Ray Serve's proxy
    sets it): the kernel then spreads connections over unrelated apps."""
    try:
        return sorted({int(c.pid) for c in psutil.net_connections(kind="tcp")
                       if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid})
    except (psutil.AccessDenied, PermissionError):
        return []


def _deployment_of(cmdline: str) -> str:
    # Ray sets the title to e.g. `ray::ServeReplica:tierserve:LLM.handle_request`.
    rest = (cmdline.split(REPLICA_MARK, 1)[1].split() or ["?"])[0]
    return rest.split(":")[-1].split(".")[0]


def replica_processes(port: int) -> tuple[list[psutil.Process], str]:
    """The Serve replica processes of the app behind `port`, and how they were found.

    Several Ray clusters may run on one machine (a test session beside a soak run): the replicas
    of *this* app are the siblings of the HTTP proxy that listens on the port, i.e. children of
    the same raylet. Without a listener in sight (no permission), every replica on the machine
    is counted and the source says so.
    """
    listeners = listener_pids(port)
    listener = listeners[0] if len(listeners) == 1 else None
    candidates: list[psutil.Process]
    source: str
    try:
        if listener is not None:
            parent = psutil.Process(listener).parent()
            candidates = parent.children() if parent is not None else []
            source = f"rss of ray::ServeReplica processes (+children) under the raylet of the proxy on port {port}"
        else:
            candidates = list(psutil.process_iter())
            source = ("rss of every ray::ServeReplica process on this machine (+children): "
                      f"{len(listeners)} processes listen on port {port}, none singled out")
    except psutil.Error:
        candidates, source = list(psutil.process_iter()), "rss of every ray::ServeReplica process (+children)"
    found: list[psutil.Process] = []
    for proc in candidates:
        try:
            if REPLICA_MARK in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found, source


def memory_snapshot(port: int, redis_url: str | None) -> dict[str, Any]:
    procs, source = replica_processes(port)
    by_deployment: dict[str, int] = defaultdict(int)
    for proc in procs:
        try:
            name = _deployment_of(" ".join(proc.cmdline()))
            family = [proc, *proc.children(recursive=True)]
            by_deployment[name] += sum(p.memory_info().rss for p in family if p.is_running())
        except psutil.Error:
            continue
    snap: dict[str, Any] = {
        "replica_rss_bytes": sum(by_deployment.values()),
        "replica_rss_by_deployment": dict(sorted(by_deployment.items())),
        "replica_processes": len(procs),
        "rss_source": source,
        "redis_used_memory_bytes": None,
    }
    if redis_url:
        try:
            import redis

            client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
            info = client.info("memory")
            snap["redis_used_memory_bytes"] = int(info["used_memory"])
            snap["redis_keys"] = int(client.dbsize())
            client.close()
        except Exception as exc:  # noqa: BLE001 - memory is a report, never a reason to abort the run
            snap["redis_error"] = f"{type(exc).__name__}: {exc}"
    return snap


# ----------------------------------------------------------------------------- the run
@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[dict[str, Any]] = field(default_factory=list)
    sent: int = 0

    def error(self, kind: str, route: str, body: dict[str, Any], detail: str) -> None:
        self.errors[kind] += 1
        if len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append({"kind": kind, "route": route, "request": body, "detail": detail[:500]})


@dataclass
class Workload:
    texts: list[str]
    users: list[int]
    weights: list[int]
    model: str
    recs_fraction: float
    unknown_fraction: float
    max_tokens: int
    rng: random.Random
    cursor: int = 0
    unknown_base: int = 0
    cum_weights: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Ids far above any real one: the cold-start path, never in the feature store.
        self.unknown_base = max(self.users) + 1
        # Once, not per draw: a large ratings file has hundreds of thousands of users.
        self.cum_weights = list(itertools.accumulate(self.weights))

    def next_request(self) -> tuple[str, str, dict[str, Any]]:
        if self.rng.random() < self.recs_fraction:
            if self.rng.random() < self.unknown_fraction:
                user = self.unknown_base + self.rng.randrange(1_000_000)
            else:
                user = self.rng.choices(self.users, cum_weights=self.cum_weights, k=1)[0]
            return "recs", "/v1/recommendations", {"user_id": user, "k": self.rng.choice((5, 10, 20))}
        # One cursor shared by all workers: the stream's order (and so its repeats) is kept.
        text = self.texts[self.cursor % len(self.texts)]
        self.cursor += 1
        body = {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": text}]}
        return "chat", "/v1/chat/completions", body


async def worker(client: httpx.AsyncClient, load: Workload, tally: Tally, deadline: float, max_requests: int) -> None:
    while time.monotonic() < deadline and tally.sent < max_requests:
        tally.sent += 1
        kind, route, body = load.next_request()
        started = time.perf_counter()
        try:
            resp = await client.post(route, json=body)
        except httpx.HTTPError as exc:
            tally.error(type(exc).__name__, route, body, str(exc) or repr(exc))
            continue
        elapsed = time.perf_counter() - started
        if not 200 <= resp.status_code < 300:
            tally.error(f"http_{resp.status_code}", route, body, resp.text)
            continue
        if kind == "chat":
            label = f"chat:{resp.headers.get('x-cache', 'none')}"
        else:
            try:
                answer = resp.json()
            except ValueError:
                tally.error("invalid_json", route, body, resp.text)
                continue
            label = "recs:cached" if answer.get("cached") else "recs:uncached"
        tally.latencies[label].append(elapsed)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarise(values: list[float], elapsed: float) -> dict[str, Any]:
    if not values:
        return {"count": 0, "rps": 0.0, "p50_ms": None, "p99_ms": None, "mean_ms": None}
    return {
        "count": len(values),
        "rps": round(len(values) / elapsed, 3) if elapsed > 0 else None,
        "p50_ms": round(percentile(values, 0.50) * 1000, 2),
        "p99_ms": round(percentile(values, 0.99) * 1000, 2),
        "mean_ms": round(sum(values) / len(values) * 1000, 2),
    }


async def wait_for_model(client: httpx.AsyncClient, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            resp = await client.get("/v1/models")
            if resp.status_code == 200:
                return str(resp.json()["data"][0]["id"])
            last = f"HTTP {resp.status_code}: {resp.text[:200]}"
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(2)
    raise SystemExit(f"GET /v1/models did not answer in {timeout_s:.0f}s ({last})")


def status_line(tally: Tally, started: float) -> str:
    elapsed = max(time.monotonic() - started, 1e-9)
    done = sum(len(v) for v in tally.latencies.values())
    classes = " ".join(f"{k}={len(v)}" for k, v in sorted(tally.latencies.items()))
    return f"[{elapsed:6.0f}s] ok={done} ({done / elapsed:.1f}/s) errors={sum(tally.errors.values())} {classes}"


async def monitor(tally: Tally, started: float, deadline: float, port: int, redis_url: str | None,
                  timeline: list[dict[str, Any]], every_s: float) -> None:
    """Memory samples during the run (is it bounded, or does it only look fine at the end?)."""
    use_rich = sys.stderr.isatty()
    live = None
    if use_rich:
        from rich.console import Console
        from rich.live import Live

        live = Live(console=Console(stderr=True), refresh_per_second=2, transient=True)
        live.start()
    next_sample = time.monotonic() + every_s
    try:
        while time.monotonic() < deadline:
            await asyncio.sleep(1)
            if live is not None:
                live.update(status_line(tally, started))
            if time.monotonic() >= next_sample:
                next_sample += every_s
                snap = await asyncio.to_thread(memory_snapshot, port, redis_url)
                timeline.append({"t_s": round(time.monotonic() - started, 1),
                                 "replica_rss_bytes": snap["replica_rss_bytes"],
                                 "redis_used_memory_bytes": snap["redis_used_memory_bytes"]})
                if live is None:
                    print(status_line(tally, started), file=sys.stderr, flush=True)
    finally:
        if live is not None:
            live.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    check_loopback(args.url)
    port = urlparse(args.url).port or (443 if args.url.startswith("https") else 80)
    texts = read_stream(Path(args.stream), args.max_chars)
    users, weights = read_user_activity(Path(args.ratings))
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    # trust_env=False: a proxy from the environment must never sit between us and loopback.
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout, limits=limits, headers=headers,
                                 trust_env=False) as client:
        model = await wait_for_model(client, args.wait)
        warnings: list[str] = []
        listeners = listener_pids(port)
        if len(listeners) > 1:
            warnings.append(f"{len(listeners)} processes listen on port {port} (pids {listeners}): connections are "
                            "spread over all of them, so some requests may reach another app")
            print(f"WARNING: {warnings[-1]}", file=sys.stderr, flush=True)
        load = Workload(texts=texts, users=users, weights=weights, model=model, recs_fraction=args.recs_fraction,
                        unknown_fraction=args.unknown_users_fraction, max_tokens=args.max_tokens,
                        rng=random.Random(args.seed))
        before = await asyncio.to_thread(memory_snapshot, port, args.redis_url)
        tally = Tally()
        timeline: list[dict[str, Any]] = []
        started = time.monotonic()
        deadline = started + args.duration
        mon = asyncio.create_task(monitor(tally, started, deadline, port, args.redis_url, timeline, args.sample_every))
        await asyncio.gather(*(worker(client, load, tally, deadline, args.max_requests) for _ in range(args.concurrency)))
        elapsed = time.monotonic() - started
        mon.cancel()
        await asyncio.gather(mon, return_exceptions=True)
    after = await asyncio.to_thread(memory_snapshot, port, args.redis_url)

    # Every class is listed, answered or not: "semantic: 0" is a finding, a missing key is not.
    classes = {k: summarise(tally.latencies.get(k, []), elapsed)
               for k in sorted(set(CLASSES) | set(tally.latencies))}
    by_route: dict[str, list[float]] = defaultdict(list)
    for label, values in tally.latencies.items():
        by_route[label.split(":", 1)[0]].extend(values)
    ok = sum(len(v) for v in tally.latencies.values())
    n_errors = sum(tally.errors.values())
    rss = [s["replica_rss_bytes"] for s in timeline] + [before["replica_rss_bytes"], after["replica_rss_bytes"]]
    redis_used = [s["redis_used_memory_bytes"] for s in timeline if s["redis_used_memory_bytes"] is not None]
    return {
        "benchmark": "http_load",
        "url": args.url,
        "stream": str(args.stream),
        "ratings": str(args.ratings),
        "model": model,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "max_requests": args.max_requests,
        "recs_fraction": args.recs_fraction,
        "unknown_users_fraction": args.unknown_users_fraction,
        "max_tokens": args.max_tokens,
        "elapsed_s": round(elapsed, 1),
        "requests": ok + n_errors,
        "ok": ok,
        "rps": round((ok + n_errors) / elapsed, 3),
        "routes": {k: summarise(v, elapsed) for k, v in sorted(by_route.items())},
        "classes": classes,
        "errors": {"count": n_errors, "by_kind": dict(tally.errors), "samples": tally.error_samples},
        "warnings": warnings,
        "memory": {
            "rss_source": after["rss_source"],
            "redis_source": f"INFO memory used_memory at {args.redis_url}" if args.redis_url
            else "not measured: pass --redis-url or set REDIS_URL",
            "before": before,
            "after": after,
            "replica_rss_peak_bytes": max(rss),
            "replica_rss_growth_bytes": after["replica_rss_bytes"] - before["replica_rss_bytes"],
            "redis_used_memory_peak_bytes": max(redis_used) if redis_used else after["redis_used_memory_bytes"],
            "timeline": timeline,
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the running app, e.g. http://127.0.0.1:8000 (loopback only)")
    p.add_argument("--stream", required=True, help="JSONL file with a `text` field per line")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    p.add_argument("--recs-fraction", type=float, default=0.3, help="share of recommendation requests")
    p.add_argument("--unknown-users-fraction", type=float, default=0.05,
                   help="share of recommendation requests for users not in the ratings file")
    p.add_argument("--ratings", default=str(DEFAULT_RATINGS), help="CSV with a userId column")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-chars", type=int, default=2000, help="truncate stream texts to this length")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the app to answer first")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), help="for `INFO memory` (default: $REDIS_URL)")
    p.add_argument("--api-key", default=os.environ.get("TIERSERVE_API_KEY"), help="bearer key when tenants are configured")
    p.add_argument("--sample-every", type=float, default=30.0, help="memory sample interval, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.duration <= 0 or args.max_requests < 1:
        p.error("--concurrency, --duration and --max-requests must be positive")
    if not 0.0 <= args.recs_fraction <= 1.0 or not 0.0 <= args.unknown_users_fraction <= 1.0:
        p.error("fractions must be between 0 and 1")
    return args


def lines(result: dict[str, Any]) -> Iterator[str]:
    yield f"{result['requests']} requests in {result['elapsed_s']}s ({result['rps']}/s), errors {result['errors']['count']}"
    for label, s in result["classes"].items():
        yield f"  {label:<16} n={s['count']:<6} {s['rps']:>7}/s  p50 {s['p50_ms']!s:>9} ms  p99 {s['p99_ms']!s:>9} ms"
    for kind, n in result["errors"]["by_kind"].items():
        yield f"  error {kind}: {n}"
    mem = result["memory"]
    mib = 1 << 20
    yield (f"  replica RSS {mem['before']['replica_rss_bytes'] / mib:.0f} -> {mem['after']['replica_rss_bytes'] / mib:.0f} MiB"
           f" (peak {mem['replica_rss_peak_bytes'] / mib:.0f})")
    if mem["after"]["redis_used_memory_bytes"] is not None:
        yield (f"  redis used_memory {mem['before']['redis_used_memory_bytes'] / mib:.1f} -> "
               f"{mem['after']['redis_used_memory_bytes'] / mib:.1f} MiB")


def write_result(result: dict[str, Any], out: str | Path, indent: int) -> Path:
    """The run's figures as JSON at `out` (its folder made); `out` as a Path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=indent) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    out = write_result(result, args.out, indent=2)
    for line in lines(result):
        print(line, file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr, flush=True)
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
