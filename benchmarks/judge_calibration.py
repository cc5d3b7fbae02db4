"""Calibrate and measure the answer-equivalence judge (caches/semantic/judge.py) on real SmolLM2 answers.

    python -m benchmarks.judge_calibration \\
        --pairs ../shared/data/banking77/pairs_same_intent.csv --pairs ../shared/data/fow_cache/pairs.csv

The semantic cache's verified policy learns where it may answer from a judge that compares a cached
answer with a fresh one. This measures that judge where it will run: on the app's own model's answers.

1. Pairs. From each CSV (``text_a,text_b,label``; 1 = paraphrases, 0 = not), ``--per-source`` pairs,
   half of each label, picked with ``--seed``, and split into a *tuning* and a *held-out* half. With
   ``intent_a,intent_b`` columns (banking77) the split is by intent: the intents are shuffled into two
   halves and a pair belongs to the half holding both its intents, so the halves share no intent.
   Without them pairs that share a question text are kept on one side (fow_cache builds several pairs
   on one base question).
2. Answers. Every question is answered by the app's LLM code path in process (deployments.llm
   LLMServer: vLLM's AsyncLLM + OpenAIServingChat, the app's engine settings, system prompt, chat
   template and message layout from caches.prompts), greedy (``temperature: 0``). The app sets no
   max_tokens; ``--max-tokens`` caps generation for cost on a 2-core box and answers cut by it are
   counted and also measured apart (``finished_only``). Answers are appended to a JSONL (``--answers``)
   keyed by model, system prompt, max_tokens and question, so a rerun only generates what is missing;
   ``--no-generate`` measures the pairs whose answers are already there.
3. Judges, each a score per pair with a threshold tuned on the tuning half for precision
   ``--target-precision`` of "equivalent" (a false "equivalent" teaches the cache a wrong hit), then
   precision/recall/F1 on the held-out half:
   - ``answer-embedding``: cosine of the two answers' embeddings (the app's encoder): the app's judge;
   - ``answer-lexical``: Jaccard overlap of the answers' word sets;
   - ``question-embedding``: cosine of the questions (no answer at all: the baseline an answer judge
     must beat to add information);
   - ``answer+question``: mean of the answer and question cosines;
   - ``answer-relevance``: how much less each question's embedding matches the other question's
     answer than its own answer (the smaller of the two gaps): a cached answer may serve a new
     question if it is about as relevant to it as the fresh one, even when the two answers differ.
   Writes ``--out`` (JSON) and a PNG next to it (ROC and precision/recall on the held-out half).

The steps live in benchmarks/judge_pairs.py (1), judge_answers.py (2) and judge_scores.py (3);
this module is the command and the result file.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.judge_answers import attach_answers, generate, load_answers
from benchmarks.judge_pairs import select_pairs
from benchmarks.judge_scores import APP_JUDGE, evaluate, pair_scores, plot

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
DEFAULT_OUT = RESULTS / "judge_calibration.json"
DEFAULT_ANSWERS = RESULTS / "judge_answers.jsonl"


def _display(path: str | Path) -> str:
    """Repo-relative (or relative to its parent folder, for ../shared data): no machine layout leaks."""
    p = Path(path).resolve()
    if p.is_relative_to(REPO_ROOT):
        return str(p.relative_to(REPO_ROOT))
    if p.is_relative_to(REPO_ROOT.parent):
        return str(Path("..") / p.relative_to(REPO_ROOT.parent))
    return str(path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", action="append", required=True, help="CSV text_a,text_b,label[,intent_a,intent_b]")
    parser.add_argument("--per-source", type=int, default=300, help="pairs per CSV (a quarter per half and label)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-precision", type=float, default=0.95)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--model", default=None, help="model folder (default: the app's, .models/SmolLM2-135M-Instruct)")
    parser.add_argument("--answers", type=Path, default=DEFAULT_ANSWERS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-generate", action="store_true", help="measure only pairs whose answers are cached")
    args = parser.parse_args(argv)

    from deployments.config import LLMSettings

    settings = LLMSettings(**({"model": args.model} if args.model else {}))
    model_id = Path(settings.model).name
    pairs = pd.concat([select_pairs(p, args.per_source, args.seed) for p in args.pairs], ignore_index=True)
    # Sources interleaved too, so that an interrupted generation leaves whole pairs of every source.
    pairs = pairs.iloc[np.random.default_rng(args.seed).permutation(len(pairs))].reset_index(drop=True)
    if not args.no_generate:
        questions = [q for a, b in zip(pairs["text_a"], pairs["text_b"], strict=True) for q in (a, b)]
        asyncio.run(generate(questions, args.answers, args.max_tokens, args.concurrency, args.model))
    answered = attach_answers(pairs, load_answers(args.answers), model_id, settings.system_prompt, args.max_tokens)
    if answered.empty or answered["half"].nunique() < 2 or answered["label"].nunique() < 2:
        raise SystemExit("not enough answered pairs to calibrate (run without --no-generate)")

    from caches.encoder import ENCODER_NAME, ENCODER_VERSION, encode

    scores = pair_scores(answered, encode)
    judges = evaluate(answered, scores, args.target_precision)
    tokens = np.r_[answered["tokens_a"], answered["tokens_b"]]
    finished = np.r_[answered["finished_a"], answered["finished_b"]]
    result = {
        "judge": APP_JUDGE,
        "threshold": judges[APP_JUDGE]["threshold"],
        "target_precision": args.target_precision,
        "heldout": judges[APP_JUDGE]["heldout"],
        "judges": judges,
        "pairs": {
            "sources": [_display(p) for p in args.pairs],
            "per_source_requested": args.per_source,
            "seed": args.seed,
            "answered": int(len(answered)),
            "selected": int(len(pairs)),
            "by_source_half_label": {
                f"{src}/{half}/{label}": int(n)
                for (src, half, label), n in answered.groupby(["source", "half", "label"]).size().items()
            },
            "split_by": {src: str(g["split_by"].iloc[0]) for src, g in answered.groupby("source")},
        },
        "answers": {
            "model": model_id,
            "file": _display(args.answers),
            "temperature": 0,
            "max_tokens": args.max_tokens,
            "mean_completion_tokens": round(float(tokens.mean()), 1),
            "cut_by_max_tokens": round(float(1 - finished.mean()), 4),
            "identical_text_share": {
                str(label): round(float((g["answer_a"].str.strip() == g["answer_b"].str.strip()).mean()), 4)
                for label, g in answered.groupby("label")
            },
        },
        # Where the app's judge's scores sit: mean answer cosine per source and label (and per
        # category where the file has one: fow_cache's trap kinds).
        "answer_cosine_mean": {
            "/".join(str(k) for k in key): round(float(np.mean(scores[APP_JUDGE][idx])), 4)
            for key, idx in answered.groupby(
                ["source", "label"] + (["category"] if "category" in answered else []), dropna=False
            ).indices.items()
        },
        "encoder": ENCODER_NAME,
        "encoder_version": ENCODER_VERSION,
        "command": "python -m benchmarks.judge_calibration " + " ".join(f"--pairs {_display(p)}" for p in args.pairs)
                   + f" --per-source {args.per_source} --seed {args.seed} --max-tokens {args.max_tokens}",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot(answered, scores, judges, args.target_precision, args.out.with_suffix(".png"))
    for name, j in judges.items():
        h = j["heldout"]
        print(f"{name:20s} t={j['threshold']:.4f}  held-out P={h['precision']:.3f} R={h['recall']:.3f} "
              f"F1={h['f1']:.3f}  AUC={j['heldout_roc_auc']:.3f}  (n={h['n']})")
    print(json.dumps({"threshold": result["threshold"], "heldout": result["heldout"], "out": _display(args.out)}))
    return result


if __name__ == "__main__":
    main()