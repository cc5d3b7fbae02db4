"""Latency of a chat miss, an exact hit and a semantic hit through HTTP, in one run.

    python -m benchmarks.chat_latency --url http://127.0.0.1:8000 [--n 20] [--max-tokens 32]

Sends N fresh deterministic questions (misses: encoder, semantic lookup, vLLM, two stores), then
the same N again (exact hits: one Redis GET), then N of them with the trailing '?' dropped
(semantic candidates). Every chat request is followed by a `GET /healthz`, the floor of one trip
through the Serve proxy and the Ingress, so the exact hit is compared with its baseline measured
interleaved on the same machine at the same moment (`exact_over_healthz`). Prints medians per
`x-cache` class and the ratios; the last line is one JSON object. Run it against an app started
with `make run`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections import defaultdict

import httpx

from benchmarks.prefix_cache import RESULTS

TOPICS = ["France", "Japan", "Brazil", "Canada", "Kenya", "Norway", "India", "Chile", "Egypt", "Spain",
          "Peru", "Italy", "Ghana", "Chad", "Iran", "Cuba", "Laos", "Mali", "Oman", "Fiji"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    run = uuid.uuid4().hex[:6]
    timings: dict[str, list[float]] = defaultdict(list)
    with httpx.Client(base_url=args.url, timeout=300) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]

        def ask(text: str) -> None:
            body = {"model": model, "temperature": 0, "max_tokens": args.max_tokens,
                    "messages": [{"role": "user", "content": text}]}
            start = time.perf_counter()
            resp = client.post("/v1/chat/completions", json=body)
            elapsed = time.perf_counter() - start
            resp.raise_for_status()
            timings[resp.headers.get("x-cache", "?")].append(elapsed)
            start = time.perf_counter()
            client.get("/healthz").raise_for_status()
            timings["healthz"].append(time.perf_counter() - start)

        questions = [f"What is the capital of {TOPICS[i % len(TOPICS)]}? (run {run}, #{i})" for i in range(args.n)]
        for q in questions:
            ask(q)
        for q in questions:
            ask(q)
        for q in questions:
            ask(q.replace("?", ""))
    summary = {k: {"n": len(v), "p50_ms": round(statistics.median(v) * 1000, 2)} for k, v in sorted(timings.items())}
    for k, v in summary.items():
        print(f"{k:>9}: n={v['n']:3d}  median {v['p50_ms']:9.2f} ms")
    out = {"benchmark": "chat_latency", "n": args.n, "by_cache": summary}
    if "miss" in summary and "exact" in summary:
        out["miss_over_exact"] = round(summary["miss"]["p50_ms"] / summary["exact"]["p50_ms"], 1)
        print(f"a miss takes {out['miss_over_exact']}x the time of an exact hit")
    if "exact" in summary:
        out["exact_over_healthz"] = round(summary["exact"]["p50_ms"] / summary["healthz"]["p50_ms"], 2)
        print(f"an exact hit takes {out['exact_over_healthz']}x the time of /healthz")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "chat_latency.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
