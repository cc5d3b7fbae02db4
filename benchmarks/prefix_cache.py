"""KV / prefix cache benchmark: does building prompts shared-first pay off?

    python -m benchmarks.prefix_cache [--model DIR] [--system-prompt-tokens N] [--requests N]

Runs, in one process on the same questions, vLLM's in-process engine (the same engine settings
as the LLM deployment) three ways:
  * `builder`     prefix caching on, prompts from caches.prompts.build_messages (shared first),
  * `no-cache`    prefix caching off (the baseline),
  * `user-first`  prefix caching on, but a per-user line placed before the system prompt.
It prints time to first token p50/p99 and the cached fraction of prompt tokens for each, the
ratios against the baseline, and as its last line one JSON object with those figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from caches.prompts import build_messages

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
QUESTIONS = [
    "How many vacation days do new employees get?",
    "Can I carry unused leave into next year?",
    "Who approves a remote-work request?",
    "What is the notice period for resignation?",
    "How do I claim travel expenses?",
    "Is there a parental leave policy?",
    "When are salaries paid each month?",
    "How do I report a security incident?",
    "What are the core working hours?",
    "Can contractors use the company laptop policy?",
    "How long is the probation period?",
    "Who do I ask about pension contributions?",
]
POLICY_SENTENCES = [
    "Employees accrue paid leave monthly and must request it through the HR portal at least two weeks ahead.",
    "Remote work is allowed up to three days a week with the written approval of the line manager.",
    "Expenses are reimbursed within thirty days when submitted with itemised receipts.",
    "Security incidents must be reported to the security desk within one hour of discovery.",
    "The probation period lasts six months and may be extended once by up to three months.",
    "Salaries are paid on the last working day of each month by bank transfer.",
    "Parental leave is twenty weeks at full pay for the primary carer and six weeks for the partner.",
    "Core hours are ten to four; outside them, staff choose their hours with their team.",
]


def system_prompt_of(tokenizer: Any, n_tokens: int) -> str:
    text, i = "You are the HR assistant of Example Corp. Answer from the policy handbook below.\n", 0
    while len(tokenizer.encode(text)) < n_tokens:
        text += f"Section {i + 1}. {POLICY_SENTENCES[i % len(POLICY_SENTENCES)]}\n"
        i += 1
    ids = tokenizer.encode(text)[:n_tokens]
    return tokenizer.decode(ids)


async def run_mode(model: str, mode: str, system_prompt: str, questions: list[str], max_model_len: int) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from deployments.config import LLMSettings
    from deployments.llm import engine_cli_args

    settings = LLMSettings(model=model, served_model_name="bench", max_model_len=max_model_len,
                           enable_prefix_caching=(mode != "no-cache"))
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(engine_cli_args(settings))
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs.from_cli_args(args))
    tokenizer = await engine.get_tokenizer() if asyncio.iscoroutinefunction(engine.get_tokenizer) else engine.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=8)
    ttfts, cached, prompt_tokens = [], [], []
    try:
        # One warm-up request (not measured): it fills the cache in the cached modes and pays
        # one-off start-up costs in all of them.
        for i, question in enumerate([f"Warm-up {uuid.uuid4().hex[:4]}?"] + questions):
            user_line = f"Employee #{1000 + i} (team {i % 7}) asks:"
            if mode == "user-first":
                messages = [{"role": "system", "content": f"{user_line}\n{system_prompt}"},
                            {"role": "user", "content": question}]
            else:
                messages = build_messages(system_prompt, [{"role": "user", "content": f"{user_line} {question}"}])
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            start = time.perf_counter()
            first = None
            final = None
            async for out in engine.generate(prompt, params, request_id=f"{mode}-{i}-{uuid.uuid4().hex[:6]}"):
                if first is None and out.outputs and out.outputs[0].token_ids:
                    first = time.perf_counter() - start
                final = out
            if i == 0:
                continue
            ttfts.append(first if first is not None else time.perf_counter() - start)
            n_prompt = len(final.prompt_token_ids or [])
            prompt_tokens.append(n_prompt)
            cached.append((final.num_cached_tokens or 0) / max(n_prompt, 1))
    finally:
        engine.shutdown()
    return {
        "ttft_p50_s": float(np.percentile(ttfts, 50)),
        "ttft_p99_s": float(np.percentile(ttfts, 99)),
        "cached_token_fraction": float(statistics.mean(cached)),
        "prompt_tokens_mean": float(statistics.mean(prompt_tokens)),
        "requests": len(ttfts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / ".models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--system-prompt-tokens", type=int, default=1500)
    parser.add_argument("--requests", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    system_prompt = system_prompt_of(tokenizer, args.system_prompt_tokens)
    questions = [QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" (case {i})") for i in range(args.requests)]
    max_model_len = max(2048, args.system_prompt_tokens + 512)

    results: dict[str, Any] = {}
    for mode in ("builder", "no-cache", "user-first"):
        results[mode] = asyncio.run(run_mode(args.model, mode, system_prompt, questions, max_model_len))
        r = results[mode]
        print(f"{mode:>10}: TTFT p50 {r['ttft_p50_s'] * 1000:8.1f} ms  p99 {r['ttft_p99_s'] * 1000:8.1f} ms  "
              f"cached tokens {r['cached_token_fraction']:.1%}  ({r['requests']} requests, "
              f"~{r['prompt_tokens_mean']:.0f} prompt tokens)", flush=True)
    base = results["no-cache"]["ttft_p50_s"]
    ratios = {
        "speedup_p50_builder_vs_no_cache": base / results["builder"]["ttft_p50_s"],
        "speedup_p50_user_first_vs_no_cache": base / results["user-first"]["ttft_p50_s"],
        "speedup_p50_builder_vs_user_first": results["user-first"]["ttft_p50_s"] / results["builder"]["ttft_p50_s"],
    }
    for name, value in ratios.items():
        print(f"{name}: {value:.1f}x")
    summary = {"benchmark": "prefix_cache", "model": Path(args.model).name,
               "system_prompt_tokens": args.system_prompt_tokens, "systems": results, "ratios": ratios}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prefix_cache.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
