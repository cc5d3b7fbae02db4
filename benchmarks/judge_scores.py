"""Judges and their report for the judge calibration (benchmarks/judge_calibration.py, step 3):
each judge's score per pair, a threshold tuned on the tuning half, its held-out figures, the plot."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from caches.calibrate import choose_threshold, precision_recall_curve

APP_JUDGE = "answer-embedding"
_WORD = re.compile(r"\w+", re.UNICODE)


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
    # Does the other question's answer answer this question as well as its own does? (the cached
    # answer against the new question, beside the fresh answer): needs no two answers to be alike.
    relevance = np.minimum(cos("text_b", "answer_a") - cos("text_b", "answer_b"),
                           cos("text_a", "answer_b") - cos("text_a", "answer_a"))
    return {
        APP_JUDGE: answer_cos,
        "answer-embedding+answer-guard": np.where(answer_guard, -1.0, answer_cos),
        "answer-lexical": lexical,
        "question-embedding": question_cos,
        "answer+question": (answer_cos + question_cos) / 2,
        "answer-relevance": relevance,
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
