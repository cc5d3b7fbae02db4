"""Replay a query stream through the semantic cache and its peers; report precision and hits.

``python -m benchmarks.semantic_stream --stream FILE.jsonl [--limit N] [--peer gptcache]``

The stream is JSONL with ``text`` and ``intent`` per line (other fields ignored). Every system sees
the same queries in the same order with the same vectors (the project's encoder, run once, batched,
cached on disk under ``.cache/vectors`` keyed by the file's hash), so latency is the lookup alone,
after encoding. Systems: ``tierserve`` (static calibrated threshold), ``tierserve-adaptive``, and
with ``--peer gptcache`` the gptcache package (same vectors, its FAISS store) at its default
threshold (0.8, i.e. cosine >= 0.6) and at ours (T = (t + 1) / 2, since its score is 4 - L2^2).
GPTCache's entry limit is raised to the stream length so both sides keep every entry.

The stand-in for the model answers a miss with the query's intent, which is stored. A hit is
correct when the cached answer equals the query's intent. Out-of-scope queries (intent starting
with ``oos``) have no shared answer, so the stand-in answers each of them with a unique string
(``oos...#i``): any hit for one is wrong, and no cache may learn that two unrelated out-of-scope
questions agree. Paraphrase queries are those whose exact text was not seen before.
The last line printed is one JSON object of figures by system.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis

from caches.calibrate import DEFAULT_CALIBRATION, load_threshold
from caches.chat import EncoderIdentity, ModelIdentity, semantic_scope
from caches.encoder import ENCODER_NAME, ENCODER_VERSION
from caches.semantic import SemanticCache

REPO_ROOT = Path(__file__).resolve().parent.parent
VECTOR_CACHE = REPO_ROOT / ".cache" / "vectors"
RESULTS = REPO_ROOT / "benchmarks" / "results"
GPTCACHE_DEFAULT_THRESHOLD = 0.8
ENCODE_BATCH = 128


def load_stream(path: Path, limit: int | None) -> tuple[list[str], list[str]]:
    texts: list[str] = []
    intents: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            if "text" not in row or "intent" not in row:
                continue
            texts.append(str(row["text"]))
            intents.append(str(row["intent"]))
            if limit is not None and len(texts) >= limit:
                break
    return texts, intents


def stream_vectors(path: Path, texts: list[str]) -> np.ndarray:
    """Vectors of the stream's first len(texts) queries, from the disk cache when possible."""
    file_hash = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    stem = f"{file_hash}-{ENCODER_NAME}-{ENCODER_VERSION}"
    VECTOR_CACHE.mkdir(parents=True, exist_ok=True)
    for cached in sorted(VECTOR_CACHE.glob(f"{stem}-*.npy"), key=lambda p: -int(p.stem.rsplit("-", 1)[1])):
        if int(cached.stem.rsplit("-", 1)[1]) >= len(texts):
            return np.load(cached)[: len(texts)]
    from caches.encoder import encode

    started = time.perf_counter()
    vectors = encode(texts, batch_size=ENCODE_BATCH)
    print(f"encoded {len(texts)} queries in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    np.save(VECTOR_CACHE / f"{stem}-{len(texts)}.npy", vectors)
    return vectors


def stand_in_answer(intent: str, i: int) -> str:
    return f"{intent}#{i}" if intent.startswith("oos") else intent


class System:
    """lookup(i) -> answer or None; store(i, answer)."""

    name: str
    lookup: Callable[[int], str | None]
    store: Callable[[int, str], None]
    entries: Callable[[], int]


def tierserve_system(name: str, client: redis.Redis, mode: str, threshold: float, texts, vectors) -> System:
    cache = SemanticCache(client, threshold=threshold, mode=mode, max_entries=max(len(texts), 1), ttl_s=None)
    scope = semantic_scope(tenant="bench", model=ModelIdentity(name="stand-in", fingerprint="0" * 64), version="1",
                           context={}, encoder=EncoderIdentity(name=ENCODER_NAME, version=ENCODER_VERSION))
    system = System()
    system.name = name

    def lookup(i: int) -> str | None:
        hit = cache.lookup(scope, texts[i], vectors[i])
        return hit.response if hit else None

    system.lookup = lookup
    system.store = lambda i, answer: cache.store(scope, texts[i], vectors[i], answer) and None
    system.entries = lambda: int(client.zcard(f"{scope}:lfu"))
    return system


def gptcache_system(name: str, threshold: float, texts, vectors, workdir: Path) -> System:
    from gptcache import Cache, Config
    from gptcache.adapter.api import get, put
    from gptcache.manager import manager_factory
    from gptcache.processor.pre import get_prompt
    from gptcache.similarity_evaluation import SearchDistanceEvaluation

    current: dict[str, np.ndarray] = {}
    data_manager = manager_factory(
        "sqlite,faiss",
        data_dir=str(workdir),
        vector_params={"dimension": vectors.shape[1]},
        # the limit that counts for sqlite,faiss is the eviction manager's (default 1,000 entries;
        # manager_factory's own max_size is ignored for this store)
        eviction_params={"max_size": max(len(texts), 1) + 1},
    )
    cache = Cache()
    cache.init(
        pre_embedding_func=get_prompt,
        embedding_func=lambda text, **_: current["v"],  # the shared vector: no second encoder
        data_manager=data_manager,
        similarity_evaluation=SearchDistanceEvaluation(),
        config=Config(similarity_threshold=threshold, disable_report=True),
    )
    system = System()
    system.name = name

    def lookup(i: int) -> str | None:
        current["v"] = vectors[i]
        return get(texts[i], cache_obj=cache)

    def store(i: int, answer: str) -> None:
        current["v"] = vectors[i]
        put(texts[i], answer, cache_obj=cache)

    system.lookup = lookup
    system.store = store
    system.entries = lambda: int(data_manager.v.count())
    return system


def replay(system: System, texts: list[str], intents: list[str]) -> dict[str, Any]:
    seen_texts: set[str] = set()
    seen_intents: set[str] = set()
    hits = correct = oracle = para = para_hits = para_correct = 0
    latencies = np.zeros(len(texts))
    for i, (text, intent) in enumerate(zip(texts, intents, strict=True)):
        is_para = text not in seen_texts
        oos = intent.startswith("oos")
        oracle += (intent in seen_intents) and not oos
        started = time.perf_counter()
        answer = system.lookup(i)
        latencies[i] = time.perf_counter() - started
        if answer is not None:
            ok = answer == intent and not oos
            hits += 1
            correct += ok
            if is_para:
                para_hits += 1
                para_correct += ok
        else:
            system.store(i, stand_in_answer(intent, i))
        para += is_para
        seen_texts.add(text)
        seen_intents.add(intent)
    n = max(len(texts), 1)
    return {
        "queries": len(texts),
        "hits": hits,
        "correct_hits": correct,
        "wrong_hits": hits - correct,
        "hit_rate": round(hits / n, 4),
        "precision": round(correct / hits, 4) if hits else None,
        "error_rate": round((hits - correct) / n, 4),
        "oracle_hit_rate": round(oracle / n, 4),
        "paraphrase_queries": para,
        "paraphrase_hits": para_hits,
        "paraphrase_correct_hits": para_correct,
        "paraphrase_hit_rate": round(para_hits / para, 4) if para else None,
        "paraphrase_precision": round(para_correct / para_hits, 4) if para_hits else None,
        "p50_lookup_ms": round(float(np.percentile(latencies, 50)) * 1000, 3) if len(texts) else None,
        "p99_lookup_ms": round(float(np.percentile(latencies, 99)) * 1000, 3) if len(texts) else None,
        "entries": system.entries(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Replay a query stream through the semantic caches.")
    parser.add_argument("--stream", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--peer", action="append", choices=["gptcache"], default=[])
    parser.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION)
    parser.add_argument("--threshold", type=float, default=None, help="override the calibrated threshold")
    parser.add_argument("--systems", default="tierserve,tierserve-adaptive", help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=RESULTS / "semantic_stream.json")
    args = parser.parse_args(argv)

    threshold = args.threshold if args.threshold is not None else load_threshold(args.calibration)
    texts, intents = load_stream(args.stream, args.limit)
    if not texts:
        parser.error(f"{args.stream}: no lines with text and intent")
    vectors = stream_vectors(args.stream, texts)

    server = None
    url = os.environ.get("REDIS_URL")
    if not url:
        from caches.redis_server import EmbeddedRedis

        server = EmbeddedRedis().start()
        url = server.url
    client = redis.Redis.from_url(url)
    wanted = set(args.systems.split(","))
    results: dict[str, Any] = {}
    try:
        plans: list[tuple[str, Callable[[], System]]] = []
        if "tierserve" in wanted:
            plans.append(
                (
                    "tierserve",
                    lambda: tierserve_system("tierserve", client, "static", threshold, texts, vectors),
                )
            )
        if "tierserve-adaptive" in wanted:
            plans.append(
                (
                    "tierserve-adaptive",
                    lambda: tierserve_system(
                        "tierserve-adaptive", client, "adaptive", threshold, texts, vectors
                    ),
                )
            )
        tmp = Path(tempfile.mkdtemp(prefix="gptcache-bench-"))
        if "gptcache" in args.peer:
            ours = (threshold + 1) / 2
            plans.append(
                ("gptcache-ours", lambda: gptcache_system("gptcache-ours", ours, texts, vectors, tmp / "o"))
            )
            plans.append(
                (
                    "gptcache-default",
                    lambda: gptcache_system(
                        "gptcache-default", GPTCACHE_DEFAULT_THRESHOLD, texts, vectors, tmp / "d"
                    ),
                )
            )
        for name, make in plans:
            client.flushdb()
            started = time.perf_counter()
            figures = replay(make(), texts, intents)
            figures["wall_s"] = round(time.perf_counter() - started, 1)
            results[name] = figures
            print(
                f"{name:20s} hit {figures['hit_rate']:.3f} prec {figures['precision']} "
                f"para_hit {figures['paraphrase_hit_rate']} para_prec {figures['paraphrase_precision']} "
                f"para_correct {figures['paraphrase_correct_hits']} p50 {figures['p50_lookup_ms']}ms "
                f"p99 {figures['p99_lookup_ms']}ms entries {figures['entries']}",
                flush=True,
            )
    finally:
        client.flushdb()
        client.close()
        if server:
            server.stop()
    meta = {
        "stream": str(args.stream),
        "queries": len(texts),
        "threshold": threshold,
        "gptcache_threshold_ours": round((threshold + 1) / 2, 6),
        "encoder": f"{ENCODER_NAME}/{ENCODER_VERSION}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "systems": results}, indent=2) + "\n")
    print(json.dumps(results, separators=(",", ":")))
    return results


if __name__ == "__main__":
    main()
