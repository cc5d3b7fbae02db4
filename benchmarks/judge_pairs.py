"""Pair selection for the judge calibration (benchmarks/judge_calibration.py, step 1): labelled
question pairs from a CSV, split into a tuning and a held-out half that share no intent or text."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def _text_groups(a: Sequence[str], b: Sequence[str]) -> list[int]:
    """Connected components of pairs linked by a shared question text (union-find)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a, b, strict=True):
        parent[find(x)] = find(y)
    roots: dict[str, int] = {}
    return [roots.setdefault(find(x), len(roots)) for x in a]


def select_pairs(path: str | Path, per_source: int, seed: int) -> pd.DataFrame:
    """``per_source`` pairs (half each label, as far as the file allows) with a ``half`` column:
    "tune" or "heldout", sharing no intent (when the file has intents) or no question text."""
    df = pd.read_csv(path)
    missing = {"text_a", "text_b", "label"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    df = df[df["label"].astype(str).isin(["0", "1"])].copy()
    df["label"] = df["label"].astype(int)
    df["text_a"], df["text_b"] = df["text_a"].astype(str), df["text_b"].astype(str)
    rng = np.random.default_rng(seed)
    if {"intent_a", "intent_b"} <= set(df.columns):
        intents = sorted(set(df["intent_a"].astype(str)) | set(df["intent_b"].astype(str)))
        rng.shuffle(intents)
        tune_intents = set(intents[: len(intents) // 2])
        in_a = df["intent_a"].astype(str).isin(tune_intents)
        in_b = df["intent_b"].astype(str).isin(tune_intents)
        df = df[in_a == in_b].copy()  # a pair straddling the halves would leak an intent
        df["half"] = np.where(in_a[in_a == in_b], "tune", "heldout")
        split_by = "intent"
    else:
        groups = np.asarray(_text_groups(list(df["text_a"]), list(df["text_b"])))
        order = rng.permutation(groups.max() + 1)
        tune_groups = set(order[: len(order) // 2].tolist())
        df["half"] = np.where([g in tune_groups for g in groups], "tune", "heldout")
        split_by = "question-text group"
    picked = []
    for (_half, _label), part in df.groupby(["half", "label"], sort=True):
        n = min(len(part), per_source // 4)
        picked.append(part.iloc[rng.permutation(len(part))[:n]])
    out = pd.concat(picked).reset_index(drop=True)
    out["source"] = Path(path).parent.name or Path(path).stem
    out["split_by"] = split_by
    # Interleave so that an interrupted generation still leaves a balanced sample of whole pairs.
    return out.iloc[rng.permutation(len(out))].reset_index(drop=True)
