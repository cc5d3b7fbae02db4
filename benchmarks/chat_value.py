"""What the whole app buys a user over the same model served by vLLM alone, in one run.

    python -m benchmarks.chat_value --url http://127.0.0.1:8000 [--n 300] [--concurrency 4]
        [--repeat-share 0.3] [--stream FILE.jsonl] [--vllm-url URL]

Arms, same machine, same requests, same order:
- ``tierserve``: the running app (``make run``): exact cache, semantic cache, single flight, vLLM
  with prefix caching behind prefix-aware routing.
- ``vllm``: vLLM's own OpenAI server for the same model and engine arguments as the app's LLM
  replica (``deployments.llm.engine_cli_args``: prefix caching on, no other cache), started here on
  a free loopback port unless ``--vllm-url`` names one, with the CPU threads Ray gives the app's
  LLM replica (``app_llm_threads``). It gets the exact messages the app's engine
  gets (the deployment system prompt in front, ``caches.prompts.build_messages``), so the two arms
  differ only by what the app adds.

The arms interleave in blocks of ``--block`` requests (the first arm alternating), so a shared
machine's changing load falls on both.

Traffic: the held-out half of banking77's intents (``benchmarks.intent_split``: the semantic cache
is never tuned on them), in stream order; with probability ``--repeat-share`` a request instead
re-asks an earlier question of the run, Zipf-weighted towards the most asked (FAQ-style exact
repeats). Each run adds a fresh request-level system line, so the app's caches start empty for it.

Figures per arm: requests/s, p50/p99 latency, engine seconds per 1,000 requests (the summed latency
of the requests that reached the model: every request for vLLM; ``miss``/``bypass`` for the app,
which overstates the app's engine time by its own overhead), and wrong answers served. A served
answer is wrong when it came from the cache for a question of another intent: each answer text the
model produced in the run is mapped to the intents of the questions it answered, and a semantic hit
whose text maps only to other intents is wrong (exact hits repeat byte-identical requests). Results:
``benchmarks/results/chat_value.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx

from benchmarks.intent_split import held_out_queries
from caches.prompts import build_messages

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
DEFAULT_STREAM = REPO_ROOT.parent / "shared" / "data" / "streams" / "banking77_zipf1.0_n20000_seed0.jsonl"
ZIPF_S = 1.0
VLLM_START_TIMEOUT_S = 600.0


def workload(stream: Path, n: int, repeat_share: float, seed: int = 0) -> list[tuple[str, str]]:
    """(question, intent) pairs: the held-out stream in order, with Zipf-weighted exact repeats."""
    rng = random.Random(seed)
    fresh = iter(held_out_queries(stream))
    asked: list[tuple[str, str]] = []
    out: list[tuple[str, str]] = []
    while len(out) < n:
        if asked and rng.random() < repeat_share:
            weights = [1.0 / (rank + 1) ** ZIPF_S for rank in range(len(asked))]
            out.append(rng.choices(asked, weights=weights)[0])
            continue
        item = next(fresh, None)
        if item is None:
            break
        asked.append(item)
        out.append(item)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def drive(url: str, bodies: list[dict[str, Any]], concurrency: int) -> list[dict[str, Any]]:
    """Send every body (in order, ``concurrency`` at a time); one record per request."""
    records: list[dict[str, Any]] = [{} for _ in bodies]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(bodies)):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            start = time.perf_counter()
            try:
                resp = await client.post("/v1/chat/completions", json=bodies[i])
                ok = resp.status_code == 200
                text = resp.json()["choices"][0]["message"]["content"] if ok else None
                records[i] = {"status": resp.status_code, "x_cache": resp.headers.get("x-cache", "none"),
                              "text": text, "latency_s": time.perf_counter() - start}
            except httpx.HTTPError as exc:
                records[i] = {"status": 0, "x_cache": "error", "text": None, "error": repr(exc),
                              "latency_s": time.perf_counter() - start}

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return records


def summarise(records: list[dict[str, Any]], intents: list[str], wall_s: float, engine_classes: set[str]) -> dict[str, Any]:
    produced: dict[str, set[str]] = defaultdict(set)  # answer text -> intents of questions the model answered
    for rec, intent in zip(records, intents, strict=True):
        if rec.get("text") is not None and rec["x_cache"] in engine_classes:
            produced[rec["text"]].add(intent)
    wrong = unknown = 0
    for rec, intent in zip(records, intents, strict=True):
        if rec.get("x_cache") != "semantic" or rec.get("text") is None:
            continue
        sources = produced.get(rec["text"])
        if not sources:
            unknown += 1
        elif intent not in sources:
            wrong += 1
    ok = [r for r in records if r.get("status") == 200]
    latencies = [r["latency_s"] for r in ok]
    engine_s = sum(r["latency_s"] for r in ok if r["x_cache"] in engine_classes)
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "requests_per_s": len(ok) / wall_s,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "engine_s_per_1000": engine_s / max(len(records), 1) * 1000,
        "wrong_answers": wrong,
        "semantic_hits_of_unknown_source": unknown,
        "x_cache": dict(Counter(r.get("x_cache", "none") for r in records)),
    }


def app_llm_threads(config: Path = REPO_ROOT / "configs" / "local.yaml") -> int:
    """The CPU threads the app's LLM replica computes with: Ray sets OMP_NUM_THREADS to the
    replica's `num_cpus` (floored, at least 1; `ray._private.utils.set_omp_num_threads_if_unset`),
    and the engine process inherits it. vLLM alone must get the same, or the comparison measures
    thread settings (on 2 busy cores, two OMP threads spinning against each other are several
    times slower than one), not what the app adds."""
    import math

    import yaml

    for dep in yaml.safe_load(config.read_text())["applications"][0].get("deployments", []):
        if dep.get("name") == "LLM":
            return max(1, math.floor(float((dep.get("ray_actor_options") or {}).get("num_cpus", 1))))
    return 1


def start_vllm(settings: Any, port: int, log_path: Path, threads: int) -> subprocess.Popen[bytes]:
    from deployments.llm import engine_cli_args

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_space_gib),
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *engine_cli_args(settings),
           "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(cmd, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + VLLM_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"vLLM server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit(f"vLLM server at {url} not ready after {VLLM_START_TIMEOUT_S:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running app")
    parser.add_argument("--vllm-url", default=None, help="a running vLLM server (default: start one here)")
    parser.add_argument("--stream", type=Path, default=DEFAULT_STREAM)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--repeat-share", type=float, default=0.3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--block", type=int, default=25, help="requests per arm per turn (arms interleave)")
    parser.add_argument("--out", type=Path, default=RESULTS / "chat_value.json")
    args = parser.parse_args()

    from deployments.config import LLMSettings

    settings = LLMSettings()
    app_model = httpx.get(f"{args.url}/v1/models", timeout=30).json()["data"][0]["id"]
    run = uuid.uuid4().hex[:8]
    items = workload(args.stream, args.n, args.repeat_share)
    intents = [intent for _, intent in items]
    run_line = {"role": "system", "content": f"Benchmark run {run}."}
    app_bodies = [{"model": app_model, "temperature": 0, "max_tokens": args.max_tokens,
                   "messages": [run_line, {"role": "user", "content": q}]} for q, _ in items]
    vllm_bodies = [{**b, "model": settings.served_model_name,
                    "messages": build_messages(settings.system_prompt, b["messages"])} for b in app_bodies]

    proc = None
    vllm_url = args.vllm_url
    threads: int | None = None  # a server started here: the CPU threads it was given
    if vllm_url is None:
        from caches.redis_server import free_port

        threads = app_llm_threads()
        port = free_port()
        vllm_url = f"http://127.0.0.1:{port}"
        proc = start_vllm(settings, port, Path(f"/tmp/chat_value_vllm_{run}.log"), threads)
    results: dict[str, Any] = {}
    try:
        wait_ready(vllm_url, proc)
        arms = {"vllm": (vllm_url, vllm_bodies, {"none"}), "tierserve": (args.url, app_bodies, {"miss", "bypass"})}
        records: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
        wall: dict[str, float] = dict.fromkeys(arms, 0.0)
        # Interleaved in blocks, the arm that goes first alternating: a shared machine's load
        # changes over minutes, and two arms run one after the other would each get a different
        # machine. Each arm still sees its own requests in stream order (what its caches need).
        for b, lo in enumerate(range(0, len(items), args.block)):
            for arm in (list(arms) if b % 2 == 0 else list(reversed(arms))):
                url, bodies, _ = arms[arm]
                start = time.perf_counter()
                records[arm] += asyncio.run(drive(url, bodies[lo:lo + args.block], args.concurrency))
                wall[arm] += time.perf_counter() - start
        for arm, (_, _, engine) in arms.items():
            results[arm] = summarise(records[arm], intents, wall[arm], engine)
            r = results[arm]
            print(f"{arm:>10}: {r['requests_per_s']:.2f} req/s, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
                  f"engine {r['engine_s_per_1000']:.0f} s per 1,000 requests, wrong answers {r['wrong_answers']}, "
                  f"errors {r['errors']}, x-cache {r['x_cache']}", flush=True)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    app, alone = results["tierserve"], results["vllm"]
    summary = {
        "benchmark": "chat_value", "model": settings.served_model_name, "n": len(items),
        "concurrency": args.concurrency, "repeat_share": args.repeat_share, "stream": args.stream.name,
        "interleaved_block": args.block, "vllm_omp_threads": threads,
        "intents": "held-out half (benchmarks.intent_split)", "systems": results,
        "ratios": {
            "requests_per_s_app_over_vllm": app["requests_per_s"] / max(alone["requests_per_s"], 1e-9),
            "p50_vllm_over_app": alone["p50_ms"] / max(app["p50_ms"], 1e-9),
            "p99_vllm_over_app": alone["p99_ms"] / max(app["p99_ms"], 1e-9),
            "engine_s_vllm_over_app": alone["engine_s_per_1000"] / max(app["engine_s_per_1000"], 1e-9),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
