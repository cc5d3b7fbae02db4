"""The replay behind benchmarks/second_encoder.py: what it counts as a paraphrase and a hit."""

import numpy as np
import pytest

from benchmarks.second_encoder import replay, rule_vectors


def _unit(*rows: list[float]) -> np.ndarray:
    vectors = np.array(rows, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_a_repeat_is_not_a_paraphrase_and_a_near_neighbour_hits_once_stored():
    vectors = _unit([1, 0], [1, 0.05], [1, 0], [0, 1], [0.05, 1])
    texts = ["a", "a2", "a", "b", "b2"]
    intents = ["x", "x", "x", "y", "z"]  # b2's neighbour b is another intent: a wrong hit
    hits, correct, paraphrases = replay(vectors, texts, intents, threshold=0.99)
    assert (hits, correct, paraphrases) == (2, 1, 4)


def test_nothing_below_the_threshold_hits_and_out_of_scope_is_never_correct():
    vectors = _unit([1, 0], [1, 0.05], [0, 1])
    assert replay(vectors, ["a", "b", "c"], ["x", "x", "x"], threshold=1.01) == (0, 0, 3)
    assert replay(vectors, ["a", "b", "c"], ["oos", "oos", "x"], threshold=0.99) == (1, 0, 3)


def test_the_mean_rule_scores_the_mean_of_the_two_cosines():
    first, second = _unit([1, 0], [0.6, 0.8]), _unit([1, 0], [0, 1])
    mean = rule_vectors("mean", first, second)
    assert float(mean[0] @ mean[1]) == pytest.approx(0.3, abs=1e-6)
