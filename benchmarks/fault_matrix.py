"""Fault matrix: the app under load while one dependency fails per row, checked for 5xx, stale
answers, lost writes and memory.

    python -m benchmarks.fault_matrix [--rows redis_restart,redis_slow,feast_down,replica_kill]
        [--duration 300] [--concurrency 16] [--window 0.2,0.5] [--event-every 1.0]

It starts its own app from a copy of --config (deployed as `serve run CONFIG` does, so the
deployment options apply; its own HTTP port, Ray temp dir, state dir, copy of the Feast repo, and
a redis-server it owns, passed as REDIS_URL so it can kill and restart it;
--recommender-replicas overrides the copy's Recommender count), warms it up (first uses are not
a fault's doing), then per row:
- load: `benchmarks.http_load`'s workload and workers (chat + recommendations, --concurrency
  connections), its memory monitor (replica RSS, Redis `used_memory`);
- events: one more connection posts rating events for a fixed set of known users all along
  (before, during and after the fault) and asks for each accepted user's recommendations at once;
- the fault, between the window's fractions of --duration: `redis_restart` (SIGKILL, then a fresh
  empty server on the same port), `redis_slow` (`DEBUG SLEEP` in a loop from another client),
  `feast_down` (the online store is a SQLite file: an exclusive lock on it makes every Feast read
  and push wait out SQLite's busy timeout and fail, as a hung store does), `replica_kill`
  (`ray.kill` of a Recommender replica actor - or --kill-deployment - twice in the window, with
  requests in flight);
- checks (benchmarks/fault_checks.py): every recommendation of an event user sent after a 202
  against that event (`n_ratings`, rated item not recommended); at the end, each event user's
  Feast row against the ratings answered 202 (lost writes, phantom writes).

Writes --out (JSON) and the same table as markdown beside it (.md). Results are a report on the
app's behaviour, not a speed claim.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import redis
import yaml

from benchmarks import http_load
from benchmarks.fault_checks import (
    AcceptedEvent,
    RecsAnswer,
    Window,
    final_reads,
    freshness,
    lost_writes,
    markdown,
    redis_budget,
)
from caches.redis_server import EmbeddedRedis, free_port

REPO_ROOT = http_load.REPO_ROOT
DEFAULT_STREAM = REPO_ROOT.parent / "shared" / "data" / "streams" / "banking77_zipf1.0_n20000_seed0.jsonl"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "fault_matrix.json"
ROWS = ("redis_restart", "redis_slow", "feast_down", "replica_kill", "ingress_kill")


# ----------------------------------------------------------------------------- the app
class App:
    """The app under test, in this process's own Ray instance (private temp dir: never joins or
    disturbs another Ray on the machine), with its own Redis, state and Feast copy."""

    def __init__(self, config: Path, workdir: Path, replicas: dict[str, int] | None = None) -> None:
        self.workdir = workdir
        self.config = yaml.safe_load(config.read_text())
        self.app_cfg = self.config["applications"][0]
        self.port = free_port()
        self.redis = EmbeddedRedis(workdir=workdir / "redis")
        self.feast_repo = workdir / "feature_store"
        self.state_dir = workdir / "state"
        self.url = f"http://127.0.0.1:{self.port}"
        self.config["http_options"] = {**self.config.get("http_options", {}), "port": self.port}
        for dep in (d for app in self.config["applications"] for d in app.get("deployments", [])):
            if dep["name"] in (replicas or {}):
                dep["num_replicas"] = replicas[dep["name"]]  # type: ignore[index]

    def start(self, timeout_s: float = 900) -> None:
        import ray
        from ray.serve._private import api as serve_api
        from ray.serve.schema import ServeDeploySchema

        from tests.support import wait_app_running

        src = REPO_ROOT / "feature_store"
        self.feast_repo.mkdir(parents=True)
        shutil.copyfile(src / "feature_store.yaml", self.feast_repo / "feature_store.yaml")
        shutil.copytree(src / "data", self.feast_repo / "data", ignore=shutil.ignore_patterns(".build.lock", "*.tmp"))
        self.redis.start()
        env = {**self.app_cfg.get("runtime_env", {}).get("env_vars", {}), "REDIS_URL": self.redis.url,
               "TIERSERVE_STATE_DIR": str(self.state_dir), "TIERSERVE_FEAST_REPO": str(self.feast_repo)}
        os.environ.update(env)
        for app in self.config["applications"]:  # the Ingress's and `recs`, which answers recommendations
            app["runtime_env"] = {**app.get("runtime_env", {}), "env_vars": env}
        # The config copy this run serves (own port, Redis, state, Feast copy), kept for the record.
        (self.workdir / "config.yaml").write_text(yaml.safe_dump(self.config))
        # A busy shared box can take minutes to bring a raylet up (Ray's default wait is 30 s).
        os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")
        ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="tsfault-", dir="/tmp"),
                 runtime_env={"env_vars": env}, log_to_driver=False)
        # What `serve run CONFIG` does: the config's deployment options (replicas, actor options)
        # apply, as they do in production; serve.run(build_app(...)) would drop them.
        schema = ServeDeploySchema.model_validate(self.config)
        client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                       proxy_location=schema.proxy_location)
        client.deploy_apps(schema, _blocking=False)
        for app in self.config["applications"]:
            wait_app_running(app["name"], timeout_s)

    def settings(self) -> dict[str, Any]:
        from deployments.config import AppSettings

        return AppSettings.from_args(self.app_cfg.get("args")).model_dump()

    def stop(self) -> None:
        import ray
        from ray import serve

        with contextlib.suppress(Exception):
            serve.shutdown()
        with contextlib.suppress(Exception):
            ray.shutdown()
        self.redis.stop()


# ----------------------------------------------------------------------------- faults
class Fault:
    """Injected at `inject`, healed at `heal` (a no-op for instant faults)."""

    name = ""

    def __init__(self, app: App) -> None:
        self.app = app
        self.log: list[str] = []

    def inject(self) -> None:
        raise NotImplementedError

    def heal(self) -> None:
        pass


class RedisRestart(Fault):
    name = "redis_restart"

    def inject(self) -> None:
        proc = self.app.redis.proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        self.app.redis.proc = None
        self.log.append("redis-server SIGKILLed")

    def heal(self) -> None:
        if self.app.redis.proc is None:
            self.app.redis.start()  # same port, empty (no persistence): what a restarted cache pod is
            self.log.append("redis-server restarted empty on the same port")


class RedisSlow(Fault):
    name = "redis_slow"

    def __init__(self, app: App, sleep_s: float = 0.5) -> None:
        super().__init__(app)
        self.sleep_s = sleep_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stalls = 0

    def _loop(self) -> None:
        client = redis.Redis.from_url(self.app.redis.url, socket_timeout=self.sleep_s + 10)
        while not self._stop.is_set():
            with contextlib.suppress(redis.RedisError):
                client.execute_command("DEBUG", "SLEEP", self.sleep_s)
                self.stalls += 1
        client.close()

    def inject(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="redis-slow", daemon=True)
        self._thread.start()
        self.log.append(f"DEBUG SLEEP {self.sleep_s} in a loop")

    def heal(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.sleep_s + 15)
        self.log.append(f"loop stopped after {self.stalls} stalls")


class FeastDown(Fault):
    name = "feast_down"

    def __init__(self, app: App) -> None:
        super().__init__(app)
        self._conn: sqlite3.Connection | None = None

    def inject(self) -> None:
        # isolation_level=None: we issue BEGIN ourselves; EXCLUSIVE also blocks readers (the
        # store is in rollback-journal mode), so reads and pushes fail after the busy timeout.
        conn = sqlite3.connect(self.app.feast_repo / "data" / "online_store.db", isolation_level=None, timeout=30)
        conn.execute("BEGIN EXCLUSIVE")
        self._conn = conn
        self.log.append("exclusive lock held on the Feast online store (SQLite)")

    def heal(self) -> None:
        if self._conn is not None:
            self._conn.execute("ROLLBACK")
            self._conn.close()
            self._conn = None
            self.log.append("lock released")


class ReplicaKill(Fault):
    name = "replica_kill"
    instant = True

    def __init__(self, app: App, deployment: str = "Recommender") -> None:
        super().__init__(app)
        self.deployment = deployment

    def inject(self) -> None:
        import ray

        # SERVE_REPLICA::{application}#{deployment}#{id}: the Recommender is in `recs` when the
        # config serves recommendations one hop from the proxy, in the Ingress's application if not.
        prefixes = tuple(f"SERVE_REPLICA::{app['name']}#{self.deployment}#" for app in self.app.config["applications"])
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefixes)]
        if not names:
            self.log.append(f"no {self.deployment} replica alive to kill")
            return
        victim = random.choice(names)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        self.log.append(f"killed {victim}")


class IngressKill(ReplicaKill):
    name = "ingress_kill"

    def __init__(self, app: App) -> None:
        super().__init__(app, "Ingress")


def make_fault(name: str, app: App, args: argparse.Namespace) -> Fault:
    if name == "redis_restart":
        return RedisRestart(app)
    if name == "redis_slow":
        return RedisSlow(app, args.slow_s)
    if name == "feast_down":
        return FeastDown(app)
    if name == "replica_kill":
        return ReplicaKill(app, args.kill_deployment)
    if name == "ingress_kill":
        return IngressKill(app)
    raise SystemExit(f"unknown row {name!r}; rows: {', '.join(ROWS)}")


async def drive_fault(fault: Fault, window: Window, duration_s: float, started: float, kills: int,
                      timeline: list[dict[str, Any]]) -> None:
    def mark(what: str) -> None:
        timeline.append({"t_s": round(time.monotonic() - started, 1), "what": what})

    async def at(t: float) -> None:
        await asyncio.sleep(max(0.0, started + t - time.monotonic()))

    if getattr(fault, "instant", False):
        for t in window.kill_times(duration_s, kills):
            await at(t)
            await asyncio.to_thread(fault.inject)
            mark(fault.log[-1])
        return
    a, b = window.seconds(duration_s)
    await at(a)
    await asyncio.to_thread(fault.inject)
    mark(fault.log[-1])
    try:
        await at(b)
    finally:
        await asyncio.to_thread(fault.heal)
        mark(fault.log[-1])


# ----------------------------------------------------------------------------- recording
@dataclass
class Recorder:
    """Sees every request and answer through httpx event hooks (so http_load's workers are used
    as they are): keeps the recommendation answers of the event users, for the freshness check."""

    watched: set[int]
    answers: list[RecsAnswer] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    fallback: Counter[str] = field(default_factory=Counter)  # fallback answers, by reason
    _sent: dict[int, float] = field(default_factory=dict)

    async def on_request(self, request: httpx.Request) -> None:
        self._sent[id(request)] = time.monotonic()

    async def on_response(self, response: httpx.Response) -> None:
        request = response.request
        sent = self._sent.pop(id(request), time.monotonic())
        self.statuses[response.status_code] += 1
        if request.url.path != "/v1/recommendations":
            return
        try:
            user = int(json.loads(request.content)["user_id"])
        except (ValueError, KeyError, TypeError):
            return
        await response.aread()
        try:
            body = response.json()
        except ValueError:
            body = {}
        if isinstance(body, dict) and body.get("fallback"):
            self.fallback[str(body["fallback"].get("reason", ""))[:80]] += 1
        if user in self.watched:
            self.answers.append(RecsAnswer(user, sent, response.status_code, body))


@dataclass
class EventLog:
    accepted: list[AcceptedEvent] = field(default_factory=list)
    refused: Counter[int] = field(default_factory=Counter)
    transport_errors: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)


async def post_events(client: httpx.AsyncClient, users: list[int], items: list[int], rng: random.Random,
                      deadline: float, every_s: float, log: EventLog) -> None:
    """Rating events, one at a time, all row long; each accepted one is followed by a read."""
    while time.monotonic() < deadline:
        user, item = rng.choice(users), rng.choice(items)
        body = {"user_id": user, "item_id": item, "type": "rating", "value": rng.choice((1, 2, 3, 4, 5))}
        try:
            resp = await client.post("/v1/events", json=body)
        except httpx.HTTPError as exc:
            log.transport_errors += 1
            if len(log.samples) < 10:
                log.samples.append({"event": body, "error": f"{type(exc).__name__}: {exc}"})
            await asyncio.sleep(every_s)
            continue
        if resp.status_code == 202:
            answer = resp.json()
            queued = answer.get("recorded") == "queued"
            log.accepted.append(AcceptedEvent(user, item, None if queued else int(answer["n_ratings"]),
                                              time.monotonic(), pending=answer.get("invalidation") == "pending",
                                              queued=queued))
            with contextlib.suppress(httpx.HTTPError):  # read-after-write: the recorder checks it
                await client.post("/v1/recommendations", json={"user_id": user, "k": 20})
        else:
            log.refused[resp.status_code] += 1
            if len(log.samples) < 10:
                log.samples.append({"event": body, "status": resp.status_code, "body": resp.text[:300]})
        await asyncio.sleep(every_s)


def feast_n_ratings(repo: Path, users: list[int]) -> dict[int, int | None]:
    """The users' `n_ratings` in the Feast online store (the source of truth), read directly."""
    from feature_store.events import UserActivityWriter

    writer = UserActivityWriter(repo)
    out: dict[int, int | None] = {}
    for u in users:
        row = writer.current_row(u)
        out[u] = None if row is None else int(row["n_ratings"] or 0)
    return out


