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
   - ``answer+question``: mean of the answer and question cosines.
   Writes ``--out`` (JSON) and a PNG next to it (ROC and precision/recall on the held-out half).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from caches.calibrate import choose_threshold, precision_recall_curve

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
DEFAULT_OUT = RESULTS / "judge_calibration.json"
DEFAULT_ANSWERS = RESULTS / "judge_answers.jsonl"
APP_JUDGE = "answer-embedding"
_WORD = re.compile(r"\w+", re.UNICODE)


# ---------------------------------------------------------------- pairs

def _text_groups(a: Sequence[str], b: Sequence[str]) -> list[int]:
    """Connected components of pairs linked by a shared question text (union-find)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a, b, strict=True):
        parent[find(x)] = find(y)
    roots: dict[str, int] = {}
    return [roots.setdefault(find(x), len(roots)) for x in a]


def select_pairs(path: str | Path, per_source: int, seed: int) -> pd.DataFrame:
    """``per_source`` pairs (half each label, as far as the file allows) with a ``half`` column:
    "tune" or "heldout", sharing no intent (when the file has intents) or no question text."""
    df = pd.read_csv(path)
    missing = {"text_a", "text_b", "label"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    df = df[df["label"].astype(str).isin(["0", "1"])].copy()
    df["label"] = df["label"].astype(int)
    df["text_a"], df["text_b"] = df["text_a"].astype(str), df["text_b"].astype(str)
    rng = np.random.default_rng(seed)
    if {"intent_a", "intent_b"} <= set(df.columns):
        intents = sorted(set(df["intent_a"].astype(str)) | set(df["intent_b"].astype(str)))
        rng.shuffle(intents)
        tune_intents = set(intents[: len(intents) // 2])
        in_a = df["intent_a"].astype(str).isin(tune_intents)
        in_b = df["intent_b"].astype(str).isin(tune_intents)
        df = df[in_a == in_b].copy()  # a pair straddling the halves would leak an intent
        df["half"] = np.where(in_a[in_a == in_b], "tune", "heldout")
        split_by = "intent"
    else:
        groups = np.asarray(_text_groups(list(df["text_a"]), list(df["text_b"])))
        order = rng.permutation(groups.max() + 1)
        tune_groups = set(order[: len(order) // 2].tolist())
        df["half"] = np.where([g in tune_groups for g in groups], "tune", "heldout")
        split_by = "question-text group"
    picked = []
    for (_half, _label), part in df.groupby(["half", "label"], sort=True):
        n = min(len(part), per_source // 4)
        picked.append(part.iloc[rng.permutation(len(part))[:n]])
    out = pd.concat(picked).reset_index(drop=True)
    out["source"] = Path(path).parent.name or Path(path).stem
    out["split_by"] = split_by
    # Interleave so that an interrupted generation still leaves a balanced sample of whole pairs.
    return out.iloc[rng.permutation(len(out))].reset_index(drop=True)


# ---------------------------------------------------------------- answers

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


# ---------------------------------------------------------------- judges

def lexical_overlap(a: str, b: str) -> float:
    """Jaccard overlap of the two texts' casefolded word sets (1.0 for two empty texts)."""
    wa, wb = set(_WORD.findall(a.casefold())), set(_WORD.findall(b.casefold()))
    if not wa and not wb:
        return 1.0
    return len(wa & wb) / len(wa | wb)


def pair_scores(pairs: pd.DataFrame, encode_fn: Callable[[list[str]], np.ndarray]) -> dict[str, np.ndarray]:
    """Each judge's score per pair (higher = more likely equivalent)."""
    texts = list(dict.fromkeys([*pairs["answer_a"], *pairs["answer_b"], *pairs["text_a"], *pairs["text_b"]]))
    vectors = encode_fn(texts)
    row = {t: i for i, t in enumerate(texts)}

    def cos(col_a: str, col_b: str) -> np.ndarray:
        va = vectors[[row[t] for t in pairs[col_a]]]
        vb = vectors[[row[t] for t in pairs[col_b]]]
        return np.einsum("ij,ij->i", va, vb).astype(np.float64)

    from caches.semantic.guard import trap_guard

    answer_cos, question_cos = cos("answer_a", "answer_b"), cos("text_a", "text_b")
    answers = list(zip(pairs["answer_a"], pairs["answer_b"], strict=True))
    lexical = np.array([lexical_overlap(a, b) for a, b in answers])
    # The cache's lexical trap guard applied to the two *answers*: a differing number or negation
    # in otherwise overlapping answers ("2.5 liters" / "3 liters") vetoes "equivalent".
    answer_guard = np.array([trap_guard(a, b) is not None for a, b in answers])
    return {
        APP_JUDGE: answer_cos,
        "answer-embedding+answer-guard": np.where(answer_guard, -1.0, answer_cos),
        "answer-lexical": lexical,
        "question-embedding": question_cos,
        "answer+question": (answer_cos + question_cos) / 2,
    }


def behind_question_guard(pairs: pd.DataFrame) -> np.ndarray:
    """Pairs the cache's trap guard lets through on the questions: the only ones a judge is asked
    about in the app (a guarded pair is a miss before any answer is compared)."""
    from caches.semantic.guard import trap_guard

    return np.array([trap_guard(a, b) is None for a, b in zip(pairs["text_a"], pairs["text_b"], strict=True)])


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    _, precision, recall = precision_recall_curve(scores, labels)
    if recall.size == 0:
        return float("nan")
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def wilson_lower(successes: int, n: int, z: float = 1.96) -> float:
    """Lower end of the Wilson 95% interval of a proportion: what a small sample's precision can
    honestly claim (9 of 9 right is a lower bound of 0.70, not 1.0)."""
    if n == 0:
        return 0.0
    p = successes / n
    centre = p + z * z / (2 * n)
    margin = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float((centre - margin) / (1 + z * z / n))


