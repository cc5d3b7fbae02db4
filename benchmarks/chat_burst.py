"""A burst of identical new questions: engine calls and follower latency, with and without coalescing.

    python -m benchmarks.chat_burst --url http://127.0.0.1:8000 [--n 8] [--bursts 5] [--max-tokens 32]

Each burst sends N identical, never-seen questions at once (temperature 0). Two arms in one run,
bursts interleaved so that both see the same machine:

- ``coalesced``: plain requests. The first becomes the leader and calls the engine; the other N-1
  wait for its answer (`x-cache: coalesced`).
- ``uncoalesced``: the same bursts with ``Cache-Control: no-cache``, which asks every request for
  a fresh answer and so never coalesces: what the app did before single flight (a new question
  misses every cache until its first answer is stored, so all N reach the engine).

Engine calls are read from vLLM's own counter (``vllm:request_success_total`` on /metrics) before
and after each burst. Reported per arm: engine calls per burst, p50 latency of the followers (every
request but the fastest) and of the leader. The last line is one JSON object, also written to
benchmarks/results/chat_burst.json. Run it against an app started with `make run`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

RESULTS = Path(__file__).resolve().parent / "results"


async def engine_requests(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "vllm:request_success"
               for s in f.samples if s.name.endswith("_total"))


async def burst(client: httpx.AsyncClient, model: str, question: str, n: int, max_tokens: int,
                headers: dict[str, str]) -> dict[str, Any]:
    body = {"model": model, "temperature": 0, "max_tokens": max_tokens, "messages": [{"role": "user", "content": question}]}

    async def one() -> tuple[float, str, str]:
        start = time.perf_counter()
        resp = await client.post("/v1/chat/completions", json=body, headers=headers)
        resp.raise_for_status()
        return time.perf_counter() - start, resp.headers.get("x-cache", "?"), resp.json()["choices"][0]["message"]["content"]

    before = await engine_requests(client)
    replies = sorted(await asyncio.gather(*(one() for _ in range(n))))
    calls = await engine_requests(client) - before
    return {"engine_calls": calls, "latencies": [r[0] for r in replies], "layers": [r[1] for r in replies],
            "distinct_answers": len({r[2] for r in replies})}


async def run(url: str, n: int, bursts: int, max_tokens: int) -> dict[str, Any]:
    arms = {"coalesced": {}, "uncoalesced": {"cache-control": "no-cache"}}
    out: dict[str, dict[str, list[Any]]] = {a: {"calls": [], "followers": [], "leaders": [], "layers": [], "answers": []}
                                            for a in arms}
    run_id = uuid.uuid4().hex[:6]
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        for b in range(bursts):
            for arm, headers in arms.items():
                question = f"In one sentence, why do caches help? (burst {run_id}-{arm}-{b})"
                r = await burst(client, model, question, n, max_tokens, headers)
                acc = out[arm]
                acc["calls"].append(r["engine_calls"])
                acc["leaders"].append(r["latencies"][0])
                acc["followers"].extend(r["latencies"][1:])
                acc["layers"].extend(r["layers"])
                acc["answers"].append(r["distinct_answers"])
    summary: dict[str, Any] = {"benchmark": "chat_burst", "n": n, "bursts": bursts, "max_tokens": max_tokens}
    for arm, acc in out.items():
        summary[arm] = {
            "engine_calls_per_burst": round(statistics.mean(acc["calls"]), 2),
            "followers_p50_ms": round(statistics.median(acc["followers"]) * 1000, 1),
            "leader_p50_ms": round(statistics.median(acc["leaders"]) * 1000, 1),
            "x_cache": {k: acc["layers"].count(k) for k in sorted(set(acc["layers"]))},
            "distinct_answers_per_burst_max": max(acc["answers"]),
        }
    c, u = summary["coalesced"], summary["uncoalesced"]
    summary["engine_calls_saved_per_burst"] = round(u["engine_calls_per_burst"] - c["engine_calls_per_burst"], 2)
    summary["followers_p50_ratio_uncoalesced_over_coalesced"] = round(u["followers_p50_ms"] / c["followers_p50_ms"], 2)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--n", type=int, default=8, help="identical requests per burst")
    parser.add_argument("--bursts", type=int, default=5, help="bursts per arm")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    summary = asyncio.run(run(args.url, args.n, args.bursts, args.max_tokens))
    for arm in ("coalesced", "uncoalesced"):
        s = summary[arm]
        print(f"{arm:>12}: engine calls/burst {s['engine_calls_per_burst']:5.2f}  followers p50 "
              f"{s['followers_p50_ms']:8.1f} ms  leader p50 {s['leader_p50_ms']:8.1f} ms  x-cache {s['x_cache']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "chat_burst.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