async def seconds_until(ready: Callable[[], Awaitable[bool]], timeout_s: float, every_s: float,
                        errors: tuple[type[BaseException], ...]) -> float:
    """Seconds until `ready()` first says yes (one of `errors` counts as no), or NaN after `timeout_s`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        with contextlib.suppress(*errors):
            if await ready():
                return time.monotonic() - t0
        await asyncio.sleep(every_s)
    return float("nan")


async def wait_settled(app: App, before: dict[int, int | None], accepted: Counter[int], users: list[int],
                       timeout_s: float) -> float:
    """Seconds until Feast holds every accepted rating (queued ones applied), or NaN."""
    async def settled() -> bool:
        rows = await asyncio.to_thread(feast_n_ratings, app.feast_repo, users)
        return lost_writes(before, rows, accepted)[0] == 0

    return await seconds_until(settled, timeout_s, every_s=2, errors=(Exception,))  # Feast may still be healing


async def wait_healthy(client: httpx.AsyncClient, user: int, timeout_s: float) -> float:
    """Seconds until a recommendation is a clean 200 again (not degraded) after the fault."""
    async def healthy() -> bool:
        resp = await client.post("/v1/recommendations", json={"user_id": user, "k": 10})
        return resp.status_code == 200 and not resp.json().get("degraded")

    return await seconds_until(healthy, timeout_s, every_s=1, errors=(httpx.HTTPError, ValueError))


async def warm_up(app: App, users: list[int], stream: Path, timeout_s: float = 600) -> None:
    """Before the first row: every replica's first use (Feast's import, the model's first batch)
    is not a fault's doing and must not count in a row."""
    texts = http_load.read_stream(stream, 2000)[:4]
    async with httpx.AsyncClient(base_url=app.url, timeout=120, trust_env=False) as client:
        model = await http_load.wait_for_model(client, timeout_s)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            started = time.monotonic()
            with contextlib.suppress(httpx.HTTPError):
                answers = await asyncio.gather(
                    *(client.post("/v1/recommendations", json={"user_id": u, "k": 20}) for u in users),
                    *(client.post("/v1/chat/completions", json={"model": model, "temperature": 0, "max_tokens": 8,
                                                                "messages": [{"role": "user", "content": t}]})
                      for t in texts))
                if all(a.status_code == 200 for a in answers) and time.monotonic() - started < 10:
                    print(f"warm after {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
                    return
            await asyncio.sleep(2)


# ----------------------------------------------------------------------------- a row
def _split_5xx(statuses: Counter[int]) -> dict[str, Any]:
    """Every 5xx answer of the row: load workers, events, read-after-write and recovery reads."""
    codes = Counter({c: n for c, n in statuses.items() if c >= 500})
    return {"total": sum(codes.values()), "500": codes[500], "503": codes[503],
            "other": sum(n for c, n in codes.items() if c not in (500, 503)), "by_code": dict(codes)}


async def run_row(name: str, app: App, args: argparse.Namespace, texts: list[str], users: list[int],
                  weights: list[int], event_users: list[int], items: list[int]) -> dict[str, Any]:
    fault = make_fault(name, app, args)
    window = Window(*args.window)
    rng = random.Random(args.seed)
    recorder = Recorder(watched=set(event_users))
    hooks = {"request": [recorder.on_request], "response": [recorder.on_response]}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    before_rows = await asyncio.to_thread(feast_n_ratings, app.feast_repo, event_users)
    async with httpx.AsyncClient(base_url=app.url, timeout=args.timeout, limits=limits, event_hooks=hooks,
                                 trust_env=False) as client, \
            httpx.AsyncClient(base_url=app.url, timeout=args.timeout, event_hooks=hooks, trust_env=False) as side:
        model = await http_load.wait_for_model(client, 300)
        load = http_load.Workload(texts=texts, users=users, weights=weights, model=model,
                                  recs_fraction=args.recs_fraction, unknown_fraction=args.unknown_users_fraction,
                                  max_tokens=args.max_tokens, rng=rng)
        before = await asyncio.to_thread(http_load.memory_snapshot, app.port, app.redis.url)
        tally, events, mem_timeline, faults_timeline = http_load.Tally(), EventLog(), [], []
        started = time.monotonic()
        deadline = started + args.duration
        print(f"[{name}] {args.duration:.0f}s at concurrency {args.concurrency}", file=sys.stderr, flush=True)
        background = [
            asyncio.create_task(http_load.monitor(tally, started, deadline, app.port, app.redis.url, mem_timeline,
                                                  args.sample_every)),
            asyncio.create_task(drive_fault(fault, window, args.duration, started, args.kills, faults_timeline)),
        ]
        await asyncio.gather(
            post_events(side, event_users, items, random.Random(args.seed + 1), deadline, args.event_every, events),
            *(http_load.worker(client, load, tally, deadline, 10**9) for _ in range(args.concurrency)))
        elapsed = time.monotonic() - started
        await asyncio.gather(*background, return_exceptions=True)
        fault.heal()  # idempotent: a row cut short still leaves the app whole
        recovery_s = await wait_healthy(side, event_users[0], args.recovery_timeout)
        accepted_per_user = Counter(e.user_id for e in events.accepted)
        # Events queued during the fault are applied by their replicas once it is over: wait
        # (bounded) until Feast holds every accepted one, then read each event user once more.
        settled_s = await wait_settled(app, before_rows, accepted_per_user, event_users, args.recovery_timeout)
        final: dict[int, dict[str, Any]] = {}
        for u in event_users:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                resp = await side.post("/v1/recommendations", json={"user_id": u, "k": 20})
                if resp.status_code == 200:
                    final[u] = resp.json()
    after = await asyncio.to_thread(http_load.memory_snapshot, app.port, app.redis.url)
    after_rows = await asyncio.to_thread(feast_n_ratings, app.feast_repo, event_users)
    lost, phantom, detail = lost_writes(before_rows, after_rows, accepted_per_user)
    fresh = freshness(recorder.answers, events.accepted, t0=started)
    ok = sum(len(v) for v in tally.latencies.values())
    rss = [s["replica_rss_bytes"] for s in mem_timeline] + [before["replica_rss_bytes"], after["replica_rss_bytes"]]
    redis_used = [s["redis_used_memory_bytes"] for s in mem_timeline if s["redis_used_memory_bytes"] is not None]
    budget = redis_budget(app.settings())
    return {
        "fault": name,
        "window_s": list(window.seconds(args.duration)),
        "fault_timeline": faults_timeline,
        "elapsed_s": round(elapsed, 1),
        "recovery_s": None if recovery_s != recovery_s else round(recovery_s, 1),
        "queued_events_settled_s": None if settled_s != settled_s else round(settled_s, 1),
        "requests": {
            "sent": tally.sent, "2xx": ok, "fallback": sum(recorder.fallback.values()),
            "fallback_by_reason": dict(recorder.fallback),
            "5xx": _split_5xx(recorder.statuses), "statuses": dict(recorder.statuses),
            "transport_errors": sum(n for k, n in tally.errors.items() if not k.startswith("http_")),
            "errors_by_kind": dict(tally.errors), "error_samples": tally.error_samples,
            "classes": {k: http_load.summarise(v, elapsed) for k, v in sorted(tally.latencies.items())},
        },
        "events": {"accepted": len(events.accepted), "queued": sum(e.queued for e in events.accepted),
                   "refused": sum(events.refused.values()),
                   "refused_by_status": dict(events.refused), "transport_errors": events.transport_errors,
                   "samples": events.samples},
        "stale": {"stale": fresh.stale, "checked": sum(v for k, v in fresh.counts.items() if k != "unchecked"),
                  **fresh.counts, "samples": fresh.samples},
        "final_reads": final_reads(final, after_rows, events.accepted),
        "writes": {"lost": lost, "phantom": phantom, "detail": detail},
        "memory": {
            "redis_peak_bytes": max(redis_used) if redis_used else None,
            "redis_budget_bytes": budget["total"], "redis_budgets": budget,
            "replica_rss_peak_bytes": max(rss), "replica_rss_before_bytes": before["replica_rss_bytes"],
            "replica_rss_after_by_deployment": after["replica_rss_by_deployment"],
            "timeline": mem_timeline,
        },
    }


# ----------------------------------------------------------------------------- main
def catalogue(repo: Path) -> list[int]:
    frame = pd.read_parquet(repo / "data" / "item_features.parquet", columns=["item_id"])
    return sorted(int(i) for i in frame["item_id"])


@contextlib.contextmanager
def app_running(args: argparse.Namespace) -> Iterator[App]:
    workdir = Path(tempfile.mkdtemp(prefix="tierserve-faults-"))
    replicas = {name: n for name, n in (("Recommender", args.recommender_replicas),
                                        ("Ingress", args.ingress_replicas)) if n}
    app = App(Path(args.config), workdir, replicas=replicas or None)
    try:
        print(f"starting the app on {app.url} (Redis {app.redis.url}, workdir {workdir})", file=sys.stderr, flush=True)
        app.start()
        yield app
    finally:
        app.stop()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


async def run_all(args: argparse.Namespace, app: App) -> list[dict[str, Any]]:
    texts = http_load.read_stream(Path(args.stream), 2000)
    users, weights = http_load.read_user_activity(Path(args.ratings))
    rng = random.Random(args.seed)
    known = sorted(users)
    event_users = rng.sample(known, min(args.event_users, len(known)))
    items = catalogue(app.feast_repo)
    await warm_up(app, event_users, Path(args.stream))
    rows = []
    for name in args.rows:
        row = await run_row(name, app, args, texts, users, weights, event_users, items)
        rows.append(row)
        print(markdown([row]), file=sys.stderr, flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, in order; of {', '.join(ROWS)}")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load per row")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--window", default="0.2,0.5", help="fault start,end as fractions of --duration")
    p.add_argument("--kills", type=int, default=2, help="replica_kill: kills spread over the window")
    p.add_argument("--kill-deployment", default="Recommender", help="replica_kill: Recommender or Ingress")
    p.add_argument("--recommender-replicas", type=int, default=0,
                   help="Recommender replicas (0: as the config says); with 2, a killed one has a survivor")
    p.add_argument("--ingress-replicas", type=int, default=0,
                   help="Ingress replicas (0: as the config says); ingress_kill needs 2 for a survivor")
    p.add_argument("--slow-s", type=float, default=0.5, help="redis_slow: seconds of each DEBUG SLEEP")
    p.add_argument("--event-every", type=float, default=1.0, help="seconds between rating events")
    p.add_argument("--event-users", type=int, default=24)
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "local.yaml"))
    p.add_argument("--stream", default=str(DEFAULT_STREAM))
    p.add_argument("--ratings", default=str(http_load.DEFAULT_RATINGS))
    p.add_argument("--recs-fraction", type=float, default=0.3)
    p.add_argument("--unknown-users-fraction", type=float, default=0.05)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--recovery-timeout", type=float, default=120.0)
    p.add_argument("--sample-every", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")
    try:
        args.window = tuple(float(x) for x in args.window.split(","))
        Window(*args.window)
    except (TypeError, ValueError) as exc:
        p.error(f"--window: {exc}")
    if args.concurrency < 1 or args.duration <= 0:
        p.error("--concurrency and --duration must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with app_running(args) as app:
        rows = asyncio.run(run_all(args, app))
    result = {"benchmark": "fault_matrix", "command": " ".join(["python -m benchmarks.fault_matrix", *(argv or sys.argv[1:])]),
              "duration_s": args.duration, "concurrency": args.concurrency, "window": list(args.window),
              "event_every_s": args.event_every, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows), file=sys.stderr)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