def operating_point(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float | int]:
    said = scores >= threshold
    tp = int(np.sum(said & (labels == 1)))
    fp = int(np.sum(said & (labels == 0)))
    fn = int(np.sum(~said & (labels == 1)))
    precision = tp / (tp + fp) if tp + fp else 1.0  # nothing called equivalent: no wrong hit taught
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "precision_wilson95_low": round(wilson_lower(tp, tp + fp), 4),
            "recall": round(recall, 4), "f1": round(f1, 4),
            "tp": tp, "fp": fp, "fn": fn, "n": int(labels.size), "n_positive": int(labels.sum())}


def evaluate(pairs: pd.DataFrame, scores: dict[str, np.ndarray], target: float) -> dict[str, Any]:
    labels = pairs["label"].to_numpy()
    tune = (pairs["half"] == "tune").to_numpy()
    finished = (pairs["finished_a"] & pairs["finished_b"]).to_numpy()
    passed = behind_question_guard(pairs)
    judges: dict[str, Any] = {}
    for name, s in scores.items():
        threshold, tune_p, tune_r = choose_threshold(s[tune], labels[tune], target)
        held = ~tune
        entry: dict[str, Any] = {
            "threshold": round(threshold, 6),
            "tune": {"precision": round(tune_p, 4), "recall": round(tune_r, 4), "n": int(tune.sum())},
            "heldout": operating_point(s[held], labels[held], threshold),
            "heldout_roc_auc": round(roc_auc(s[held], labels[held]), 4),
            "heldout_average_precision": round(average_precision(s[held], labels[held]), 4),
            "heldout_finished_only": operating_point(s[held & finished], labels[held & finished], threshold),
            "heldout_behind_question_guard": operating_point(s[held & passed], labels[held & passed], threshold),
            "heldout_by_source": {
                src: operating_point(s[held & m], labels[held & m], threshold)
                for src in sorted(pairs["source"].unique())
                for m in [(pairs["source"] == src).to_numpy()]
            },
        }
        # Tuned only on the pairs the question guard lets through (what the judge sees in the app).
        g_t, _, _ = choose_threshold(s[tune & passed], labels[tune & passed], target)
        entry["tuned_behind_question_guard"] = {
            "threshold": round(g_t, 6),
            "heldout_behind_question_guard": operating_point(s[held & passed], labels[held & passed], g_t),
        }
        # The threshold that would have met the target on the held-out half itself: how far the
        # tuned one is from it (a large gap means the tuning half does not transfer).
        oracle_t, _, oracle_r = choose_threshold(s[held], labels[held], target)
        entry["heldout_best_threshold_for_target"] = {"threshold": round(oracle_t, 6), "recall": round(oracle_r, 4)}
        judges[name] = entry
    return judges


def plot(pairs: pd.DataFrame, scores: dict[str, np.ndarray], judges: dict[str, Any], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held = (pairs["half"] == "heldout").to_numpy()
    labels = pairs["label"].to_numpy()[held]
    fig, (ax_roc, ax_pr, ax_hist) = plt.subplots(1, 3, figsize=(16, 4.6), dpi=110)
    for name, s in scores.items():
        sh = s[held]
        order = np.argsort(-sh, kind="stable")
        y = labels[order]
        tpr = np.r_[0.0, np.cumsum(y) / max(int(y.sum()), 1)]
        fpr = np.r_[0.0, np.cumsum(1 - y) / max(int((1 - y).sum()), 1)]
        line, = ax_roc.plot(fpr, tpr, label=f"{name} (AUC {judges[name]['heldout_roc_auc']:.3f})")
        _, precision, recall = precision_recall_curve(sh, labels)
        ax_pr.plot(recall, precision, color=line.get_color(), label=name)
        point = judges[name]["heldout"]
        ax_pr.plot([point["recall"]], [point["precision"]], "o", color=line.get_color())
    ax_roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax_roc.set(xlabel="false 'equivalent' rate", ylabel="true 'equivalent' rate", title="ROC, held-out half")
    ax_pr.axhline(target, color="grey", linestyle=":", linewidth=1)
    ax_pr.set(xlabel="recall", ylabel="precision", ylim=(0.4, 1.02),
              title=f"precision/recall, held-out half (dots: thresholds tuned for {target})")
    # The app's judge: how far apart its scores for the two labels are (all pairs, both halves).
    app, all_labels = scores[APP_JUDGE], pairs["label"].to_numpy()
    bins = np.linspace(min(0.0, float(app.min())), 1.0, 41)
    ax_hist.hist(app[all_labels == 1], bins=bins, alpha=0.6, label="paraphrase questions (1)")
    ax_hist.hist(app[all_labels == 0], bins=bins, alpha=0.6, label="non-paraphrase questions (0)")
    ax_hist.axvline(judges[APP_JUDGE]["threshold"], color="k", linestyle="--", linewidth=1)
    ax_hist.set(xlabel="cosine of the two answers' embeddings", ylabel="pairs",
                title=f"{APP_JUDGE}: t={judges[APP_JUDGE]['threshold']:.3f}")
    for ax in (ax_roc, ax_pr, ax_hist):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc={ax_roc: "lower right", ax_pr: "upper right"}.get(ax, "upper left"))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------- main

def _display(path: str | Path) -> str:
    """Repo-relative (or relative to its parent folder, for ../shared data): no machine layout leaks."""
    p = Path(path).resolve()
    if p.is_relative_to(REPO_ROOT):
        return str(p.relative_to(REPO_ROOT))
    if p.is_relative_to(REPO_ROOT.parent):
        return str(Path("..") / p.relative_to(REPO_ROOT.parent))
    return str(path)


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
