"""Semantic cache against real Redis and FAISS (and, for hits and traps, the real encoder)."""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from caches.calibrate import load_threshold
from caches.redis_server import EmbeddedRedis, free_port
from caches.result import CacheUnavailable
from caches.semantic import SemanticCache
from caches.semantic.judge import EmbeddingJudge
from tests.support import scope


# Fraction of fow_cache trap pairs (label 0) that may be merged at the shipped threshold. The
# shipped calibration merges none of them; a small allowance keeps the test meaningful if the
# calibration is re-run on other pairs.
@pytest.fixture
def redis_url(both_redis_urls: str) -> str:
    """Every test here that uses Redis runs on the single server and on the 3-master cluster."""
    return both_redis_urls


MAX_TRAP_MERGE_FRACTION = 0.02


def _scope(tenant: str = "t", version: str = "1") -> str:
    return scope(tenant=tenant, version=version)


def _unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    v = rng.standard_normal((n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _near(v: np.ndarray, rng: np.random.Generator, cos: float) -> np.ndarray:
    """A unit vector at cosine `cos` from the unit vector v."""
    noise = rng.standard_normal(v.shape).astype(np.float32)
    noise -= noise.dot(v) * v
    noise /= np.linalg.norm(noise)
    return (cos * v + np.sqrt(1 - cos * cos) * noise).astype(np.float32)


@pytest.fixture(scope="module")
def encoder():
    from caches.encoder import encode

    return encode


@pytest.mark.parametrize("mode", ["static", "verified"])
def test_semantic_hit_with_real_encoder(redis_client: redis.Redis, encoder, mode: str) -> None:
    cache = SemanticCache(redis_client, threshold=load_threshold(), mode=mode)
    texts = ["How do I reset my password?", "how do i reset my password", "What is the capital of France?"]
    v = encoder(texts)
    scope = _scope()
    assert cache.lookup(scope, texts[0], v[0]) is None
    cache.store(scope, texts[0], v[0], "Use the reset link.")
    hit = cache.lookup(scope, texts[1], v[1])
    assert hit is not None and hit.response == "Use the reset link." and hit.similarity > 0.95
    assert cache.lookup(scope, texts[2], v[2]) is None
    assert cache.stats()["counters"]["hits"] == 1


@pytest.fixture
def single_client(single_redis_url: str) -> Iterator[redis.Redis]:
    """The single server only: for a test about the threshold, not about Redis (2 min of encoding)."""
    client = redis.Redis.from_url(single_redis_url)
    client.flushdb()
    yield client
    client.close()


def test_trap_pairs_not_merged_at_shipped_threshold(
    single_client: redis.Redis, encoder, shared_data: Path
) -> None:
    redis_client = single_client
    rows = list(csv.DictReader((shared_data / "fow_cache" / "pairs.csv").open(encoding="utf-8")))
    threshold = load_threshold()
    va = encoder([r["text_a"] for r in rows])
    vb = encoder([r["text_b"] for r in rows])
    merged = {"0": 0, "1": 0}
    for mode in ("static", "verified"):
        cache = SemanticCache(redis_client, threshold=threshold, mode=mode, ttl_s=None)
        for i, row in enumerate(rows):
            scope = _scope(tenant=f"{mode}{i}")  # one scope per pair: only the pair is compared
            cache.store(scope, row["text_a"], va[i], f"answer {i}")
            if cache.lookup(scope, row["text_b"], vb[i]) is not None:
                merged[row["label"]] += 1
    traps = 2 * sum(r["label"] == "0" for r in rows)
    assert merged["0"] <= MAX_TRAP_MERGE_FRACTION * traps, f"{merged['0']} of {traps} traps merged"
    assert merged["1"] > 0  # and the cache still merges some true paraphrases


def test_two_instances_converge_within_a_second(redis_client: redis.Redis) -> None:
    rng = np.random.default_rng(0)
    a = SemanticCache(redis_client, threshold=0.9, mode="static")
    b = SemanticCache(redis_client, threshold=0.9, mode="static")
    b.start_background_sync(0.1)
    try:
        scope = _scope()
        v = _unit(rng)[0]
        assert b.lookup(scope, "q", v) is None  # b now mirrors the scope (empty)
        a.store(scope, "q", v, "answer")
        deadline = time.monotonic() + 1.0
        while (hit := b.lookup(scope, "q again", _near(v, rng, 0.97))) is None:
            assert time.monotonic() < deadline, "store on a not visible on b within 1 s"
            time.sleep(0.02)
        assert hit.response == "answer"
        # a purge on a is never served by b, even before b's mirror hears of it
        a.purge_scope(scope)
        assert b.lookup(scope, "q", v) is None
    finally:
        b.close()


def test_tenant_isolation_under_identical_queries(redis_client: redis.Redis) -> None:
    cache = SemanticCache(redis_client, threshold=0.9, mode="verified")
    v = _unit(np.random.default_rng(1))[0]
    cache.store(_scope("acme"), "What is our PTO policy?", v, "acme: 25 days")
    assert cache.lookup(_scope("acme"), "What is our PTO policy?", v).response == "acme: 25 days"
    assert cache.lookup(_scope("globex"), "What is our PTO policy?", v) is None


def test_version_bump_leaves_no_stale_answer(redis_client: redis.Redis) -> None:
    cache = SemanticCache(redis_client, threshold=0.9, mode="static")
    v = _unit(np.random.default_rng(2))[0]
    cache.store(_scope(version="1"), "q", v, "old")
    assert cache.lookup(_scope(version="2"), "q", v) is None
    assert cache.delete_model_version("m", "1") > 0
    assert cache.lookup(_scope(version="1"), "q", v) is None


def test_purging_a_version_named_like_a_key_part_leaves_the_current_versions_entries(
    redis_client: redis.Redis,
) -> None:
    """Entries are ``<scope>:e:<id>``: the purge pattern of an old version "e" also matched every
    entry of the current version, and the purge emptied it."""
    cache = SemanticCache(redis_client, threshold=0.9, mode="static")
    v = _unit(np.random.default_rng(31))[0]
    cache.store(_scope(version="e"), "q", v, "old")
    cache.store(_scope(version="2"), "q", v, "current")
    assert cache.delete_model_version("m", "e") > 0
    assert cache.lookup(_scope(version="e"), "q", v) is None
    hit = cache.lookup(_scope(version="2"), "q", v)
    assert hit is not None and hit.response == "current"


def test_eviction_bounds_entries_and_bytes(redis_client: redis.Redis) -> None:
    rng = np.random.default_rng(3)
    cache = SemanticCache(redis_client, threshold=0.9, mode="static", max_entries=5, max_bytes=1 << 20)
    scope = _scope()
    vs = _unit(rng, 20)
    keep = cache.store(scope, "popular", vs[0], "p")
    assert cache.lookup(scope, "popular", vs[0]) is not None  # one hit: outlives zero-hit entries
    for i in range(1, 20):
        cache.store(scope, f"q{i}", vs[i], f"a{i}")
        assert redis_client.zcard(f"{scope}:lfu") <= 5
    assert cache.lookup(scope, "popular", vs[0]).entry_id == keep
    assert cache.lookup(scope, "q19", vs[19]) is not None  # the newest is kept
    assert cache.lookup(scope, "q1", vs[1]) is None  # old zero-hit entries went first
    assert len(list(redis_client.scan_iter(match=f"{scope}:e:*"))) == 5

    redis_client.flushdb()  # the budget is global: start the byte case from an empty cache
    byte_scope = _scope(tenant="bytes")
    per_entry = 384 * 4 + 256 + 10
    cache = SemanticCache(redis_client, threshold=0.9, mode="static", max_bytes=3 * per_entry + 100)
    for i in range(10):
        cache.store(byte_scope, f"q{i}", vs[i], f"a{i}")
        assert int(redis_client.get(f"{byte_scope}:bytes")) <= 3 * per_entry + 100
    assert redis_client.zcard(f"{byte_scope}:lfu") == 3
    stats = cache.stats()["scopes"][byte_scope]
    assert stats["entries"] == 3 and stats["mirrored"] == 3


def test_ttl_expiry(redis_client: redis.Redis) -> None:
    cache = SemanticCache(redis_client, threshold=0.9, mode="static", ttl_s=0.3)
    v = _unit(np.random.default_rng(4))[0]
    cache.store(_scope(), "q", v, "a")
    assert cache.lookup(_scope(), "q", v) is not None
    time.sleep(0.4)
    assert cache.lookup(_scope(), "q", v) is None


def test_redis_down_and_back() -> None:
    port = free_port()
    server = EmbeddedRedis(port=port).start()
    try:
        client = redis.Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=1)
        cache = SemanticCache(client, threshold=0.9, mode="verified")
        v = _unit(np.random.default_rng(5))[0]
        cache.store(_scope(), "q", v, "a")
        assert cache.lookup(_scope(), "q", v) is not None
        server.stop()
        with pytest.raises(CacheUnavailable):  # the FAISS mirror alone never answers
            cache.lookup(_scope(), "q", v)
        server = EmbeddedRedis(port=port, workdir=server.workdir).start()
        deadline = time.monotonic() + 3
        while True:
            try:
                assert cache.lookup(_scope(), "q", v) is None  # restarted empty: nothing stale
                break
            except CacheUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        cache.store(_scope(), "q", v, "b")
        assert cache.lookup(_scope(), "q", v).response == "b"
    finally:
        server.stop()


# The tests from here on are about the mechanism (learned tau, groups, vetoes, verification), not
# the calibration: a judge at 0.9 so that answers made 0.97 alike count as equivalent. The app's calibrated threshold
# (caches.semantic.judge.ANSWER_SIMILARITY_THRESHOLD, 0.993) is tested in tests/unit/test_judge.py.
MECHANISM_JUDGE = EmbeddingJudge(threshold=0.9, recall=1.0, false_positive_rate=0.0)  # its verdicts: the truth


def test_learned_tau_is_shared_and_a_trimmed_stream_reloads_the_mirror(redis_client: redis.Redis) -> None:
    rng = np.random.default_rng(6)
    # threshold 0.96: a lone neighbour at 0.95 is below it, so the lookup is a miss that learns
    a = SemanticCache(redis_client, threshold=0.96, mode="verified", judge=MECHANISM_JUDGE)
    b = SemanticCache(redis_client, threshold=0.96, mode="verified", judge=MECHANISM_JUDGE)
    scope = _scope()
    v = _unit(rng)[0]
    first = a.store(scope, "q", v, "answer")
    assert b.lookup(scope, "q", v) is not None  # b mirrors the scope and follows the stream
    # a miss whose true answer differs raises the proposed entry's threshold in Redis, for all
    near = _near(v, rng, 0.95)
    assert a.lookup(scope, "q?", near) is None  # below the floor: a miss
    a.store(scope, "q?", near, "another answer")
    assert float(redis_client.hget(f"{scope}:e:{first}", "tau")) > 0.9
    # events b never read are trimmed away: b notices and reloads its mirror from Redis lazily
    b.sync()
    for i in range(5):
        a.store(_scope(tenant="other"), f"x{i}", _unit(rng)[0], "x")
    redis_client.xtrim("sem.__stream", maxlen=1, approximate=False)
    b.mirror.check_trimmed()
    assert b.stats()["scopes"] == {}
    assert b.lookup(scope, "q", v) is None  # reloaded whole: "q?" (another answer) vetoes now
    assert b.stats()["scopes"][scope]["mirrored"] == 2


def test_a_sync_after_the_stream_was_trimmed_past_its_cursor_reloads_the_mirror(redis_client: redis.Redis) -> None:
    """The background loop syncs before its periodic trim check, and an XREAD from a trimmed-away
    cursor silently jumps the gap: the sync itself must notice, or the mirror drifts for good."""
    rng = np.random.default_rng(7)
    a = SemanticCache(redis_client, threshold=0.96)
    b = SemanticCache(redis_client, threshold=0.96)
    scope = _scope()
    v = _unit(rng)[0]
    a.store(scope, "q", v, "answer")
    assert b.lookup(scope, "q", v) is not None  # b mirrors the scope and follows the stream
    b.sync()
    for i in range(5):  # events b has not read, then trimmed away
        a.store(_scope(tenant="other"), f"x{i}", _unit(rng)[0], "x")
    redis_client.xtrim("sem.__stream", maxlen=1, approximate=False)
    b.sync()  # not check_trimmed: the ordinary sync
    assert b.stats()["scopes"] == {}  # dropped, to reload from Redis when next asked
    assert b.lookup(scope, "q", v) is not None


def test_an_entry_stored_while_a_replica_loads_its_scope_reaches_that_replicas_mirror(
    redis_client: redis.Redis,
) -> None:
    """Replica a loads a scope while replica b stores into it, and a's sync thread follows the
    stream before a registers the scope: the "add" event skipped the unregistered scope. Without
    a catch-up a never proposed that entry (an exact repeat missed there for good); also after a
    reset, when the next sync would follow the stream only from its end."""
    rng = np.random.default_rng(23)
    a = SemanticCache(redis_client, threshold=0.96)
    b = SemanticCache(redis_client, threshold=0.96)
    a.sync()
    for label, reset_first in (("while syncing", False), ("after a reset", True)):
        scope = _scope(tenant=f"loading-{label.split()[0]}")
        v = _unit(rng)[0]
        b.store(scope, "older", _unit(rng)[0], "older answer")
        if reset_first:
            a.mirror.reset()
        load = a.mirror.load

        def load_while_b_stores(name: str, v: np.ndarray = v, load=load) -> object:
            snapshot = load(name)
            b.store(name, "How do I reset my password?", v, "Use the reset link.")
            a.sync()  # a's sync thread, before the scope is registered
            return snapshot

        a.mirror.load = load_while_b_stores  # type: ignore[method-assign]
        try:
            a.lookup(scope, "anything", _unit(rng)[0])  # the lookup that loads the scope
        finally:
            a.mirror.load = load  # type: ignore[method-assign]
        a.sync()
        hit = a.lookup(scope, "How do I reset my password?", v)
        assert hit is not None and hit.response == "Use the reset link.", label
        assert len(a.mirror.get(scope).ids) == 2, label
    # loaded right after a reset, then b stores, then a's first sync: it follows the stream from
    # where the load began, not from its end
    scope, v = _scope(tenant="loading-late"), _unit(rng)[0]
    a.mirror.reset()
    assert a.lookup(scope, "anything", _unit(rng)[0]) is None  # loads (and registers) the empty scope
    b.store(scope, "How do I reset my password?", v, "Use the reset link.")
    a.sync()
    assert a.lookup(scope, "How do I reset my password?", v) is not None


def test_a_store_whose_answer_was_lost_on_a_slow_redis_still_reaches_the_other_replicas(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store script ran but its answer never came back (a Redis slow enough for the client to
    time out), and the stream did not take the event either. The entry is announced with the
    storing replica's next sync, so another replica mirrors it; before, it never did until it
    reloaded the scope (an exact repeat missed there)."""
    rng = np.random.default_rng(29)
    a = SemanticCache(redis_client, threshold=0.96)
    b = SemanticCache(redis_client, threshold=0.96)
    a.guard.retry_after_s = 0  # the lost answer must not hold a's next sync back
    name, v, question = _scope(tenant="slow-store"), _unit(rng)[0], "How do I reset my password?"
    assert b.lookup(name, question, v) is None  # b mirrors the scope (empty)
    run_script = a.redis_store._store

    def answer_lost(*args: object, **kwargs: object) -> None:
        run_script(*args, **kwargs)  # the script runs ...
        raise redis.TimeoutError("Timeout reading from socket")  # ... its answer is lost

    with monkeypatch.context() as patch:
        patch.setattr(a.redis_store, "_store", answer_lost)
        # the stream's round trip fails too: a server nobody listens on
        patch.setattr(a.redis_store.announcements, "client", redis.Redis(port=free_port(), socket_connect_timeout=1))
        with pytest.raises(CacheUnavailable):
            a.store(name, question, v, "Use the reset link.")
    assert len(a.redis_store.announcements) == 1  # waiting
    b.sync()
    assert b.lookup(name, question, v) is None  # stored, but no replica knows yet
    a.sync()  # a's next sync announces it
    assert len(a.redis_store.announcements) == 0
    b.sync()
    hit = b.lookup(name, question, v)
    assert hit is not None and hit.response == "Use the reset link."


def _answer(rng: np.random.Generator) -> np.ndarray:
    return _unit(rng)[0]


def test_entries_carry_the_answer_embedding_and_judged_group(redis_client: redis.Redis) -> None:
    """Verified mode: an entry stores its answer's embedding; a miss's answer judged equivalent to
    a candidate's joins its group (in Redis, so every replica's mirror sees it), one judged
    different raises that candidate's threshold."""
    rng = np.random.default_rng(11)
    cache = SemanticCache(redis_client, threshold=0.9, mode="verified", explore_rate=0.0, judge=MECHANISM_JUDGE)
    scope = _scope()
    q, a = _unit(rng)[0], _answer(rng)
    first = cache.store(scope, "How do I reset my password?", q, "Use the reset link.", answer_vector=a)
    raw = redis_client.hget(f"{scope}:e:{first}", "answer_embedding")
    assert raw is not None and np.allclose(np.frombuffer(raw, dtype=np.float32), a)
    # a paraphrase at 0.85: below the floor, a miss; the model's answer is near the cached one's
    para = _near(q, rng, 0.85)
    assert cache.find(scope, "I forgot my password, what now?", para).status == "miss"
    second = cache.store(scope, "I forgot my password, what now?", para, "Click 'reset password'.",
                         answer_vector=_near(a, rng, 0.97))
    assert int(redis_client.hget(f"{scope}:e:{second}", b"group")) == int(first)
    assert float(redis_client.hget(f"{scope}:e:{first}", "tau")) < 0  # judged right: no veto
    # another question near the first whose answer is unrelated: the first must not answer there
    other = _near(q, rng, 0.86)
    assert cache.find(scope, "How do I reset my PIN?", other).status == "miss"
    third = cache.store(scope, "How do I reset my PIN?", other, "At any ATM.", answer_vector=_answer(rng))
    assert float(redis_client.hget(f"{scope}:e:{first}", "tau")) == pytest.approx(0.86, abs=0.01)
    assert int(redis_client.hget(f"{scope}:e:{third}", b"group")) == int(third)  # a group of its own
    # a second replica loads the scope from Redis with groups and answer embeddings
    other_replica = SemanticCache(redis_client, threshold=0.9, mode="verified", explore_rate=0.0, judge=MECHANISM_JUDGE)
    found = other_replica.find(scope, "How do I reset my password?", q)
    assert found.status in ("hit", "miss")  # (a vote may veto; the point is the load works)
    meta = other_replica.mirror.scopes[scope].meta[int(second)]
    assert meta.group == int(first) and meta.answer_vector is not None
    assert cache.stats()["counters"]["judgements"] >= 2


Q1, Q2, Q3 = "How do I reset my password?", "how do i reset my password please", "I need to reset my password, how?"


def test_verify_status_and_learning_from_the_verdict(redis_client: redis.Redis) -> None:
    """With exploration on, an uncertain would-be hit comes back as ``verify`` carrying the
    candidate; storing the model's answer judges it (counted), and a near-duplicate is never
    explored."""
    rng = np.random.default_rng(12)
    cache = SemanticCache(redis_client, threshold=0.9, mode="verified", explore_rate=1.0, seed=3, judge=MECHANISM_JUDGE)
    scope = _scope()
    q, a = _unit(rng)[0], _answer(rng)
    cache.store(scope, Q1, q, "answer one", answer_vector=a)
    # a reworded question at 0.97, alone above the threshold: a would-be hit, sent for verification
    # (rate 1 and no evidence yet); the model's answer is judged equivalent: the two form one group
    second = _near(q, rng, 0.97)
    found = cache.find(scope, Q2, second)
    assert found.status == "verify" and found.hit is not None and found.hit.response == "answer one"
    cache.store(scope, Q2, second, "answer one, reworded", answer_vector=_near(a, rng, 0.99))
    counters = cache.stats()["counters"]
    assert counters["verifications"] == 1 and counters["verified_equivalent"] == 1
    # a third wording near both: the two agree (one group), another verification
    query = _near(q, rng, 0.95)
    found = cache.find(scope, Q3, query)
    assert found.status == "verify" and found.hit is not None and found.hit.response.startswith("answer one")
    cache.store(scope, Q3, query, "answer one, fresh", answer_vector=_near(a, rng, 0.3))
    counters = cache.stats()["counters"]
    assert counters["verifications"] == 2 and counters["verified_different"] == 1  # judged different
    assert counters["tau_updates"] >= 1  # the candidate judged wrong must not answer there again
    # near-duplicates are never sent to the model
    # (here a miss: the answer judged different sits within the vote window, so the region is split)
    assert cache.find(scope, Q1, q).status != "verify"
    assert cache.stats()["counters"]["verifications"] == 2
