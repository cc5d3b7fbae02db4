"""Held-out multi-turn pairs (fow_cache/conversation_pairs.jsonl) with the real encoder: the app's
semantic scope keeps every trap apart, which a cache comparing only the last question would not."""

from __future__ import annotations

import pytest

from benchmarks.conversation_pairs import DEFAULT_PAIRS, evaluate, read_pairs
from caches.calibrate import load_threshold
from deployments.config import LLMSettings

pytestmark = pytest.mark.skipif(not DEFAULT_PAIRS.exists(), reason="needs ../shared/data/fow_cache")


def test_the_app_merges_no_conversation_trap_that_the_last_question_alone_would() -> None:
    result = evaluate(read_pairs(DEFAULT_PAIRS), load_threshold(), LLMSettings().system_prompt)
    app, last_only = result["app"], result["last question only"]
    assert app["trap_pairs"] == 120
    assert app["traps_merged"] == 0, app["merged_trap_ids"]
    # The traps are real for the rule: without the history in the scope most of them would merge
    # ("cancel it" after a streaming plan, answered with the gym membership's answer).
    assert last_only["traps_merged"] >= 100
