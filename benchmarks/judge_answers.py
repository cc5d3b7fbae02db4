"""Answers for the judge calibration (benchmarks/judge_calibration.py, step 2): every question
answered greedily by the app's LLM code path, cached in a JSONL keyed by model, system prompt,
max_tokens and question, and joined back onto the pairs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd


def answer_key(model_id: str, system_prompt: str, max_tokens: int, question: str) -> str:
    raw = json.dumps([model_id, system_prompt, max_tokens, question], ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()


def load_answers(path: Path) -> dict[str, dict[str, Any]]:
    answers: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                answers[row["key"]] = row
    return answers


async def generate(questions: list[str], answers_path: Path, max_tokens: int, concurrency: int,
                   model: str | None) -> None:
    """Answer every question not yet in ``answers_path`` through the app's LLM code path."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # One process (no engine-core / worker processes to spawn): starts in seconds, and a batch
    # benchmark has no front-end to keep responsive.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from caches.prompts import build_messages
    from deployments.config import LLMSettings
    from deployments.llm import LLMServer

    settings = LLMSettings(**({"model": model} if model else {}))
    model_id = Path(settings.model).name
    done = load_answers(answers_path)
    unique = list(dict.fromkeys(questions))
    todo = [q for q in unique if answer_key(model_id, settings.system_prompt, max_tokens, q) not in done]
    print(f"{len(unique)} distinct questions: {len(unique) - len(todo)} answered already, {len(todo)} to generate",
          flush=True)
    if not todo:
        return
    server = await LLMServer.create(settings)
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    gate = asyncio.Semaphore(concurrency)
    started, tokens, count = time.monotonic(), 0, 0

    async def one(question: str, out: Any) -> None:
        nonlocal tokens, count
        body = {"model": settings.served_model_name, "temperature": 0, "max_tokens": max_tokens,
                "messages": build_messages(settings.system_prompt, [{"role": "user", "content": question}])}
        async with gate:
            result = await server.chat(body, "default")
        if result["status"] != 200:
            print(f"error on {question!r}: {result['body']}", flush=True)
            return
        choice = result["body"]["choices"][0]
        n_tokens = int(result["body"]["usage"]["completion_tokens"])
        out.write(json.dumps({
            "key": answer_key(model_id, settings.system_prompt, max_tokens, question),
            "model": model_id, "max_tokens": max_tokens, "question": question,
            "answer": choice["message"]["content"] or "", "finish_reason": choice["finish_reason"],
            "completion_tokens": n_tokens}, ensure_ascii=False) + "\n")
        out.flush()  # each answer survives an interrupted run
        tokens, count = tokens + n_tokens, count + 1
        if count % 25 == 0:
            elapsed = time.monotonic() - started
            print(f"{count}/{len(todo)} answers, {tokens / elapsed:.1f} tokens/s", flush=True)

    try:
        with answers_path.open("a", encoding="utf-8") as out:
            await asyncio.gather(*(one(q, out) for q in todo))
    finally:
        server.shutdown()



def attach_answers(pairs: pd.DataFrame, answers: dict[str, dict[str, Any]], model_id: str,
                   system_prompt: str, max_tokens: int) -> pd.DataFrame:
    """Pairs whose two answers are both known, with answer texts and whether each finished."""
    def get(q: str) -> dict[str, Any] | None:
        return answers.get(answer_key(model_id, system_prompt, max_tokens, q))

    rows = []
    for rec in pairs.to_dict("records"):
        a, b = get(rec["text_a"]), get(rec["text_b"])
        if a is None or b is None:
            continue
        rows.append({**rec, "answer_a": a["answer"], "answer_b": b["answer"],
                     "finished_a": a["finish_reason"] == "stop", "finished_b": b["finish_reason"] == "stop",
                     "tokens_a": a["completion_tokens"], "tokens_b": b["completion_tokens"]})
    return pd.DataFrame(rows)
