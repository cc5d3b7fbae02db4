"""Similarity threshold from labelled pairs: the semantic cache's threshold is measured, not guessed.

``python -m caches.calibrate --pairs FILE.csv [--pairs FILE2.csv ...] --target-precision P
[--out configs/semantic_calibration.json] [--plot PATH.png]``

Each CSV has ``text_a,text_b,label`` (1 = same answer, 0 = different; other columns ignored). Both
texts are embedded with the project's encoder (cosine = inner product), and the threshold chosen is
the one that reaches precision P with the most recall: the lowest cosine ``t`` such that, among all
pairs with similarity >= t, at least a fraction P are labelled 1. By default the decision calibrated
is the one the cache makes: similarity >= t *and* the lexical trap guard passes
(:func:`caches.semantic.trap_guard`), because near-verbatim traps ("lock" / "unlock my card") score
near 1.0 and would otherwise force the threshold to ~0.998; ``--no-guard`` calibrates the raw
similarity. The JSON written at ``--out`` is
what the app reads (:func:`load_calibration`); the PNG next to it shows precision and recall against
the threshold so a person can see how steep the trade-off is around the chosen point.

Precision on balanced pairs is not precision on traffic: it depends on how often near-miss pairs
occur in real queries. That is why the verified mode of the semantic cache (learning from judged answers) exists on top of this.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from caches.encoder import ENCODER_NAME, ENCODER_VERSION

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CALIBRATION = REPO_ROOT / "configs" / "semantic_calibration.json"
# Used only when no calibration file exists (fresh checkout before calibrating): deliberately
# strict, since a too-high threshold costs hits while a too-low one answers wrong questions.
FALLBACK_THRESHOLD = 0.90


class Calibration(BaseModel):
    """The saved calibration; the app reads ``threshold``."""

    threshold: float
    target_precision: float
    precision: float
    recall: float
    n_pairs: int
    n_positive: int
    sources: list[str]
    guard: bool = True
    encoder: str
    encoder_version: str
    date: str


def load_pairs(paths: Sequence[str | Path]) -> tuple[list[str], list[str], np.ndarray]:
    """Concatenate the pairs of every file; rows without a 0/1 label are skipped."""
    texts_a: list[str] = []
    texts_b: list[str] = []
    labels: list[int] = []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = {"text_a", "text_b", "label"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: missing columns {sorted(missing)}")
            for row in reader:
                label = (row["label"] or "").strip()
                if label not in {"0", "1"}:
                    continue
                texts_a.append(row["text_a"])
                texts_b.append(row["text_b"])
                labels.append(int(label))
    return texts_a, texts_b, np.asarray(labels, dtype=np.int8)


def pair_similarities(
    texts_a: list[str], texts_b: list[str], encode_fn: Callable[[list[str]], np.ndarray] | None = None
) -> np.ndarray:
    """Cosine of each pair; texts are embedded once even when they repeat across pairs."""
    if encode_fn is None:
        from caches.encoder import encode as encode_fn
    unique = list(dict.fromkeys([*texts_a, *texts_b]))
    vectors = encode_fn(unique)
    index = {t: i for i, t in enumerate(unique)}
    a = vectors[[index[t] for t in texts_a]]
    b = vectors[[index[t] for t in texts_b]]
    return np.einsum("ij,ij->i", a, b).astype(np.float64)


def apply_guard(sims: np.ndarray, texts_a: list[str], texts_b: list[str]) -> np.ndarray:
    """Pairs the trap guard rejects can never be merged: give them similarity -1."""
    from caches.semantic import trap_guard

    blocked = np.array([trap_guard(a, b) is not None for a, b in zip(texts_a, texts_b, strict=True)])
    return np.where(blocked, -1.0, sims) if blocked.size else sims


def precision_recall_curve(sims: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, precision, recall) for every distinct similarity, thresholds descending.

    Precision at t counts pairs with sim >= t, so ties at the threshold are all included: a
    threshold can never claim a precision that its tied pairs do not have.
    """
    sims = np.asarray(sims, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if sims.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    order = np.argsort(-sims, kind="stable")
    s, y = sims[order], labels[order]
    tp = np.cumsum(y)
    n = np.arange(1, len(y) + 1)
    # keep the last index of each run of equal similarities (all tied pairs included)
    last_of_run = np.r_[s[1:] != s[:-1], True]
    positives = max(int(labels.sum()), 1)
    return s[last_of_run], tp[last_of_run] / n[last_of_run], tp[last_of_run] / positives


def choose_threshold(
    sims: np.ndarray, labels: np.ndarray, target_precision: float
) -> tuple[float, float, float]:
    """(threshold, precision, recall): the lowest threshold whose precision reaches the target.

    Recall only grows as the threshold falls, so the lowest qualifying threshold is the one with
    the most recall. When none qualifies the threshold sits just above every pair (no hits).
    """
    thresholds, precision, recall = precision_recall_curve(sims, labels)
    ok = np.flatnonzero(precision >= target_precision)
    if ok.size == 0:
        top = float(thresholds[0]) if thresholds.size else 1.0
        return float(np.nextafter(top, np.inf)), 1.0, 0.0
    i = int(ok[-1])
    return float(thresholds[i]), float(precision[i]), float(recall[i])


def plot_curve(sims: np.ndarray, labels: np.ndarray, chosen: Calibration, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thresholds, precision, recall = precision_recall_curve(sims, labels)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.plot(thresholds, precision, label="precision")
    ax.plot(thresholds, recall, label="recall")
    ax.axvline(chosen.threshold, color="k", linestyle="--", linewidth=1)
    ax.axhline(chosen.target_precision, color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(max(0.0, float(np.min(thresholds[thresholds > -1], initial=0.0))), 1.0)
    ax.set_xlabel("cosine similarity threshold" + (" (trap guard on)" if chosen.guard else ""))
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1.02)
    ax.set_title(
        f"{chosen.encoder}: t={chosen.threshold:.3f} -> precision {chosen.precision:.3f}, "
        f"recall {chosen.recall:.3f} (n={chosen.n_pairs})",
        fontsize=9,
    )
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def calibrate(
    pair_files: Sequence[str | Path],
    target_precision: float,
    encode_fn: Callable[[list[str]], np.ndarray] | None = None,
    guard: bool = True,
) -> tuple[Calibration, np.ndarray, np.ndarray]:
    texts_a, texts_b, labels = load_pairs(pair_files)
    if labels.size == 0:
        raise ValueError("no labelled pairs found")
    sims = pair_similarities(texts_a, texts_b, encode_fn)
    if guard:
        sims = apply_guard(sims, texts_a, texts_b)
    threshold, precision, recall = choose_threshold(sims, labels, target_precision)
    result = Calibration(
        threshold=round(threshold, 6),
        target_precision=target_precision,
        precision=round(precision, 6),
        recall=round(recall, 6),
        n_pairs=int(labels.size),
        n_positive=int(labels.sum()),
        sources=[_display_path(p) for p in pair_files],
        guard=guard,
        encoder=ENCODER_NAME,
        encoder_version=ENCODER_VERSION,
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    return result, sims, labels


def _display_path(path: str | Path) -> str:
    # relative to the repo when possible so the shipped JSON does not leak a machine's layout
    p = Path(path).resolve()
    for base, prefix in ((REPO_ROOT, Path()), (REPO_ROOT.parent, Path(".."))):  # the repo's own files first
        try:
            return str(prefix / p.relative_to(base))
        except ValueError:
            continue
    return str(path)


def load_calibration(path: str | Path | None = None) -> Calibration | None:
    p = Path(path) if path else DEFAULT_CALIBRATION
    if not p.exists():
        return None
    return Calibration.model_validate_json(p.read_text())


def load_threshold(path: str | Path | None = None) -> float:
    """The calibrated threshold the app uses; :data:`FALLBACK_THRESHOLD` if never calibrated."""
    cal = load_calibration(path)
    return cal.threshold if cal else FALLBACK_THRESHOLD


def main(argv: Sequence[str] | None = None) -> Calibration:
    parser = argparse.ArgumentParser(description="Calibrate the semantic-cache similarity threshold.")
    parser.add_argument("--pairs", action="append", required=True, help="CSV with text_a,text_b,label")
    parser.add_argument("--target-precision", type=float, required=True)
    parser.add_argument("--out", type=Path, default=DEFAULT_CALIBRATION)
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --out)")
    parser.add_argument(
        "--no-guard", action="store_true", help="calibrate raw similarity, without the trap guard"
    )
    args = parser.parse_args(argv)
    if not 0.0 < args.target_precision <= 1.0:
        parser.error("--target-precision must be in (0, 1]")
    result, sims, labels = calibrate(args.pairs, args.target_precision, guard=not args.no_guard)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(result.model_dump_json(indent=2) + "\n")
    plot_path = args.plot or args.out.with_suffix(".png")
    plot_curve(sims, labels, result, plot_path)
    print(
        f"threshold {result.threshold:.4f}: precision {result.precision:.4f} "
        f"(target {result.target_precision}), recall {result.recall:.4f} on {result.n_pairs} pairs"
    )
    print(f"wrote {args.out} and {plot_path}")
    return result


if __name__ == "__main__":
    main()
