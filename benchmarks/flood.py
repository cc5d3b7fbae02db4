"""Flood benchmark: is memory flat at the budgets when clients send nothing but new work?

    python -m benchmarks.flood --url http://127.0.0.1:8011 --config configs/flood.yaml \
        --redis-url redis://127.0.0.1:PORT/0 --api-keys KEY_A,KEY_B,KEY_C [--phase-s 180] [--concurrency 6]

Three phases against a running app (loopback only), each --phase-s long:

1. ``scopes``: chat requests that each open a new semantic scope and a new exact key (a distinct
   system prompt or distinct earlier turns per request, temperature 0, one-word answers, so the
   answer stops by itself and is stored): every one is a miss that stores into both caches.
2. ``users``: recommendations for user ids never asked before (known users with a fresh ``k``,
   unknown ids counting up): every known one stores a new result entry.
3. ``bodies``: bodies just over the body limit (declared and chunked, which must be refused with
   413 while reading) and just under it (which the app must answer with a 2xx or a 4xx).

Requests rotate over the --api-keys (one tenant each), so the per-tenant budgets fill first and
the global budget then bounds the total. Every second the run samples Redis ``used_memory``, the
summed RSS of the app's Serve replicas (the readers of :mod:`benchmarks.http_load`), and the
caches' own budget bookkeeping (:mod:`caches.budget`). Writes benchmarks/results/flood.json and a
PNG plot (memory over time, phases marked, budgets drawn). Any 5xx is counted as a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import redis
import yaml

from benchmarks.http_load import check_loopback, memory_snapshot, wait_for_model, write_result
from caches.budget import usage
from deployments.config import AppSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "flood.json"
PHASES = ("scopes", "users", "bodies")
KNOWN_USERS = 706  # the MovieLens sample's users (ids 1..706 exist in the feature store)
QUESTIONS = ["What is the capital of France?", "What is the capital of Italy?", "Name a primary colour.",
             "What is two plus two?", "What colour is the sky?"]
MAX_TOKENS = 16  # only an answer that stops by itself is stored semantically: room for one sentence
STREAM_KEY = "sem.__stream"  # the semantic cache's event stream (caches.semantic.store)
# The caches' budget bookkeeping prefixes (caches.semantic.store, caches.result, deployments.recommender_model)
BOOKKEEPING = {"semantic": "sem.__meta", "results": "res.__meta", "recs": "recs.__meta"}


def settings_of(config: Path) -> AppSettings:
    app = yaml.safe_load(config.read_text())["applications"][0]
    return AppSettings.model_validate(app.get("args") or {})


def budgets_of(s: AppSettings) -> dict[str, dict[str, int]]:
    c, r = s.cache, s.recommender
    return {
        "semantic": {"global_bytes": c.semantic_max_bytes, "global_entries": c.semantic_max_entries,
                     "tenant_bytes": c.semantic_tenant_max_bytes, "tenant_entries": c.semantic_tenant_max_entries,
                     "mirror_bytes": c.semantic_mirror_max_bytes, "mirror_entries": c.semantic_mirror_max_entries},
        "results": {"global_bytes": c.result_max_bytes, "global_entries": c.result_max_entries,
                    "tenant_bytes": c.result_tenant_max_bytes, "tenant_entries": c.result_tenant_max_entries},
        "recs": {"global_bytes": r.result_max_bytes, "tenant_bytes": r.result_tenant_max_bytes},
    }


class Flood:
    def __init__(self, args: argparse.Namespace, model: str, body_limit: int) -> None:
        self.args = args
        self.model = model
        self.body_limit = body_limit
        self.keys = itertools.cycle(args.api_keys or [None])
        self.rng = random.Random(args.seed)
        self.counter = itertools.count()
        self.statuses: dict[str, Counter[str]] = {p: Counter() for p in PHASES}
        self.errors: Counter[str] = Counter()

    def headers(self) -> dict[str, str]:
        key = next(self.keys)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def chat_body(self) -> dict[str, Any]:
        n = next(self.counter)
        question = QUESTIONS[n % len(QUESTIONS)]
        if n % 2:  # a distinct system prompt
            messages = [{"role": "system", "content": f"You are assistant {uuid.uuid4().hex}. Reply in one word."},
                        {"role": "user", "content": question}]
        else:  # distinct earlier turns
            messages = [{"role": "user", "content": f"My ticket is {uuid.uuid4().hex}. Reply in one word."},
                        {"role": "assistant", "content": "Noted."}, {"role": "user", "content": question}]
        return {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS}

    def recs_body(self) -> dict[str, Any]:
        n = next(self.counter)
        if n % 2:  # a known user with a k not asked before (as far as the budget can remember)
            return {"user_id": 1 + (n // 2) % KNOWN_USERS, "k": 1 + (n // (2 * KNOWN_USERS)) % 100}
        return {"user_id": 10_000_000 + n, "k": 10}  # an id nobody has

    async def one(self, client: httpx.AsyncClient, phase: str) -> None:
        kind = phase
        try:
            if phase == "scopes":
                resp = await client.post("/v1/chat/completions", json=self.chat_body(), headers=self.headers())
            elif phase == "users":
                resp = await client.post("/v1/recommendations", json=self.recs_body(), headers=self.headers())
            else:
                resp, kind = await self.big(client)
        except httpx.HTTPError as exc:
            self.errors[f"{kind}:{type(exc).__name__}"] += 1
            return
        self.statuses[phase][f"{kind}:{resp.status_code}"] += 1

    async def big(self, client: httpx.AsyncClient) -> tuple[httpx.Response, str]:
        """A body just over or just under the limit; over ones declared or chunked."""
        n = next(self.counter) % 3
        headers = {**self.headers(), "content-type": "application/json"}
        envelope = len(json.dumps(self.chat_body() | {"messages": [{"role": "user", "content": ""}]}))
        if n == 0:  # just under: a long question the app must refuse or answer, never crash on
            text = "x" * (self.body_limit - envelope - 64)
            body = {"model": self.model, "messages": [{"role": "user", "content": text}], "max_tokens": 1}
            return await client.post("/v1/chat/completions", json=body, headers=headers), "under"
        over = self.body_limit + self.rng.randint(1, 64 << 10)
        payload = json.dumps({"model": self.model, "messages": [{"role": "user", "content": "x" * over}]}).encode()
        if n == 1:  # declared: refused at once from Content-Length
            return await client.post("/v1/chat/completions", content=payload, headers=headers), "over"

        async def chunks() -> Any:
            step = 16 << 10
            for i in range(0, len(payload), step):
                yield payload[i : i + step]

        return await client.post("/v1/chat/completions", content=chunks(), headers=headers), "over-chunked"


def sample(port: int, redis_url: str, t0: float, phase: str) -> dict[str, Any]:
    snap = memory_snapshot(port, redis_url)
    row: dict[str, Any] = {"t_s": round(time.monotonic() - t0, 1), "phase": phase,
                           "replica_rss_bytes": snap["replica_rss_bytes"],
                           "replica_rss_by_deployment": snap["replica_rss_by_deployment"],
                           "redis_used_memory_bytes": snap["redis_used_memory_bytes"]}
    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        for name, prefix in BOOKKEEPING.items():
            row[name] = usage(client, prefix)
        # the mirrors' event stream is bounded by its own MAXLEN, not by the budgets: shown apart
        row["semantic_stream"] = {"events": int(client.xlen(STREAM_KEY)),
                                  "bytes": int(client.memory_usage(STREAM_KEY, samples=5) or 0)}
    except redis.RedisError as exc:
        row["bookkeeping_error"] = str(exc)
    finally:
        client.close()
    return row


async def run(args: argparse.Namespace) -> dict[str, Any]:
    check_loopback(args.url)
    port = urlparse(args.url).port or 80
    settings = settings_of(Path(args.config))
    timeline: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout, limits=limits,
                                 headers={"Authorization": f"Bearer {args.api_keys[0]}"} if args.api_keys else {}) as c:
        model = await wait_for_model(c, args.wait)
        flood = Flood(args, model, settings.max_body_bytes)
        t0 = time.monotonic()
        phases: dict[str, Any] = {}
        for phase in args.phases:
            started = time.monotonic()
            deadline = started + args.phase_s
            stop = asyncio.Event()

            async def worker(phase: str = phase, deadline: float = deadline) -> None:
                while time.monotonic() < deadline:
                    await flood.one(c, phase)

            async def sampler(phase: str = phase, stop: asyncio.Event = stop) -> None:
                while not stop.is_set():
                    timeline.append(await asyncio.to_thread(sample, port, args.redis_url, t0, phase))
                    await asyncio.sleep(1.0)

            monitor = asyncio.create_task(sampler())
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            stop.set()
            await monitor
            rows = [r for r in timeline if r["phase"] == phase]
            done = sum(flood.statuses[phase].values())
            phases[phase] = {"seconds": round(time.monotonic() - started, 1), "requests": done,
                             "rps": round(done / max(time.monotonic() - started, 1e-9), 1),
                             "statuses": dict(sorted(flood.statuses[phase].items())),
                             "5xx": sum(n for k, n in flood.statuses[phase].items()
                                        if k.rsplit(":", 1)[1].startswith("5")),
                             **flatness(rows)}
            print(f"{phase}: {json.dumps(phases[phase])}", file=sys.stderr, flush=True)
    return {"config": args.config, "url": args.url, "concurrency": args.concurrency, "phase_s": args.phase_s,
            "api_keys": len(args.api_keys or []), "budgets": budgets_of(settings), "phases": phases,
            "transport_errors": dict(flood.errors), "timeline": timeline}


def flatness(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Peaks, and the growth between the third and the last quarter of the phase (flat ~ 0)."""
    if not rows:
        return {}
    q = max(1, len(rows) // 4)
    third, last = rows[-2 * q : -q] or rows[:1], rows[-q:]

    def mean(rs: list[dict[str, Any]], f: Any) -> float:
        vals = [f(r) for r in rs if f(r) is not None]
        return sum(vals) / len(vals) if vals else 0.0

    out: dict[str, Any] = {}
    for label, f in (("redis_used_memory", lambda r: r["redis_used_memory_bytes"]),
                     ("replica_rss", lambda r: r["replica_rss_bytes"])):
        vals = [f(r) for r in rows if f(r) is not None]
        out[f"{label}_first_bytes"] = vals[0] if vals else None
        out[f"{label}_peak_bytes"] = max(vals) if vals else None
        out[f"{label}_growth_last_quarter_bytes"] = round(mean(last, f) - mean(third, f))
    for name in (*BOOKKEEPING, "semantic_stream"):
        vals = [r[name] for r in rows if name in r]
        if vals:
            out[f"{name}_peak"] = {f: max(v[f] for v in vals) for f in vals[0]}
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, mib = result["timeline"], 1 << 20
    t = [r["t_s"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    axes[0].plot(t, [(r["redis_used_memory_bytes"] or 0) / mib for r in rows], label="Redis used_memory")
    axes[0].set_ylabel("MiB")
    axes[1].plot(t, [r["replica_rss_bytes"] / mib for r in rows], label="summed replica RSS", color="tab:orange")
    for dep in sorted({d for r in rows for d in r["replica_rss_by_deployment"]}):
        axes[1].plot(t, [r["replica_rss_by_deployment"].get(dep, 0) / mib for r in rows], lw=0.8, label=dep)
    axes[1].set_ylabel("MiB")
    colours = {"semantic": "tab:green", "results": "tab:blue", "recs": "tab:red"}
    for name, colour in colours.items():
        axes[2].plot(t, [r.get(name, {}).get("bytes", 0) / mib for r in rows], color=colour, label=f"{name} counted")
        axes[2].axhline(result["budgets"][name]["global_bytes"] / mib, color=colour, ls="--", lw=0.8,
                        label=f"{name} global budget")
    axes[2].plot(t, [r.get("semantic_stream", {}).get("bytes", 0) / mib for r in rows], color="grey",
                 label="semantic event stream (MAXLEN-bounded)")
    axes[2].set_ylabel("MiB (cache bookkeeping)")
    axes[2].set_xlabel("seconds")
    for ax in axes:
        start = None
        for r in rows:
            if r["phase"] != start:
                ax.axvline(r["t_s"], color="grey", lw=0.5)
                if ax is axes[0]:
                    ax.annotate(r["phase"], (r["t_s"], 1.0), xycoords=("data", "axes fraction"), va="bottom")
                start = r["phase"]
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    fig.suptitle("tierserve flood: unique scopes, unique users, bodies at the limit")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the running app (loopback only)")
    p.add_argument("--config", required=True, help="the Serve config the app runs with (for budgets and body limit)")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), required=not os.environ.get("REDIS_URL"))
    p.add_argument("--api-keys", type=lambda s: [k for k in s.split(",") if k], default=[],
                   help="comma-separated bearer keys, one tenant each; requests rotate over them")
    p.add_argument("--phases", type=lambda s: s.split(","), default=list(PHASES))
    p.add_argument("--phase-s", type=float, default=180.0)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--wait", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    if set(args.phases) - set(PHASES):
        p.error(f"phases are {PHASES}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    out = write_result(result, args.out, indent=1)
    plot(result, out.with_suffix(".png"))
    summary = {k: {f: v for f, v in p.items() if f != "statuses"} for k, p in result["phases"].items()}
    print(json.dumps(summary, indent=1), file=sys.stderr)
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr, flush=True)
    return 1 if any(p.get("5xx") for p in result["phases"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
