"""Prefix-aware routing across two LLM replicas, against the earlier router and Serve's default.

    python -m benchmarks.prefix_routing [--model DIR] [--workload conversations|apps]
        [--conversations C] [--turns T] [--doc-tokens N] [--prefixes P] [--questions Q] [--prefix-tokens N]

Starts a local Ray Serve with the LLM deployment at two replicas, once per router, in one run:
``longest-prefix`` (deployments.routing.PrefixAffinityRouter, the app's), ``last-turn`` (the
router it replaced, kept here as the baseline: rendezvous on everything but the last user turn, so
turn N+1 of a conversation gets another key than turn N) and ``power-of-two`` (Serve's default).

Workloads, each request sent through a deployment handle one at a time:
- ``conversations`` (default): C conversations of T turns, interleaved turn by turn (every
  conversation's turn 1, then every turn 2, ...). Turn 1 brings a document of ~N tokens, later
  turns ask short follow-ups; each turn carries the model's real earlier answers. The figure is the
  share of prompt tokens served from vLLM's prefix cache on turns 2+ (vLLM's own count).
- ``apps``: P shared system prompts (P apps), Q single-turn questions each, interleaved.

It prints one line per router and, as its last line, one JSON object with every figure (also
written to benchmarks/results/prefix_routing[_apps].json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.serve.request_router import FIFOMixin, RequestRouter

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


class LastTurnRouter(FIFOMixin, RequestRouter):
    """The baseline: the router the app used before, keyed on everything but the last user turn.

    Each prefix key goes to its rendezvous replica (with the same overload escape); turn N+1 of a
    conversation has another key than turn N, so it lands wherever that key hashes.
    """

    async def choose_replicas(self, candidate_replicas: list[Any],
                              pending_request: Any = None) -> list[list[Any]]:
        from caches.prefix_affinity import overloaded, rendezvous_order
        from caches.prompts import shared_prefix_text

        args = pending_request.args if pending_request is not None else ()
        if (len(candidate_replicas) < 2 or len(args) < 2 or not isinstance(args[0], dict)
                or not isinstance(args[0].get("messages"), list)):
            return [candidate_replicas]
        key = f"{args[1]}\x00{shared_prefix_text(args[0]['messages'])}"
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ordered = [by_id[rid] for rid in rendezvous_order(key, list(by_id))]
        cache = self.replica_queue_len_cache
        known = [n for n in (cache.get(r.replica_id) for r in ordered) if n is not None]
        if overloaded(cache.get(ordered[0].replica_id), known):
            return [candidate_replicas]
        return [[ordered[0]], ordered[1:]]


ROUTERS = ("longest-prefix", "last-turn", "power-of-two")


def _router_config(router: str) -> Any:
    from ray.serve.config import RequestRouterConfig

    from deployments.routing import PrefixAffinityRouter

    if router == "longest-prefix":
        return RequestRouterConfig(request_router_class=PrefixAffinityRouter)
    if router == "last-turn":
        # by its module path, not __main__'s, so that Serve's controller can import it
        from benchmarks.prefix_routing import LastTurnRouter as baseline

        return RequestRouterConfig(request_router_class=baseline)
    return RequestRouterConfig()  # Serve's default: power of two choices


def _start(router: str, model: str) -> Any:
    from ray import serve

    from deployments.config import LLMSettings
    from deployments.llm import LLMDeployment

    settings = LLMSettings(model=model, served_model_name="bench", system_prompt="", max_model_len=2048)
    options: dict[str, Any] = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5},
                               "request_router_config": _router_config(router)}
    return serve.run(LLMDeployment.options(**options).bind(settings.model_dump()), name=f"routing-{router}",
                     route_prefix=None)


def _cached_share(out: dict[str, Any]) -> tuple[int, int]:
    usage = out["body"]["usage"]
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0, usage["prompt_tokens"]


def run_arm(router: str, model: str, system_prompts: list[str], questions: int) -> dict[str, Any]:
    """The ``apps`` workload: P system prompts, Q single-turn questions each, interleaved."""
    handle = _start(router, model)
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
                n_cached, n_prompt = _cached_share(out)
                cached.append(n_cached / n_prompt)
                tokens.append(n_prompt)
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


def documents(n: int, tokens: int) -> list[str]:
    """N distinct documents of about ``tokens`` tokens (a token is ~4 characters of English)."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        lines = [f"Item {j} of case {i}: the {topic} team agreed to deliver part {j * 7 + i} by week {j + 2}."
                 for j in range(tokens // 22 + 1)]
        out.append(f"Please read this {topic} record number {i}.\n" + "\n".join(lines))
    return out


def run_conversations(router: str, model: str, docs: list[str], turns: int, max_tokens: int = 16) -> dict[str, Any]:
    """The ``conversations`` workload: each document opens a conversation of ``turns`` turns."""
    handle = _start(router, model)
    convs = [[{"role": "system", "content": "You are a careful assistant for case files."},
              {"role": "user", "content": f"{doc}\nSummarise the record in one line."}] for doc in docs]
    cached_later = prompt_later = 0
    homes: list[set[str]] = [set() for _ in docs]
    latency_later: list[float] = []
    try:
        for turn in range(turns):
            for c, messages in enumerate(convs):
                if turn > 0:
                    messages.append({"role": "user", "content": f"Follow-up {turn}: which item is due first?"})
                body = {"model": "bench", "temperature": 0, "max_tokens": max_tokens, "messages": messages}
                start = time.perf_counter()
                out = handle.chat.remote(body, "bench-tenant").result()
                elapsed = time.perf_counter() - start
                homes[c].add(out["replica"])
                messages.append({"role": "assistant", "content": out["body"]["choices"][0]["message"]["content"]})
                if turn > 0:
                    n_cached, n_prompt = _cached_share(out)
                    cached_later += n_cached
                    prompt_later += n_prompt
                    latency_later.append(elapsed)
    finally:
        delete_app(f"routing-{router}")
    return {
        "cached_share_turns_2_plus": cached_later / max(prompt_later, 1),
        "prompt_tokens_turns_2_plus": prompt_later,
        "replicas_per_conversation_mean": statistics.mean(len(h) for h in homes),
        "replicas_used": len(set().union(*homes)),
        "latency_mean_turns_2_plus_s": statistics.mean(latency_later) if latency_later else 0.0,
        "requests": len(docs) * turns,
    }


@dataclass(frozen=True)
class Workload:
    """How a workload's figures are named: its headline share, what replicas are counted per, its latency."""

    metric: str  # the share of prompt tokens served from the prefix cache (the ratios compare it)
    metric_label: str
    per: str  # replicas_per_<per>_mean: a conversation's or a shared prefix's replicas
    latency_key: str
    latency_label: str
    results_file: str


WORKLOADS = {
    "conversations": Workload("cached_share_turns_2_plus", "prefix-cached share of prompt tokens on turns 2+",
                              "conversation", "latency_mean_turns_2_plus_s", "mean latency turns 2+",
                              "prefix_routing.json"),
    "apps": Workload("cached_token_fraction", "cached tokens", "prefix", "latency_mean_s", "mean latency",
                     "prefix_routing_apps.json"),
}


def router_line(router: str, r: dict[str, Any], workload: Workload, extra: str = "") -> str:
    """One router's figures as printed; `extra` goes before the replica count."""
    return (f"{router:>15}: {workload.metric_label} {r[workload.metric]:.1%}, {extra}replicas per {workload.per} "
            f"{r[f'replicas_per_{workload.per}_mean']:.2f} (of {r['replicas_used']} used), "
            f"{workload.latency_label} {r[workload.latency_key] * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / ".models" / "tiny-llama"))
    parser.add_argument("--workload", choices=("conversations", "apps"), default="conversations")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--doc-tokens", type=int, default=500)
    parser.add_argument("--prefixes", type=int, default=6)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--prefix-tokens", type=int, default=300)
    parser.add_argument("--routers", default=",".join(ROUTERS), help="comma-separated subset of " + ", ".join(ROUTERS))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray
    from ray import serve

    env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="tsray-", dir="/tmp"), runtime_env={"env_vars": env})
    from caches.redis_server import free_port

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})  # never share the app's port
    routers = [r for r in args.routers.split(",") if r]
    workload = WORKLOADS[args.workload]
    results: dict[str, dict[str, Any]] = {}
    try:
        for router in routers:
            if args.workload == "conversations":
                r = results[router] = run_conversations(router, args.model, documents(args.conversations, args.doc_tokens),
                                                        args.turns)
                extra = ""
            else:
                r = results[router] = run_arm(router, args.model, prefixes(args.prefixes, args.prefix_tokens),
                                              args.questions)
                extra = f"repeat-prefix misses {r['repeat_prefix_misses']}/{args.prefixes * (args.questions - 1)}, "
            print(router_line(router, r, workload, extra), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    summary: dict[str, Any] = {"benchmark": "prefix_routing", "workload": args.workload,
                               "model": Path(args.model).name, "replicas": 2, "systems": results}
    if args.workload == "conversations":
        summary.update(conversations=args.conversations, turns=args.turns, doc_tokens=args.doc_tokens)
    else:
        summary.update(prefixes=args.prefixes, questions_per_prefix=args.questions)
    metric = workload.metric
    if "longest-prefix" in results:
        ours = results["longest-prefix"][metric]
        summary["ratios"] = {f"{metric}_longest_prefix_over_{other.replace('-', '_')}": ours / max(r[metric], 1e-9)
                             for other, r in results.items() if other != "longest-prefix"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / workload.results_file).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
