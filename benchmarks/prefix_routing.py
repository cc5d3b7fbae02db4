"""Prefix-aware routing across two LLM replicas against Ray Serve's default router.

    python -m benchmarks.prefix_routing [--model DIR] [--prefixes P] [--questions Q] [--prefix-tokens N]

Starts a local Ray Serve with the LLM deployment at two replicas, twice in one run: once with
deployments.routing.PrefixAffinityRouter and once with Serve's default power-of-two-choices
router. The same requests (P distinct shared prefixes, such as P apps with their own system
prompts, Q questions each, interleaved) go through a deployment handle one at a time. It prints
the cached fraction of prompt tokens (vLLM's own count), the number of requests whose prefix
was not found on the replica that served them, the mean latency, and as its last line one JSON
object with those figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
TOPICS = ["billing", "travel", "security", "payroll", "hiring", "legal", "facilities", "training"]


def prefixes(n: int, words: int) -> list[str]:
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        body = " ".join(f"Rule {j}: {topic} requests of type {j} go to the {topic} desk within {j + 1} days." for j in range(words // 14 + 1))
        out.append(f"You are the {topic} assistant number {i}. {body}")
    return out


# How long to wait for an arm's replicas to stop. Serve force-kills a replica whose graceful stop
# hangs only after its own timeouts, and `serve.delete`'s blocking wait gives up after 60 s: a
# slow stop (seen once: a vLLM replica took 67 s) must not fail a measurement that is complete.
DELETE_WAIT_S = 180.0


def delete_app(app_name: str) -> None:
    from ray import serve

    serve.delete(app_name, _blocking=False)
    deadline = time.monotonic() + DELETE_WAIT_S
    while app_name in serve.status().applications and time.monotonic() < deadline:
        time.sleep(1.0)


def run_arm(router: str, model: str, system_prompts: list[str], questions: int) -> dict[str, Any]:
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from deployments.config import LLMSettings
    from deployments.llm import LLMDeployment

    settings = LLMSettings(model=model, served_model_name="bench", system_prompt="", max_model_len=2048)
    options: dict[str, Any] = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}}
    if router == "power-of-two":
        options["request_router_config"] = RequestRouterConfig()  # Serve's default
    handle = serve.run(LLMDeployment.options(**options).bind(settings.model_dump()), name=f"routing-{router}",
                       route_prefix=None)
    cached, misses, latency, tokens = [], 0, [], []
    homes: dict[int, set[str]] = {}
    try:
        for q in range(questions):
            for p, system in enumerate(system_prompts):
                body = {"model": "bench", "temperature": 0, "max_tokens": 2,
                        "messages": [{"role": "system", "content": system},
                                     {"role": "user", "content": f"Question {q} about case {p * 31 + q}?"}]}
                start = time.perf_counter()
                out = handle.chat.remote(body, "bench-tenant").result()
                latency.append(time.perf_counter() - start)
                homes.setdefault(p, set()).add(out["replica"])
                usage = out["body"]["usage"]
                n_cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                cached.append(n_cached / usage["prompt_tokens"])
                tokens.append(usage["prompt_tokens"])
                if q > 0 and n_cached == 0:
                    misses += 1  # this prefix was served before, but not by this replica
    finally:
        delete_app(f"routing-{router}")
    return {
        "cached_token_fraction": statistics.mean(cached),
        "repeat_prefix_misses": misses,
        "requests": len(cached),
        "latency_mean_s": statistics.mean(latency),
        "prompt_tokens_mean": statistics.mean(tokens),
        "replicas_per_prefix_mean": statistics.mean(len(v) for v in homes.values()),
        "replicas_used": len(set().union(*homes.values())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / ".models" / "tiny-llama"))
    parser.add_argument("--prefixes", type=int, default=6)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--prefix-tokens", type=int, default=300)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray
    from ray import serve

    env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="tsray-", dir="/tmp"), runtime_env={"env_vars": env})
    from caches.redis_server import free_port

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})  # never share the app's port
    system_prompts = prefixes(args.prefixes, args.prefix_tokens)
    results = {}
    try:
        for router in ("prefix-affinity", "power-of-two"):
            results[router] = run_arm(router, args.model, system_prompts, args.questions)
            r = results[router]
            print(f"{router:>16}: cached tokens {r['cached_token_fraction']:.1%}, "
                  f"repeat-prefix misses {r['repeat_prefix_misses']}/{args.prefixes * (args.questions - 1)}, "
                  f"replicas per prefix {r['replicas_per_prefix_mean']:.2f} (of {r['replicas_used']} used), "
                  f"mean latency {r['latency_mean_s'] * 1000:.0f} ms", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    summary = {
        "benchmark": "prefix_routing", "model": Path(args.model).name, "replicas": 2,
        "prefixes": args.prefixes, "questions_per_prefix": args.questions, "systems": results,
        "ratios": {
            "cached_fraction_affinity_over_pow2": results["prefix-affinity"]["cached_token_fraction"]
            / max(results["power-of-two"]["cached_token_fraction"], 1e-9),
            "latency_pow2_over_affinity": results["power-of-two"]["latency_mean_s"]
            / results["prefix-affinity"]["latency_mean_s"],
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prefix_routing.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
