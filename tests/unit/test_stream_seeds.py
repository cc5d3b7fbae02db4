"""Several draws of one query stream: named apart, then pooled (benchmarks.streams, semantic_stream)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks import streams
from benchmarks.stream_pool import pool_seeds


def _figures(para_hits: int, para_correct: int, para_queries: int = 100, verifications: int = 0) -> dict[str, Any]:
    return {
        "queries": 1000, "hits": para_hits + 50, "correct_hits": para_correct + 50,
        "wrong_hits": para_hits - para_correct, "unjudged_hits": 0, "paraphrase_queries": para_queries,
        "paraphrase_hits": para_hits, "paraphrase_correct_hits": para_correct,
        "paraphrase_precision": round(para_correct / para_hits, 4), "verifications": verifications,
        "judge_calls_per_1k": 10.0,
    }


def test_draws_are_summed_not_averaged() -> None:
    results = {
        "banking77_heldout": {"per-query": {"static": _figures(100, 99)}},
        "banking77_heldout_seed1": {"per-query": {"static": _figures(300, 294, para_queries=200, verifications=4)}},
        "fow_cache_pairs": {"per-query": {"static": _figures(10, 10)}},  # one draw: not pooled
    }
    pooled = pool_seeds(results)
    assert list(pooled) == ["banking77_heldout"]
    row = pooled["banking77_heldout"]["per-query"]["static"]
    assert row["draws"] == 2
    # (99 + 294) / (100 + 300), not the mean of 0.99 and 0.98
    assert row["paraphrase_precision"] == round(393 / 400, 4)
    assert row["paraphrase_correct_share"] == round(393 / 300, 4)
    assert (row["paraphrase_precision_min"], row["paraphrase_precision_max"]) == (0.98, 0.99)
    assert row["verifications_per_1k"] == 2.0
    assert row["judge_calls_per_1k"] == 10.0


def test_file_stems_of_one_stream_pool_together() -> None:
    stems = [f"banking77_tune_zipf1.0_n10000_seed{s}" for s in range(3)]
    pooled = pool_seeds({s: {"per-query": {"static": _figures(10, 9)}} for s in stems})
    assert pooled["banking77_tune_zipf1.0_n10000"]["per-query"]["static"]["draws"] == 3


@pytest.mark.skipif(not streams.BANKING77.exists(), reason="needs ../shared/data/banking77")
def test_build_names_each_draw_and_draws_differ(tmp_path: Path) -> None:
    built = streams.build(n=200, out_dir=tmp_path, seeds=2)
    assert {"banking77_heldout", "banking77_heldout_seed1", "banking77_tune", "banking77_tune_seed1"} <= set(built)
    assert built["banking77_heldout"].name.endswith("_seed0.jsonl")
    first, second = (built[k].read_text() for k in ("banking77_heldout", "banking77_heldout_seed1"))
    assert first != second
    # the same intents in every draw: a draw reorders the held-out half, it never leaks the other
    intents = [{line.split('"intent": "')[1].split('"')[0] for line in t.splitlines()} for t in (first, second)]
    tune = {line.split('"intent": "')[1].split('"')[0] for line in built["banking77_tune"].read_text().splitlines()}
    assert not (intents[0] | intents[1]) & tune
