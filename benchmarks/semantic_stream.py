"""Replay query streams through the semantic cache and its peers; report precision and hits.

``python -m benchmarks.semantic_stream [--stream FILE.jsonl ...] [--answers per-query,label] [--limit N]``

With no ``--stream``, the streams of :mod:`benchmarks.streams`: banking77's intents halved
(``banking77_tune`` tuned the verified rule, ``banking77_heldout`` did not) and ``fow_cache_pairs``
(labelled question pairs, traps included), each printed and recorded (``meta.roles``) with what it
was not held out from: the static threshold was calibrated on pairs from banking77 and fow_cache.
A stream is JSONL with ``text`` and ``intent`` per line (other fields ignored). Every system sees
the same queries in the same order with the same vectors (the project's encoder, run once, cached
under ``.cache/vectors`` keyed by the file's hash), so latency is the lookup alone. Systems:
``static`` (the calibrated threshold and the trap guard; the app's default ``semantic_mode``),
``verified`` (:class:`caches.semantic.decision.VerifiedPolicy`), and the gptcache package
(same vectors, its FAISS store) at ours (T = (t + 1) / 2, since its score is 4 - L2^2) and at its
default threshold (0.8, i.e. cosine >= 0.6). GPTCache's entry limit is raised to the stream length.

Answers (``--answers``): the stand-in model answers a miss, which is stored.

- ``per-query`` (the mode that counts): every answer is its own text (``{intent}#{i}``), as a
  model's answers to two paraphrases would be. Nothing can lean on answer text identity.
- ``label`` (comparison only): all queries of an intent get the identical answer text.

A hit is correct when the cached answer was given to a query of the same intent; out-of-scope
queries (intent starting with ``oos``) have no shared answer, so any hit for one is wrong.
Correctness comes from the stream's labels, which the cache never sees: the verified rule learns
through an answer judge, here an oracle on the labels (:class:`OracleJudge`), each call counted.
A verification (the rule sends a would-be hit to the model to check it) is a model call: it is
counted (``verifications_per_1k``), its answer served and stored, and it is no hit.
Paraphrase queries are those whose exact text was not seen before; ``paraphrase_correct_share``
is correct paraphrase hits over paraphrase queries. The last line printed is one JSON object.
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

from benchmarks.stream_judges import MeasuredJudge, OracleJudge, intent_of, stand_in_answer
from benchmarks.stream_pool import pool_seeds
from benchmarks.streams import build, role_of
from caches.calibrate import DEFAULT_CALIBRATION, load_threshold
from caches.chat import EncoderIdentity, ModelIdentity, semantic_scope
from caches.encoder import ENCODER_NAME, ENCODER_VERSION
from caches.semantic import SemanticCache

REPO_ROOT = Path(__file__).resolve().parent.parent
VECTOR_CACHE = REPO_ROOT / ".cache" / "vectors"
RESULTS = REPO_ROOT / "benchmarks" / "results"
GPTCACHE_DEFAULT_THRESHOLD = 0.8
ENCODE_BATCH = 128
WRONG_EXAMPLES = 25  # wrong hits kept in the JSON, to read by hand


def read_stream(path: Path, limit: int | None) -> tuple[list[str], list[str], list[frozenset[str]] | None]:
    """Texts, intents and, for streams built from labelled pairs, per query the answer groups its
    labels say differ from it (``differs_from``; None for a stream without them, an intent stream,
    where any other intent is wrong). Rows without ``text`` and ``intent`` are skipped."""
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if limit is not None and len(rows) >= limit:
                break
            row = json.loads(line) if line.strip() else {}
            if "text" in row and "intent" in row:
                rows.append(row)
    judged = None
    if rows and all("differs_from" in row for row in rows):
        judged = [frozenset(map(str, row["differs_from"])) for row in rows]
    return [str(row["text"]) for row in rows], [str(row["intent"]) for row in rows], judged


def load_stream(path: Path, limit: int | None) -> tuple[list[str], list[str]]:
    texts, intents, _ = read_stream(path, limit)
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


class System:
    """lookup(i) -> (status, answer or None): status hit, verify (the model is called for a
    would-be hit) or miss; store(i, answer)."""

    name: str
    lookup: Callable[[int], tuple[str, str | None]]
    store: Callable[[int, str], None]
    entries: Callable[[], int]
    judge_calls: Callable[[], int] = staticmethod(lambda: 0)  # type: ignore[assignment]


def tierserve_system(
    name: str, client: redis.Redis, mode: str, threshold: float, texts, vectors, *, explore_rate: float,
    error_budget: float, seed: int = 0, judge: OracleJudge | None = None, guard: bool = True,
) -> System:
    judge = judge if judge is not None else OracleJudge()
    cache = SemanticCache(client, threshold=threshold, mode=mode, max_entries=max(len(texts), 1), ttl_s=None,
                          judge=judge, explore_rate=explore_rate, error_budget=error_budget, seed=seed, guard=guard)
    scope = semantic_scope(tenant="bench", model=ModelIdentity(name="stand-in", fingerprint="0" * 64), version="1",
                           context={}, encoder=EncoderIdentity(name=ENCODER_NAME, version=ENCODER_VERSION))
    system = System()
    system.name = name

    def lookup(i: int) -> tuple[str, str | None]:
        found = cache.find(scope, texts[i], vectors[i])
        return found.status, found.hit.response if found.hit is not None and found.status == "hit" else None

    system.lookup = lookup
    system.store = lambda i, answer: cache.store(scope, texts[i], vectors[i], answer) and None
    system.entries = lambda: int(client.zcard(f"{scope}:lfu"))
    system.judge_calls = lambda: judge.calls
    system.cache = cache  # type: ignore[attr-defined]
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

    def lookup(i: int) -> tuple[str, str | None]:
        current["v"] = vectors[i]
        answer = get(texts[i], cache_obj=cache)
        return ("hit", answer) if answer is not None else ("miss", None)

    def store(i: int, answer: str) -> None:
        current["v"] = vectors[i]
        put(texts[i], answer, cache_obj=cache)

    system.lookup = lookup
    system.store = store
    system.entries = lambda: int(data_manager.v.count())
    return system


def replay(system: System, texts: list[str], intents: list[str], answers: str,
           judged: list[frozenset[str]] | None = None) -> dict[str, Any]:
    """``judged`` (pair streams): a hit counts as wrong only across groups the labels say differ;
    other cross-group hits are ``unjudged`` and left out of precision (still hits: no model call)."""
    seen_texts: set[str] = set()
    seen_intents: set[str] = set()
    hits = correct = oracle = para = para_hits = para_correct = verifications = 0
    unjudged = para_unjudged = 0
    latencies = np.zeros(len(texts))
    wrong: list[dict[str, str]] = []  # what the wrong hits were: label noise, or the rule's error?
    for i, (text, intent) in enumerate(zip(texts, intents, strict=True)):
        is_para = text not in seen_texts
        oos = intent.startswith("oos")
        oracle += (intent in seen_intents) and not oos
        started = time.perf_counter()
        status, answer = system.lookup(i)
        latencies[i] = time.perf_counter() - started
        if status == "hit" and answer is not None:
            ok = intent_of(answer) == intent and not oos
            hits += 1
            correct += ok
            if is_para:
                para_hits += 1
                para_correct += ok
            if not ok and judged is not None and intent_of(answer) not in judged[i]:
                unjudged += 1
                para_unjudged += is_para
            elif not ok and "#" in answer and len(wrong) < WRONG_EXAMPLES:  # per-query answers name their query
                source = int(answer.split("#", 1)[1])
                wrong.append({"query": text, "intent": intent, "served_for": texts[source],
                              "served_intent": intents[source]})
        else:
            # a miss, or a verification: the model answers (its answer is served) and is stored
            verifications += status == "verify"
            system.store(i, stand_in_answer(intent, i, answers))
        para += is_para
        seen_texts.add(text)
        seen_intents.add(intent)
    n = max(len(texts), 1)
    return {
        "answers": answers,
        "queries": len(texts),
        "hits": hits,
        "correct_hits": correct,
        "wrong_hits": hits - correct - unjudged,
        "unjudged_hits": unjudged,
        "hit_rate": round(hits / n, 4),
        "precision": round(correct / (hits - unjudged), 4) if hits - unjudged else None,
        "error_rate": round((hits - correct - unjudged) / n, 4),
        "oracle_hit_rate": round(oracle / n, 4),
        "paraphrase_queries": para,
        "paraphrase_hits": para_hits,
        "paraphrase_correct_hits": para_correct,
        "paraphrase_hit_rate": round(para_hits / para, 4) if para else None,
        "paraphrase_precision": round(para_correct / (para_hits - para_unjudged), 4) if para_hits - para_unjudged else None,
        "paraphrase_correct_share": round(para_correct / para, 4) if para else None,
        "verifications": verifications,
        "verifications_per_1k": round(1000 * verifications / n, 2),
        "model_calls_per_1k": round(1000 * (n - hits) / n, 1),
        "judge_calls_per_1k": round(1000 * system.judge_calls() / n, 1),
        "p50_lookup_ms": round(float(np.percentile(latencies, 50)) * 1000, 3) if len(texts) else None,
        "p99_lookup_ms": round(float(np.percentile(latencies, 99)) * 1000, 3) if len(texts) else None,
        "entries": system.entries(),
        "wrong_hit_examples": wrong,
    }


def run_stream(
    path: Path, args: argparse.Namespace, threshold: float, client: redis.Redis, tmp: Path
) -> dict[str, dict[str, Any]]:
    """Figures by answer mode and system for one stream."""
    texts, intents, judged = read_stream(path, args.limit)
    if not texts:
        raise SystemExit(f"{path}: no lines with text and intent")
    print(f"== {path.stem}: {role_of(path)}", flush=True)
    vectors = stream_vectors(path, texts)
    wanted = set(args.systems.split(","))
    out: dict[str, dict[str, Any]] = {}
    for answers in args.answers.split(","):
        plans: list[tuple[str, Callable[[], System]]] = []
        if "static" in wanted:
            plans.append(("static", lambda: tierserve_system(
                "static", client, "static", threshold, texts, vectors, explore_rate=0.0,
                error_budget=args.error_budget)))
        if "static-unguarded" in wanted:  # what the trap guard costs (and buys) on this stream
            plans.append(("static-unguarded", lambda: tierserve_system(
                "static-unguarded", client, "static", threshold, texts, vectors, explore_rate=0.0,
                error_budget=args.error_budget, guard=False)))
        if "verified" in wanted:
            plans.append(("verified", lambda: tierserve_system(
                "verified", client, "verified", threshold, texts, vectors, explore_rate=args.explore_rate,
                error_budget=args.error_budget)))
        if "verified-app-judge" in wanted:
            plans.append(("verified-app-judge", lambda: tierserve_system(
                "verified-app-judge", client, "verified", threshold, texts, vectors,
                explore_rate=args.explore_rate, error_budget=args.error_budget, judge=MeasuredJudge())))
        for recall, fpr in args.judge_quality:  # a judge of this quality in the verified rule
            plans.append((f"verified-judge-r{recall:g}-fpr{fpr:g}", lambda q=(recall, fpr): tierserve_system(
                f"verified-judge-r{q[0]:g}-fpr{q[1]:g}", client, "verified", threshold, texts, vectors,
                explore_rate=args.explore_rate, error_budget=args.error_budget, judge=MeasuredJudge(quality=q))))
        if "gptcache" in wanted:
            work = tmp / f"{path.stem}-{answers}"
            plans.append(("gptcache-ours", lambda w=work: gptcache_system(
                "gptcache-ours", (threshold + 1) / 2, texts, vectors, w / "o")))
            plans.append(("gptcache-default", lambda w=work: gptcache_system(
                "gptcache-default", GPTCACHE_DEFAULT_THRESHOLD, texts, vectors, w / "d")))
        results: dict[str, Any] = {}
        for name, make in plans:
            client.flushdb()
            started = time.perf_counter()
            system = make()
            figures = replay(system, texts, intents, answers, judged)
            figures["wall_s"] = round(time.perf_counter() - started, 1)
            cache = getattr(system, "cache", None)
            if cache is not None:
                cache.close()
                floors = [v.get("floor") for v in cache.stats()["scopes"].values()]
                figures["final_floor"] = floors[0] if floors else None
            results[name] = figures
            print(
                f"{path.stem[:28]:28s} {answers:9s} {name:16s} hit {figures['hit_rate']:.3f} "
                f"prec {figures['precision']} para_prec {figures['paraphrase_precision']} "
                f"para_correct_share {figures['paraphrase_correct_share']} unjudged {figures['unjudged_hits']} "
                f"verif/1k {figures['verifications_per_1k']} judge/1k {figures['judge_calls_per_1k']} "
                f"p50 {figures['p50_lookup_ms']}ms entries {figures['entries']}",
                flush=True,
            )
        out[answers] = results
    return out


def _judge_quality(text: str) -> tuple[float, float]:
    recall, fpr = (float(x) for x in text.split(","))
    if not (0.0 <= recall <= 1.0 and 0.0 <= fpr <= 1.0):
        raise argparse.ArgumentTypeError("RECALL,FPR: two rates between 0 and 1")
    return recall, fpr


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Replay query streams through the semantic caches.")
    parser.add_argument("--stream", type=Path, action="append", default=[],
                        help="JSONL stream (repeatable); default: the streams of benchmarks.streams "
                             "(banking77 tune and held-out halves, fow_cache pairs)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--stream-seeds", type=int, default=1,
                        help="with the default streams: draws of each banking77 stream (seeds 0..N-1), "
                             "each reported, then pooled (one draw's precision moves by about +-0.005)")
    parser.add_argument("--answers", default="per-query,label",
                        help="per-query (each answer its own text: the mode that counts), label (one answer "
                             "text per intent, for comparison), or both, comma-separated")
    parser.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION)
    parser.add_argument("--threshold", type=float, default=None, help="override the calibrated threshold")
    parser.add_argument("--systems", default="static,verified,gptcache", help="comma-separated subset of static, "
                        "static-unguarded (the trap guard off), verified, "
                        "verified-app-judge (the verified rule with the app's judge as measured), gptcache")
    parser.add_argument("--judge-quality", action="append", default=[], type=_judge_quality, metavar="RECALL,FPR",
                        help="also run the verified rule with a judge of this recall and false-positive rate "
                             "(repeatable): what judge would the rule need?")
    parser.add_argument("--explore-rate", type=float, default=0.05)
    parser.add_argument("--error-budget", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=RESULTS / "semantic_stream.json")
    args = parser.parse_args(argv)
    for mode in args.answers.split(","):
        if mode not in ("per-query", "label"):
            parser.error(f"--answers: unknown mode {mode!r}")

    threshold = args.threshold if args.threshold is not None else load_threshold(args.calibration)
    streams = {p.stem: p for p in args.stream} if args.stream else {
        name: path for name, path in build(seeds=args.stream_seeds).items()
        if path.suffix == ".jsonl"}  # not the pairs CSV
    server = None
    url = os.environ.get("REDIS_URL")
    if not url:
        from caches.redis_server import EmbeddedRedis

        server = EmbeddedRedis().start()
        url = server.url
    client = redis.Redis.from_url(url)
    tmp = Path(tempfile.mkdtemp(prefix="gptcache-bench-"))
    results: dict[str, Any] = {}
    try:
        for name, path in streams.items():
            results[name] = run_stream(path, args, threshold, client, tmp)
    finally:
        client.flushdb()
        client.close()
        if server:
            server.stop()
    meta = {
        "command": "python -m benchmarks.semantic_stream " + " ".join(sys.argv[1:] if argv is None else argv),
        "calibration": os.path.relpath(args.calibration, REPO_ROOT) if args.threshold is None else None,
        "streams": {name: os.path.relpath(path, REPO_ROOT) for name, path in streams.items()},  # no machine layout
        "roles": {name: role_of(path) for name, path in streams.items()},
        "limit": args.limit,
        "threshold": threshold,
        "gptcache_threshold_ours": round((threshold + 1) / 2, 6),
        "explore_rate": args.explore_rate,
        "error_budget": args.error_budget,
        "judge": "oracle on the stream's labels (every call counted); verified-app-judge: the app's judge as measured",
        "encoder": f"{ENCODER_NAME}/{ENCODER_VERSION}",
    }
    pooled = pool_seeds(results)
    for family, modes in pooled.items():
        for answers, systems in modes.items():
            for name, f in systems.items():
                print(f"POOLED {family[:21]:21s} x{f['draws']} {answers:9s} {name:16s} para_prec "
                      f"{f['paraphrase_precision']} (draws {f['paraphrase_precision_min']}..{f['paraphrase_precision_max']}) "
                      f"para_correct_share {f['paraphrase_correct_share']} verif/1k {f['verifications_per_1k']}",
                      flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "streams": results, "pooled": pooled}, indent=2) + "\n")
    print(json.dumps(results, separators=(",", ":")))
    return results


if __name__ == "__main__":
    main()
