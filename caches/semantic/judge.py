"""Answer equivalence: do two answers say the same thing?

The semantic cache learns where it may answer from a signal that exists in production: when the
model is called anyway (a miss, or a verification of an uncertain hit), its fresh answer is
compared with the answers of the entries the lookup proposed. Answer *text* identity is no such
signal (a model's answers to two paraphrases are almost never the same text), so the comparison
is a judge behind one small protocol:

- :class:`EmbeddingJudge` (the app's): cosine similarity of the two answers' embeddings by the
  app's own encoder, above a threshold calibrated on pairs of SmolLM2 answers
  (``benchmarks/judge_calibration.py``; its measured precision/recall are in the results there).
- :class:`ExactTextJudge`: answers equal as canonical text. Only right when answers are labels
  (the benchmark's comparison mode); never the app's default.

Benchmarks add an oracle judge on the stream's labels; it lives in ``benchmarks/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from caches.keys import canonical_text

# Calibrated by benchmarks/judge_calibration.py (benchmarks/results/judge_calibration.json): the
# lowest answer cosine with precision >= 0.95 for "equivalent" on the tuning half of 600 pairs of
# SmolLM2-135M-Instruct greedy answers (banking77 by intent, fow_cache by question group). On the
# held-out half (300 pairs): precision 0.800 (4 of 5; Wilson 95% low 0.38), recall 0.027, ROC AUC
# 0.53. SmolLM2's answers to paraphrases are barely closer than its answers to non-paraphrases
# (mean cosine 0.39 vs 0.34 on banking77, 0.57 vs 0.54-0.63 on fow_cache), so no threshold is both
# precise and useful: this one calls only near-verbatim answers equivalent, the cautious side (a
# false "equivalent" teaches the cache a wrong hit). Recalibrate when the model changes.
ANSWER_SIMILARITY_THRESHOLD = 0.993097
# That threshold's measured quality on the held-out half (the same file): 4 of 150 equivalent
# pairs called equivalent, 1 of 150 different ones. The verified rule reads the error rate behind
# the verdicts through these (caches.semantic.decision.debiased).
ANSWER_JUDGE_RECALL = 4 / 150
ANSWER_JUDGE_FALSE_POSITIVE_RATE = 1 / 150


@dataclass(frozen=True)
class Answer:
    """An answer as the judge sees it: its text and, where known, its unit-norm embedding."""

    text: str
    vector: np.ndarray | None = None


class AnswerJudge(Protocol):
    """Whether two answers are interchangeable for the user who asked, and how often it is right:
    ``recall`` (equivalent answers called equivalent) and ``false_positive_rate`` (different
    answers called equivalent), as measured on labelled pairs."""

    name: str
    recall: float
    false_positive_rate: float

    def equivalent(self, a: Answer, b: Answer) -> bool: ...


@dataclass(frozen=True)
class ExactTextJudge:
    name: str = "exact-text"
    # right by construction when answers are labels, its only use
    recall: float = 1.0
    false_positive_rate: float = 0.0

    def equivalent(self, a: Answer, b: Answer) -> bool:
        return canonical_text(a.text) == canonical_text(b.text)


@dataclass(frozen=True)
class EmbeddingJudge:
    threshold: float = ANSWER_SIMILARITY_THRESHOLD
    name: str = "answer-embedding"
    # measured at the shipped threshold; pass what you measured with another threshold or model
    recall: float = ANSWER_JUDGE_RECALL
    false_positive_rate: float = ANSWER_JUDGE_FALSE_POSITIVE_RATE

    def equivalent(self, a: Answer, b: Answer) -> bool:
        # An answer without a vector cannot be judged: not equivalent, the cautious side.
        if a.vector is None or b.vector is None:
            return False
        return float(np.dot(a.vector, b.vector)) >= self.threshold
