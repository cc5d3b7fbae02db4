"""Semantic cache: answer a question from a cached answer to a question that means the same.

The package is split along its seams; this module is the facade that ties them together:

- :mod:`~caches.semantic.store` (+ :mod:`~caches.semantic.scripts`): Redis, the source of truth;
  entries, budgets, eviction, learned thresholds, purges, all atomic in Lua.
- :mod:`~caches.semantic.mirror`: each replica's FAISS mirror and the stream that keeps it current.
- :mod:`~caches.semantic.decision`: which candidate may answer (static or verified, one protocol).
- :mod:`~caches.semantic.judge`: whether two answers are equivalent (what verified mode learns from).
- :mod:`~caches.semantic.guard`: the lexical trap guard for minimal edits embeddings cannot see.

Why the mirror never serves stale answers
    The mirror (vectors plus each entry's immutable query and answer) only proposes. A lookup
    that the mirror decides is a miss needs no Redis; one it decides is a hit is checked in Redis
    in the same lookup (one script call: does each candidate still exist, what is its learned
    threshold) and decided again on that. An entry purged, evicted or expired on any replica is
    gone from Redis at once, so it cannot be served even before the stream event reaches this
    replica (the stale vector is then dropped locally). The price is that hits need Redis: when
    Redis is down (or failed within the last moments), :class:`~caches.redis_client.RedisUnavailable` is
    raised and the caller answers from the model (``x-cache: bypass``). Entry ids are random 62-bit
    integers, so a replica whose mirror outlived a Redis restart can never map an old vector onto
    a new, different entry.

Learning (verified mode)
    Per-entry thresholds, answer groups and the scope's floor learn only from what a deployment
    observes: on a miss, or a verification (:meth:`SemanticCache.find` says ``verify``: the caller
    asks the model although a candidate was near), the caller stores the model's fresh answer with
    its embedding, and the judge (:mod:`caches.semantic.judge`) compares it with the answers of the
    candidates that lookup proposed (:meth:`caches.semantic.decision.VerifiedPolicy.learn`).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import redis
from pydantic import BaseModel

from caches.budget import Budget
from caches.keys import glob_escape, model_version_match, model_version_patterns, tenant_namespace
from caches.redis_client import Breaker
from caches.result import CacheUnavailable
from caches.semantic.decision import (
    FLOOR_MIN,
    NEAR_DUPLICATE,
    PENDING_MAX,
    VOTE_K,
    VOTE_MARGIN,
    VOTE_MIN,
    Candidate,
    Decision,
    FloorBand,
    HitPolicy,
    Learned,
    PendingLookup,
    PendingLookups,
    StaticPolicy,
    VerifiedPolicy,
    wilson_upper,
)
from caches.semantic.evidence import WILSON_Z
from caches.semantic.guard import (
    FILLERS,
    NEGATIONS,
    NUMBER_OVERLAP,
    NUMBER_WORDS,
    OPPOSITES,
    TOKEN_CACHE_SIZE,
    tokens,
    trap_guard,
)
from caches.semantic.judge import Answer, AnswerJudge, EmbeddingJudge
from caches.semantic.mirror import (
    FAISS_OMP_THREADS,
    SNAPSHOT_BATCH,
    SYNC_MIN_INTERVAL_S,
    TRIM_CHECK_S,
    EntryMeta,
    ScopeIndex,
    StreamMirror,
)
from caches.semantic.store import (
    ENTRY_OVERHEAD_BYTES,
    EPOCH_KEY,
    RECLAIM_PER_STORE,
    STREAM_KEY,
    STREAM_MAXLEN,
    SemanticEntry,
    SemanticStore,
)

__all__ = [
    "ENTRY_OVERHEAD_BYTES", "EPOCH_KEY", "FAISS_OMP_THREADS", "FILLERS", "FLOOR_MIN",
    "NEAR_DUPLICATE", "NEGATIONS", "NUMBER_OVERLAP", "NUMBER_WORDS", "OPPOSITES", "PENDING_MAX",
    "RECLAIM_PER_STORE", "SNAPSHOT_BATCH", "STREAM_KEY", "STREAM_MAXLEN", "SYNC_MIN_INTERVAL_S",
    "TOKEN_CACHE_SIZE", "TRIM_CHECK_S", "VOTE_K", "VOTE_MARGIN", "VOTE_MIN", "WILSON_Z",
    "Answer", "AnswerJudge", "Candidate", "Decision", "EmbeddingJudge", "EntryMeta", "FloorBand",
    "HitPolicy", "Learned", "PendingLookup", "ScopeIndex", "SemanticCache", "SemanticEntry",
    "SemanticHit", "SemanticLookup", "StaticPolicy", "VerifiedPolicy", "tokens", "trap_guard",
    "wilson_upper",
]  # fmt: skip

_Candidate = Candidate  # the old private name, kept for callers not yet moved to Candidate


class SemanticHit(BaseModel):
    """A hit as the caller sees it (serialised across Serve deployments)."""

    response: str
    similarity: float
    entry_id: str
    query: str
    created: float  # when the answer was stored (epoch seconds): the hit's Age, max-age checks


@dataclass(frozen=True)
class SemanticLookup:
    """What :meth:`SemanticCache.find` says: ``hit`` (serve ``hit``), ``verify`` (a would-be hit
    picked for verification: ask the model, serve its answer and store it, which judges it against
    ``hit``), or ``miss``."""

    status: Literal["hit", "verify", "miss"]
    hit: SemanticHit | None = None


def _candidate(entry_id: int, similarity: float, meta: EntryMeta, tau: float | None = None) -> Candidate:
    return Candidate(entry_id, similarity, meta.query, meta.response, meta.tau if tau is None else tau,
                     group=meta.group, answer_vector=meta.answer_vector, created=meta.created)


# --- request helpers ---------------------------------------------------------------------------
class SemanticCache:
    """One replica's semantic cache: lookups on the local mirror, hits validated in Redis."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        threshold: float,
        mode: Literal["static", "verified"] = "verified",
        max_entries: int = 100_000,
        max_bytes: int = 256 << 20,
        tenant_max_entries: int | None = None,
        tenant_max_bytes: int | None = None,
        mirror_max_entries: int | None = None,
        mirror_max_bytes: int | None = None,
        ttl_s: float | None = 86400,
        error_budget: float = 0.01,
        explore_rate: float = 0.05,
        judge: AnswerJudge | None = None,
        dim: int = 384,
        guard: bool = True,
        faiss_gpu: bool = False,
        seed: int | None = None,
    ) -> None:
        if mode not in ("static", "verified"):
            raise ValueError(f"mode must be 'static' or 'verified', got {mode!r}")
        if not 0 < error_budget < 1 or not 0 <= explore_rate <= 1:
            raise ValueError("error_budget must be in (0, 1) and explore_rate in [0, 1]")
        self.client = client
        self.threshold = threshold
        self.mode = mode
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.error_budget = error_budget
        self.explore_rate = explore_rate
        self.judge: AnswerJudge = judge if judge is not None else EmbeddingJudge()
        self.dim = dim
        self.use_guard = guard
        self.guard = Breaker("semantic cache")
        check = trap_guard if guard else None
        self.policy: HitPolicy = (
            StaticPolicy(threshold, guard=check)
            if mode == "static"
            else VerifiedPolicy(threshold, error_budget=error_budget, explore_rate=explore_rate, guard=check, seed=seed,
                                judge_recall=self.judge.recall, judge_false_positive_rate=self.judge.false_positive_rate)
        )
        # max_* bound the whole cache, tenant_* each tenant's share (see caches.budget)
        self.budget = Budget(tenant_entries=tenant_max_entries, tenant_bytes=tenant_max_bytes,
                             global_entries=max_entries, global_bytes=max_bytes)
        self.redis_store = SemanticStore(client, budget=self.budget, ttl_s=ttl_s)
        self._pending = PendingLookups()
        self.mirror = StreamMirror(
            client, dim, self.guard, queue_writes=self.redis_store.queue_hits, on_reset=self._pending.clear,
            use_gpu=faiss_gpu, max_entries=mirror_max_entries, max_bytes=mirror_max_bytes, ttl_s=ttl_s,
        )
        self._lock = self.mirror.lock  # one lock for the mirror and the learning bookkeeping
        self.counters = {
            "lookups": 0,
            "hits": 0,
            "misses": 0,
            "bypass": 0,
            "stores": 0,
            "evicted": 0,
            "guard_rejects": 0,
            "vote_rejects": 0,
            "tau_rejects": 0,
            "stale_candidates": 0,
            "tau_updates": 0,
            "verifications": 0,  # would-be hits sent to the model to be verified
            "judgements": 0,  # judge calls (misses' candidates and verifications)
            "verified_equivalent": 0,  # verifications whose candidate the judge found equivalent
            "verified_different": 0,
        }

    # -- public API -----------------------------------------------------------------------------
    def find(self, scope: str, query: str, vector: np.ndarray) -> SemanticLookup:
        """A hit to serve, a would-be hit to verify (verified mode explores), or a miss."""
        self.counters["lookups"] += 1
        try:
            return self._lookup(scope, query, self._as_vector(vector))
        except CacheUnavailable:
            self.counters["bypass"] += 1
            self.mirror.needs_reset = True
            raise

    def lookup(self, scope: str, query: str, vector: np.ndarray) -> SemanticHit | None:
        """The hit, or None (a verification is a miss to a caller that does not ask: it calls the
        model and stores the answer, which judges it all the same)."""
        found = self.find(scope, query, vector)
        return found.hit if found.status == "hit" else None

    def store(
        self, scope: str, query: str, vector: np.ndarray, response: str, params: dict[str, Any] | None = None,
        answer_vector: np.ndarray | None = None,
    ) -> str | None:
        """Store the model's answer (with its embedding, for the judge); returns the entry id (None
        when it exceeds the byte budget). Judges the answer against what this query's lookup
        proposed, when it was a miss or a verification."""
        vec = self._as_vector(vector)
        embedding = vec.tobytes()
        answer_vec = self._as_vector(answer_vector) if answer_vector is not None else None
        answer_bytes = answer_vec.tobytes() if answer_vec is not None else b""
        size = SemanticStore.entry_size(query, response, embedding) + len(answer_bytes)
        fits = self.budget.max_entry_bytes
        if fits is not None and size > fits:
            return None
        entry_id = secrets.randbits(62)
        group = self._learn(scope, query, Answer(response, answer_vec)) or entry_id
        self._maybe_sync()
        # this replica's recent hits must count before the store script picks eviction victims
        self.guard.call("semantic.hits", self.redis_store.flush_hits)
        index = self._ensure_scope(scope)
        now = time.time()
        removed = self.guard.call(
            "semantic.store", lambda: self.redis_store.put(scope, entry_id, query, response, embedding, params, size,
                                                           now, group=group, answer_embedding=answer_bytes)
        )
        with self._lock:
            index.add([entry_id], vec[None, :], [EntryMeta(query, response, created=now, group=group,
                                                           answer_vector=answer_vec)])
            self.mirror.remove_entries(removed, keep=scope)
        self.counters["stores"] += 1
        self.counters["evicted"] += len(removed)
        return str(entry_id)

    def sync(self) -> int:
        """Apply stream events (adds, deletes, scope drops) to the local mirrors; returns how many."""
        return self.guard.call("semantic.sync", self.mirror.sync)

    def start_background_sync(self, interval_s: float = 0.2) -> None:
        self.mirror.start(interval_s)

    def close(self) -> None:
        self.mirror.stop()

    def purge_scope(self, scope: str) -> int:
        """Delete every entry of a scope on all replicas."""
        return self._purge(glob_escape(scope + ":") + "*")

    def delete_model_version(self, model: str, version: str | None = None) -> int:
        """Delete a model's (or one version's) entries in every tenant: the background purge."""
        only = model_version_match("sem", model, version)
        return sum(self._purge(pattern, only) for pattern in model_version_patterns("sem", model, version))

    def delete_tenant(self, tenant: str) -> int:
        return self._purge(glob_escape(tenant_namespace("sem", tenant) + ":") + "*")

    def stats(self) -> dict[str, Any]:
        with self._lock:
            scopes = {
                s: {"mirrored": len(ix.ids), "floor": round(self.policy.floor(ix.band), 3),
                    "judged": sum(ix.band.n)}
                for s, ix in self.mirror.scopes.items()
            }
        out: dict[str, Any] = {
            "mode": self.mode,
            "threshold": self.threshold,
            "error_budget": self.error_budget,
            "explore_rate": self.explore_rate,
            "judge": self.judge.name,
            "counters": dict(self.counters),
        }
        try:
            names = list(scopes)
            sizes = self.guard.call("semantic.stats", self.redis_store.sizes, names) if names else {}
            for s, (entries, size) in sizes.items():
                scopes[s].update(entries=entries, bytes=size)
            out["available"] = True
        except CacheUnavailable:
            out["available"] = False
        out["scopes"] = scopes
        return out

    # -- internals ------------------------------------------------------------------------------
    def _as_vector(self, vector: np.ndarray) -> np.ndarray:
        vec = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vec.shape[0] != self.dim:
            raise ValueError(f"expected a {self.dim}-dim vector, got {vec.shape[0]}")
        return vec

    def _maybe_sync(self) -> None:
        if self.mirror.due():
            self.sync()

    def _ensure_scope(self, scope: str) -> ScopeIndex:
        index = self.mirror.get(scope)
        if index is not None:
            return index
        loaded = self.guard.call("semantic.load", self.mirror.load, scope)
        index = self.mirror.register(scope, loaded)
        if index is loaded and self.mirror.missed_events(loaded):
            self.guard.call("semantic.load", self.mirror.catch_up, scope, loaded)
        return index

    def _lookup(self, scope: str, query: str, vec: np.ndarray) -> SemanticLookup:
        if not self.guard.available:  # Redis failed moments ago: the mirror alone never answers
            raise CacheUnavailable("redis unavailable (backing off)")
        self.guard.call("semantic.sync", self._maybe_sync)
        index = self._ensure_scope(scope)
        with self._lock:
            found = index.search(vec, self.policy.neighbours)
        if not found:
            self.counters["misses"] += 1
            return SemanticLookup("miss")
        floor = self.policy.floor(index.band)
        # only the nearest and its vote window can matter, so only they are fetched from Redis
        cutoff = max(self.policy.cutoff(floor), found[0][1] - VOTE_MARGIN)
        with self._lock:
            local = [
                _candidate(i, s, m)
                for i, s in found
                if s >= cutoff and (m := index.meta.get(i)) is not None
            ]
        # Decide on the mirror first: a miss needs no Redis at all. A hit is decided again on the
        # candidates as Redis has them now (existence, learned thresholds), so nothing purged,
        # evicted or expired anywhere is ever served.
        decision = self._decide(scope, query, local, floor, index.band, record=True) if local else Decision()
        answer = decision.hit
        if answer is not None:
            fresh = self._fetch(scope, local)
            unchanged = len(fresh) == len(local) and all(
                f.tau == c.tau for f, c in zip(fresh, local, strict=True)
            )
            if not unchanged:
                answer = self._decide(scope, query, fresh, floor, index.band, record=False).hit if fresh else None
        if decision.verify is not None:
            self.counters["verifications"] += 1
            return SemanticLookup("verify", self._as_hit(index, decision.verify))
        if answer is None:
            self.counters["misses"] += 1
            return SemanticLookup("miss")
        self.redis_store.hits.count(scope, answer.entry_id)
        self.counters["hits"] += 1
        return SemanticLookup("hit", self._as_hit(index, answer))

    def _as_hit(self, index: ScopeIndex, c: Candidate) -> SemanticHit:
        # `created` travels with the candidate: the sync thread may have dropped the entry's
        # metadata since (a del event, the TTL sweep, the cap), and "now" would read as Age 0 and
        # pass any max-age.
        return SemanticHit(
            response=c.response,
            similarity=c.similarity,
            entry_id=str(c.entry_id),
            query=c.query,
            created=c.created,
        )

    def _decide(
        self, scope: str, query: str, candidates: list[Candidate], floor: float, band: FloorBand, record: bool
    ) -> Decision:
        """The policy's verdict; ``record`` (the first decision of a lookup) may explore, counts
        rejections and remembers a miss or verification for learning; the re-decision on Redis'
        view does none of these."""
        with self._lock:
            decision = self.policy.decide(candidates, query, floor, band, explore=record)
        if record and decision.reject is not None:
            self.counters[f"{decision.reject}_rejects"] += 1
        if decision.hit is None and record:
            pending = self.policy.pending(candidates, query, decision)
            if pending is not None:
                with self._lock:
                    self._pending.put(scope, query, pending)
        return decision

    def _fetch(self, scope: str, local: Sequence[Candidate]) -> list[Candidate]:
        """The candidates as Redis has them now: an entry gone there is not served."""
        taus = self.guard.call("semantic.validate", self.redis_store.validate, scope, [c.entry_id for c in local])
        with self._lock:
            index = self.mirror.scopes.get(scope)
            meta = (
                {c.entry_id: index.meta[c.entry_id] for c in local if c.entry_id in index.meta}
                if index
                else {}
            )
        out: list[Candidate] = []
        gone: list[int] = []
        for c, tau in zip(local, taus, strict=True):
            m = meta.get(c.entry_id)
            if tau is None or m is None:
                gone.append(c.entry_id)
                continue
            out.append(_candidate(c.entry_id, c.similarity, m, tau))
        with self._lock:
            index = self.mirror.scopes.get(scope)
            if index is not None:
                index.remove(gone)
                for c in out:  # refresh the mirror's copy (thresholds learned on other replicas)
                    if c.entry_id in index.meta:
                        index.meta[c.entry_id].tau = c.tau
        self.counters["stale_candidates"] += len(gone)
        return out

    def _learn(self, scope: str, query: str, answer: Answer) -> int | None:
        """Judge the model's answer (being stored) against what this query's lookup proposed;
        returns the group the new entry joins (None: a group of its own)."""
        with self._lock:
            pending = self._pending.pop(scope, query)
            if pending is None:
                return None
            index = self.mirror.scopes.get(scope)

            def equivalent(c: Candidate) -> bool:
                self.counters["judgements"] += 1
                return self.judge.equivalent(answer, Answer(c.response, c.answer_vector))

            learned = self.policy.learn(pending, equivalent, index.band if index is not None else None)
            if index is not None:
                for c in learned.wrong:
                    if c.entry_id in index.meta:
                        index.meta[c.entry_id].tau = max(index.meta[c.entry_id].tau, c.similarity)
        if pending.verified and learned.shadow_correct is not None:
            self.counters["verified_equivalent" if learned.shadow_correct else "verified_different"] += 1
        if learned.wrong:
            self.guard.call(
                "semantic.learn",
                lambda: self.redis_store.raise_taus(scope, [(c.entry_id, c.similarity) for c in learned.wrong]),
            )
            self.counters["tau_updates"] += len(learned.wrong)
        return learned.group

    def _purge(self, pattern: str, only: re.Pattern[bytes] | None = None) -> int:
        deleted, scopes = self.guard.call("semantic.purge", self.redis_store.purge, pattern, only)
        self.mirror.drop(scopes)
        return deleted
