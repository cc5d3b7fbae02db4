"""The stand-in model's answers and the benchmark's answer judges (benchmarks/semantic_stream.py).

The stand-in model answers query ``i`` of intent ``I`` with ``"I#i"`` (per-query answers: every
answer its own text, as a model's are) or ``"I"`` (label answers, the comparison mode). Judges
read the intent back from an answer: the oracle says what the labels say, the measured judge is
the oracle degraded to a given recall and false-positive rate (the app's, as measured, or one a
deployment might have).
"""

from __future__ import annotations

import random

from caches.semantic.judge import Answer, EmbeddingJudge


def stand_in_answer(intent: str, i: int, answers: str) -> str:
    """The stand-in model's answer to query ``i``. ``per-query``: its own text, as a model's answer
    to a paraphrase would be; ``label``: the intent (out-of-scope queries: unique either way)."""
    if answers == "per-query" or intent.startswith("oos"):
        return f"{intent}#{i}"
    return intent


def intent_of(answer: str) -> str:
    return answer.split("#", 1)[0]


class OracleJudge:
    """The benchmark's answer judge: two answers are equivalent when they answer the same
    in-scope intent (read from the stream's labels, which the cache never sees). Every call is
    counted: in production each is a judge call on a model answer."""

    name = "oracle-labels"
    recall = 1.0
    false_positive_rate = 0.0

    def __init__(self) -> None:
        self.calls = 0

    def equivalent(self, a: Answer, b: Answer) -> bool:
        self.calls += 1
        ia, ib = intent_of(a.text), intent_of(b.text)
        return ia == ib and not ia.startswith("oos")


class MeasuredJudge(OracleJudge):
    """The oracle degraded to a judge of given quality: a truly equivalent pair is called
    equivalent with its recall, a different pair with its false-positive rate. By default the app's
    judge as measured (:class:`caches.semantic.judge.EmbeddingJudge`'s recall and false-positive
    rate, from ``benchmarks/results/judge_calibration.json``'s held-out half): it gives the policy
    the signal the app really has (on SmolLM2 answers, a weak one), not the labels production lacks."""

    name = "measured-app-judge"

    def __init__(self, seed: int = 0, quality: tuple[float, float] | None = None) -> None:
        """``quality``: (recall, false-positive rate) of a judge the app does not have, to ask what
        judge the verified rule needs (``--judge-quality``)."""
        super().__init__()
        app = EmbeddingJudge()
        self.recall, self.false_positive_rate = quality or (app.recall, app.false_positive_rate)
        self.rng = random.Random(seed)

    def equivalent(self, a: Answer, b: Answer) -> bool:
        truth = super().equivalent(a, b)
        return self.rng.random() < (self.recall if truth else self.false_positive_rate)
