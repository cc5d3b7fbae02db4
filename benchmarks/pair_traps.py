"""Which labelled traps the static rule merges, by category, with and without the trap guard.

``python -m benchmarks.pair_traps [--pairs CSV] [--stream JSONL] [--out JSON]``

Two views of one pairs file (``text_a,text_b,label`` and a ``category`` column; default
``../shared/data/fow_cache/pairs.csv``), with the project's encoder and the calibrated threshold:

- **pairwise**: each pair alone, ``text_a`` stored and ``text_b`` asked, through the rule's own
  code (:class:`caches.semantic.decision.StaticPolicy`): how many label-0 pairs it would merge and
  how many label-1 pairs it does merge, per category;
- **in stream**: the pairs' stream (:func:`benchmarks.streams.pairs_stream`) replayed through the
  real cache (static guarded and unguarded, and verified; per-query answers, so each hit names the query whose
  answer it served). Each wrong hit is attributed to the labelled trap pair it crosses, or to
  ``unlabelled`` when the two texts were never paired: those are wrong by the stream's groups (the
  union of label-1 pairs) but the pairs file says nothing about them, so some may be right.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import redis

from benchmarks.semantic_stream import load_stream, replay, stream_vectors, tierserve_system
from benchmarks.stream_judges import OracleJudge
from benchmarks.streams import FOW_CACHE, OUT_DIR
from caches.calibrate import load_threshold
from caches.encoder import encode
from caches.semantic.decision import Candidate, StaticPolicy
from caches.semantic.guard import trap_guard

RESULTS = Path(__file__).resolve().parent / "results"


def read_categorised(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return [row for row in csv.DictReader(fh) if row["text_a"].strip() and row["text_b"].strip()]


def pairwise(rows: list[dict[str, str]], threshold: float) -> dict[str, Any]:
    """Merged pairs by (label, category), guarded and unguarded, each pair in isolation."""
    va = encode([r["text_a"] for r in rows])
    vb = encode([r["text_b"] for r in rows])
    rules = {"guarded": StaticPolicy(threshold, guard=trap_guard), "unguarded": StaticPolicy(threshold)}
    out: dict[str, Any] = {"pairs": Counter(), **{name: Counter() for name in rules}}
    reasons: Counter[str] = Counter()  # why the guard refused the traps the similarity alone would merge
    for i, row in enumerate(rows):
        key = f"{row['label']}/{row['category']}"
        out["pairs"][key] += 1
        similarity = float(np.dot(va[i], vb[i]))
        for name, rule in rules.items():
            candidate = Candidate(entry_id=1, similarity=similarity, query=row["text_a"], response="")
            out[name][key] += rule.decide([candidate], row["text_b"], threshold).hit is not None
        if row["label"] == "0" and similarity >= threshold:
            reasons[f"{row['category']}/{trap_guard(row['text_b'], row['text_a']) or 'passed'}"] += 1
    return {k: dict(sorted(v.items())) for k, v in out.items()} | {"guard_reasons": dict(sorted(reasons.items()))}


def in_stream(rows: list[dict[str, str]], stream: Path, threshold: float, client: redis.Redis) -> dict[str, Any]:
    """Wrong hits of the stream replay, attributed to the trap pair they cross."""
    texts, intents = load_stream(stream, None)
    vectors = stream_vectors(stream, texts)
    category = {frozenset((r["text_a"], r["text_b"])): r["category"] for r in rows if r["label"] == "0"}
    out: dict[str, Any] = {}
    # as benchmarks.semantic_stream runs them (its default explore rate and error budget)
    for name, mode, guard in (("static", "static", True), ("static-unguarded", "static", False),
                              ("verified", "verified", True)):
        client.flushdb()
        system = tierserve_system(name, client, mode, threshold, texts, vectors, explore_rate=0.05,
                                  error_budget=0.01, judge=OracleJudge(), guard=guard)
        served: list[tuple[int, str]] = []
        lookup = system.lookup

        def recording(i: int, lookup=lookup, served=served) -> tuple[str, str | None]:
            status, answer = lookup(i)
            if status == "hit" and answer is not None:
                served.append((i, answer))
            return status, answer

        system.lookup = recording
        figures = replay(system, texts, intents, "per-query")
        system.cache.close()  # type: ignore[attr-defined]
        wrong: Counter[str] = Counter()
        unlabelled: list[list[str]] = []
        for i, answer in served:
            group, source = answer.split("#", 1)
            if group == intents[i]:
                continue
            pair = frozenset((texts[int(source)], texts[i]))
            wrong[category.get(pair, "unlabelled")] += 1
            if pair not in category:
                unlabelled.append([texts[int(source)], texts[i]])
        out[name] = {"hits": figures["hits"], "wrong_hits": figures["wrong_hits"],
                     "wrong_by_trap_category": dict(sorted(wrong.items())), "unlabelled_wrong": unlabelled}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Traps the static rule merges, by category.")
    parser.add_argument("--pairs", type=Path, default=FOW_CACHE)
    parser.add_argument("--stream", type=Path, default=OUT_DIR / "fow_cache_pairs.jsonl",
                        help="the pairs' stream (python -m benchmarks.streams writes it)")
    parser.add_argument("--threshold", type=float, default=None, help="default: the calibrated threshold")
    parser.add_argument("--out", type=Path, default=RESULTS / "pair_traps_fow_cache.json")
    args = parser.parse_args(argv)
    threshold = args.threshold if args.threshold is not None else load_threshold()
    rows = read_categorised(args.pairs)
    from caches.redis_server import EmbeddedRedis

    server = EmbeddedRedis().start()
    client = redis.Redis.from_url(server.url)
    try:
        # repo-relative paths in the committed result: the same run from any checkout reads the same
        where = {k: os.path.relpath(v, Path(__file__).resolve().parent.parent) for k, v in
                 (("pairs", args.pairs), ("stream", args.stream))}
        result = {**where, "threshold": threshold,
                  "pairwise": pairwise(rows, threshold), "in_stream": in_stream(rows, args.stream, threshold, client)}
    finally:
        client.close()
        server.stop()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "in_stream"}, indent=1))
    for name, figures in result["in_stream"].items():
        print(name, {k: v for k, v in figures.items() if k != "unlabelled_wrong"})
    return result


if __name__ == "__main__":
    main()
