"""Query streams for held-out evaluation of the semantic cache, built like ``../shared/data/streams``.

``python -m benchmarks.streams`` writes (under ``.cache/streams``, not committed: derived data):

- ``banking77_tune``: half of banking77's intents (fixed seed), for tuning the decision rules;
- ``banking77_heldout``: the other half, never looked at while tuning: the figures that count.

Each stream draws intents Zipf(s) over a seeded ranking and, per intent, utterances without
repeats until its pool runs out (then the pool is reshuffled and drawn again), as the shared
stream does; one JSON object a line: ``{"t", "text", "intent"}``. Another labelled set can be
added as a CSV with ``text`` and ``intent`` columns (``--extra NAME=PATH``).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BANKING77 = REPO_ROOT.parent / "shared" / "data" / "banking77" / "utterances.csv"
OUT_DIR = REPO_ROOT / ".cache" / "streams"
SPLIT_SEED = 12  # which intents are tuned on and which are held out: fixed, never re-drawn
STREAM_SEED = 0
ZIPF_S = 1.0
STREAM_LEN = 10_000


def read_labelled(path: Path) -> dict[str, list[str]]:
    """Utterances by intent from a CSV with ``text`` and ``intent`` columns (duplicates dropped)."""
    pools: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    with path.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            text, intent = (row.get("text") or "").strip(), (row.get("intent") or "").strip()
            if text and intent and text not in seen:
                seen.add(text)
                pools[intent].append(text)
    return dict(pools)


def split_intents(intents: list[str], seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """(tune, held out): the sorted intents shuffled with a fixed seed and cut in half."""
    order = sorted(intents)
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    return sorted(order[:half]), sorted(order[half:])


def zipf_stream(pools: dict[str, list[str]], n: int, s: float = ZIPF_S, seed: int = STREAM_SEED) -> list[dict]:
    """``n`` queries: intents Zipf(s) over a seeded ranking, utterances without repeats per pool
    until it runs out."""
    rng = random.Random(seed)
    ranked = sorted(pools)
    rng.shuffle(ranked)
    weights = [1.0 / (rank + 1) ** s for rank in range(len(ranked))]
    queues: dict[str, list[str]] = {}
    rows: list[dict] = []
    for t in range(n):
        intent = rng.choices(ranked, weights)[0]
        if not queues.get(intent):
            queues[intent] = rng.sample(pools[intent], len(pools[intent]))
        rows.append({"t": t, "text": queues[intent].pop(), "intent": intent})
    return rows


def write_stream(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def build(n: int = STREAM_LEN, extra: dict[str, Path] | None = None, out_dir: Path = OUT_DIR) -> dict[str, Path]:
    """The held-out streams by name (rebuilt only when missing: same seeds, same files)."""
    out: dict[str, Path] = {}
    if BANKING77.exists():
        pools = read_labelled(BANKING77)
        tune, held = split_intents(list(pools))
        for name, intents in (("banking77_tune", tune), ("banking77_heldout", held)):
            path = out_dir / f"{name}_zipf{ZIPF_S}_n{n}_seed{STREAM_SEED}.jsonl"
            if not path.exists():
                write_stream(zipf_stream({i: pools[i] for i in intents}, n), path)
            out[name] = path
    for name, source in (extra or {}).items():
        path = out_dir / f"{name}_zipf{ZIPF_S}_n{n}_seed{STREAM_SEED}.jsonl"
        if not path.exists():
            write_stream(zipf_stream(read_labelled(source), n), path)
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the held-out query streams.")
    parser.add_argument("-n", type=int, default=STREAM_LEN)
    parser.add_argument("--extra", action="append", default=[], help="NAME=CSV with text,intent columns")
    args = parser.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.extra)
    for name, path in build(args.n, {k: Path(v) for k, v in extra.items()}).items():
        print(name, path)


if __name__ == "__main__":
    main()
