"""A fixed split of a labelled stream's intents into a tuning half and a held-out half.

Anything tuned on a stream (thresholds, policies) is tuned on the ``tune`` half's queries and
reported on the ``held_out`` half's, so no reported figure comes from data it was fitted to. The
split is by intent, not by query: a held-out paraphrase of a tuned intent would still leak the
intent's neighbourhood into the figures. Sorted, then shuffled with a fixed seed: the same split on
every machine and every run. The split is :func:`benchmarks.streams.split_intents`'s (the one the
semantic rules were tuned with), applied to any labelled stream.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from benchmarks.streams import SPLIT_SEED
from benchmarks.streams import split_intents as split_sorted


def read_stream(path: Path) -> Iterator[tuple[str, str]]:
    """(text, intent) per JSONL line with both fields; other lines are skipped."""
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            if isinstance(row.get("text"), str) and isinstance(row.get("intent"), str):
                yield row["text"], row["intent"]


def split_intents(intents: set[str] | list[str], seed: int = SPLIT_SEED) -> tuple[set[str], set[str]]:
    """(tune, held_out): two halves of the intents, fixed by the seed."""
    tune, held_out = split_sorted(sorted(set(intents)), seed)
    return set(tune), set(held_out)


def held_out_queries(path: Path, seed: int = SPLIT_SEED) -> list[tuple[str, str]]:
    """The stream's queries whose intent is in the held-out half, in stream order."""
    rows = list(read_stream(path))
    _, held_out = split_intents({intent for _, intent in rows}, seed)
    return [(text, intent) for text, intent in rows if intent in held_out]
