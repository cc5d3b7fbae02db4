"""Several draws of one query stream, pooled (benchmarks/semantic_stream.py ``--stream-seeds``)."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

# A stream's draws: "banking77_heldout", "banking77_heldout_seed1", ... (benchmarks.streams.build's
# names) or "..._n10000_seed0", "..._n10000_seed1", ... (file stems given with --stream).
_SEED = re.compile(r"^(?P<family>.+?)(_seed\d+)?$")
# Counts that add up across draws of one stream; the rates are recomputed from the sums.
_POOLED_COUNTS = ("queries", "hits", "correct_hits", "wrong_hits", "unjudged_hits", "paraphrase_queries",
                  "paraphrase_hits", "paraphrase_correct_hits", "verifications")


def pool_seeds(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Figures of the draws of one stream (stems ``FAMILY_seedS``, two or more) summed per answer
    mode and system: one draw's precision rests on a few dozen wrong hits, mostly a handful of
    popular query pairs repeated, so a single draw can sit 0.005 either side of the pooled figure.
    The pooled row is the one to read; each draw's precision range is kept beside it."""
    families: dict[str, list[str]] = defaultdict(list)
    for stem in results:
        m = _SEED.match(stem)
        assert m is not None  # the pattern matches every non-empty name
        families[m["family"]].append(stem)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for family, stems in families.items():
        if len(stems) < 2:
            continue
        modes: dict[str, dict[str, Any]] = {}
        for answers in results[stems[0]]:
            for system in results[stems[0]][answers]:
                draws = [results[st][answers][system] for st in stems if system in results[st].get(answers, {})]
                total = {k: sum(d[k] for d in draws) for k in _POOLED_COUNTS}
                judge_calls = sum(d["judge_calls_per_1k"] * d["queries"] / 1000 for d in draws)
                precisions = [d["paraphrase_precision"] for d in draws if d["paraphrase_precision"] is not None]
                judged_hits = total["hits"] - total["unjudged_hits"]
                modes.setdefault(answers, {})[system] = {
                    "draws": len(draws), **total,
                    "precision": round(total["correct_hits"] / judged_hits, 4) if judged_hits else None,
                    # Zipf streams have no unjudged hits (every query has a label): correct / hits.
                    "paraphrase_precision": round(total["paraphrase_correct_hits"] / total["paraphrase_hits"], 4)
                    if total["paraphrase_hits"] and not total["unjudged_hits"] else None,
                    "paraphrase_correct_share": round(total["paraphrase_correct_hits"] / total["paraphrase_queries"], 4)
                    if total["paraphrase_queries"] else None,
                    "paraphrase_precision_min": min(precisions, default=None),
                    "paraphrase_precision_max": max(precisions, default=None),
                    "verifications_per_1k": round(1000 * total["verifications"] / max(total["queries"], 1), 2),
                    "judge_calls_per_1k": round(1000 * judge_calls / max(total["queries"], 1), 1),
                }
        out[family] = modes
    return out
