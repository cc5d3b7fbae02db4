"""The answer-equivalence judges (caches/semantic/judge.py) and their calibration's bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks.judge_calibration import DEFAULT_OUT
from benchmarks.judge_pairs import select_pairs
from benchmarks.judge_scores import APP_JUDGE, lexical_overlap, operating_point, roc_auc
from caches.semantic.judge import (
    ANSWER_SIMILARITY_THRESHOLD,
    Answer,
    AnswerJudge,
    EmbeddingJudge,
    ExactTextJudge,
)


def unit(*xs: float) -> np.ndarray:
    v = np.asarray(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def at_cosine(c: float) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors whose cosine is c."""
    return unit(1.0, 0.0), unit(c, float(np.sqrt(max(0.0, 1 - c * c))))


def test_embedding_judge_uses_the_calibrated_threshold_inclusively() -> None:
    judge = EmbeddingJudge(threshold=0.8)
    a, b = at_cosine(0.8)
    assert judge.equivalent(Answer("x", a), Answer("y", b))  # at the threshold: equivalent
    a, b = at_cosine(0.79)
    assert not judge.equivalent(Answer("x", a), Answer("y", b))
    assert EmbeddingJudge().threshold == ANSWER_SIMILARITY_THRESHOLD


def test_embedding_judge_without_a_vector_is_cautious() -> None:
    judge = EmbeddingJudge(threshold=-1.0)  # would call anything with vectors equivalent
    v = unit(1.0, 0.0)
    assert not judge.equivalent(Answer("same", None), Answer("same", v))
    assert not judge.equivalent(Answer("same", v), Answer("same"))


def test_embedding_judge_ignores_the_text() -> None:
    a, b = at_cosine(0.2)
    assert not EmbeddingJudge().equivalent(Answer("Paris.", a), Answer("Paris.", b))
    assert EmbeddingJudge().equivalent(Answer("Paris.", a), Answer("It is Paris", a))


def test_exact_text_judge_compares_canonical_text() -> None:
    judge = ExactTextJudge()
    assert judge.equivalent(Answer("card_arrival"), Answer("  CARD_ARRIVAL "))
    assert not judge.equivalent(Answer("The capital is Paris."), Answer("Paris is the capital."))


def test_judges_meet_the_protocol() -> None:
    judges: list[AnswerJudge] = [EmbeddingJudge(), ExactTextJudge()]
    assert [j.name for j in judges] == ["answer-embedding", "exact-text"]


def test_committed_calibration_and_constant_agree() -> None:
    """The constant is the threshold the committed calibration chose for the app's judge, and that
    calibration met its precision target on the held-out half (the figures its comment cites)."""
    result = json.loads(DEFAULT_OUT.read_text(encoding="utf-8"))
    assert result["judge"] == APP_JUDGE == EmbeddingJudge().name
    assert result["threshold"] == pytest.approx(ANSWER_SIMILARITY_THRESHOLD, abs=1e-6)
    assert result["judges"][APP_JUDGE]["threshold"] == result["threshold"]
    source = (Path(__file__).resolve().parents[2] / "caches" / "semantic" / "judge.py").read_text()
    heldout = result["heldout"]
    assert f"precision {heldout['precision']:.3f}" in source and f"recall {heldout['recall']:.3f}" in source
    # the judge's quality the verified rule reads (and benchmarks.stream_judges.MeasuredJudge plays)
    assert EmbeddingJudge().recall == pytest.approx(heldout["tp"] / (heldout["tp"] + heldout["fn"]))
    assert EmbeddingJudge().false_positive_rate == pytest.approx(heldout["fp"] / (heldout["n"] - heldout["n_positive"]))


# ---- the calibration benchmark's pure parts

def test_lexical_overlap() -> None:
    assert lexical_overlap("Paris is the capital.", "the capital: Paris is") == 1.0
    assert lexical_overlap("a b", "c d") == 0.0
    assert lexical_overlap("A b", "a c") == pytest.approx(1 / 3)
    assert lexical_overlap("", "") == 1.0


def test_roc_auc_and_operating_point() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    labels = np.array([1, 0, 1, 0])
    assert roc_auc(scores, labels) == pytest.approx(0.75)
    point = operating_point(scores, labels, 0.75)
    assert (point["tp"], point["fp"], point["fn"]) == (1, 1, 1)
    assert point["precision"] == 0.5 and point["recall"] == 0.5 and point["f1"] == 0.5
    # Nothing called equivalent: precision is vacuously 1 (no wrong hit taught), recall 0.
    assert operating_point(scores, labels, 2.0)["precision"] == 1.0


def test_split_by_intent_shares_no_intent(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    intents = [f"i{k}" for k in range(10)]
    rows = []
    for n in range(400):
        a = intents[rng.integers(10)]
        b = a if n % 2 else intents[rng.integers(10)]
        rows.append({"text_a": f"q{n}a", "text_b": f"q{n}b", "intent_a": a, "intent_b": b, "label": int(a == b)})
    path = tmp_path / "pairs.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    pairs = select_pairs(path, 80, seed=0)
    assert pairs.groupby(["half", "label"]).size().to_dict() == {
        ("heldout", 0): 20, ("heldout", 1): 20, ("tune", 0): 20, ("tune", 1): 20}
    halves = {h: set(g["intent_a"]) | set(g["intent_b"]) for h, g in pairs.groupby("half")}
    assert not halves["tune"] & halves["heldout"]
    assert (pairs["split_by"] == "intent").all()
    assert select_pairs(path, 80, seed=0).equals(pairs)  # a fixed seed picks the same pairs


def test_split_without_intents_keeps_shared_questions_together(tmp_path: Path) -> None:
    # Each base question takes part in a paraphrase pair and a trap pair: both must land on one side.
    rows = []
    for n in range(60):
        rows.append({"text_a": f"base{n}", "text_b": f"para{n}", "label": 1})
        rows.append({"text_a": f"base{n}", "text_b": f"trap{n}", "label": 0})
    path = tmp_path / "pairs.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    pairs = select_pairs(path, 40, seed=3)
    texts = {h: set(g["text_a"]) | set(g["text_b"]) for h, g in pairs.groupby("half")}
    assert not texts["tune"] & texts["heldout"]
    assert len(pairs) == 40 and set(pairs["label"]) == {0, 1}


def test_wilson_lower_bound() -> None:
    from benchmarks.judge_scores import wilson_lower

    assert wilson_lower(9, 9) == pytest.approx(0.701, abs=1e-3)
    assert wilson_lower(0, 0) == 0.0
    assert 0.9 < wilson_lower(980, 1000) < 0.98
