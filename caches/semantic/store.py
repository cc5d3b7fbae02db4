"""The Redis side of the semantic cache: entries, budgets, learned thresholds, hit counts, purges.

Redis is the source of truth. An entry is a hash ``{scope}:e:{id}`` (:class:`SemanticEntry`) with
a TTL; per scope a sorted set ``{scope}:lfu`` lists its entries (what a mirror loads) and
``{scope}:bytes`` sums their sizes. Budgets are per tenant and global, not per scope (a scope is a
conversation turn: a budget per scope bounds nothing): the bookkeeping under :data:`BUDGET_PREFIX`
(:mod:`caches.budget`) ranks each tenant's entries for eviction (least hits first, oldest first
among equals), holds sizes and expiry times. Every change is also appended to one stream
(:data:`STREAM_KEY`) that replicas follow to keep their FAISS mirrors current
(:mod:`caches.semantic.mirror`). Store, expiry reclaim and eviction under the tenant's budget run
in one Lua script (:mod:`caches.semantic.scripts`), so tenant budgets hold with many replicas
writing at once; the global budget follows through the budget ledger.

Redis Cluster: a scope is ``sem.{<tenant>}:...``, so a tenant's entries, scope indexes and books
share one hash tag and every script's keys are one slot. The stream is one key for every tenant
(a mirror follows one stream), so it cannot be written inside a tenant's script: the store
appends the events right after its script, in one pipelined round trip. When that round trip or
the script's answer is lost (a Redis slow enough for the client to time out, though the script
may have run), the events wait in the replica's :class:`Announcements` and go with its next store
or sync: an "add" for an entry that was never stored is skipped by every mirror, and events sent
twice change nothing. A crash loses the waiting events, which is safe: a lost "add" leaves a
mirror without an entry until it reloads the scope (a miss), and a lost "del" leaves one with an
entry that :meth:`SemanticStore.validate` finds gone before any hit is served.

Nothing here catches Redis errors: the facade runs each round trip through its
:class:`~caches.redis_client.Breaker`, which turns them into ``RedisUnavailable``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import threading
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from pydantic import BaseModel, Field

from caches.budget import Books, Budget, Report, tenant_keys, tenant_of
from caches.redis_client import REDIS_ERRORS, ScriptBatch, is_cluster, scan_keys
from caches.semantic.scripts import HIT_SCRIPT, SEMANTIC_FORGET, STORE_SCRIPT, TAU_SCRIPT, VALIDATE_SCRIPT

log = logging.getLogger("tierserve.semantic")

STREAM_KEY = "sem.__stream"
EPOCH_KEY = "sem.__meta:epoch"
STREAM_MAXLEN = 200_000  # approximate cap on the event stream (events are ~100 bytes)
RECLAIM_PER_STORE = 32  # expired entries reclaimed per store (bounds the Lua script)
ENTRY_OVERHEAD_BYTES = 256  # per-entry Redis overhead counted against the byte budget
PURGE_BATCH = 256  # keys per SCAN page, per UNLINK and per forget script
BUDGET_PREFIX = "sem.__meta"  # the budget bookkeeping (caches.budget), outside every tenant's keys
# Stream events a replica keeps while Redis does not take them (oldest dropped past this: a lost
# event costs misses, never a wrong answer; see the module note).
ANNOUNCE_MAX_EVENTS = 10_000


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _pairs(flat: Sequence[Any]) -> list[tuple[str, int]]:
    """(scope, id) pairs from a script's flat list of removed entries."""
    return [(_text(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]


class SemanticEntry(BaseModel):
    """An entry as stored in Redis (hash fields)."""

    scope: str
    query: str
    embedding: bytes
    response: str
    created: float
    hits: int = 0
    params: dict[str, Any] = Field(default_factory=dict)
    tau: float = -1.0  # learned per-entry threshold: queries at or below it are not answered by it


def entry_key(scope: str, entry_id: int) -> str:
    return f"{scope}:e:{entry_id}"


def rank_key(scope: str) -> str:
    """The zset ranking the scope's tenant's entries for eviction (members are entry keys)."""
    return tenant_keys(BUDGET_PREFIX, tenant_of(scope + ":"))[2]


def lfu_score(hits: int, created: float) -> float:
    """Eviction rank: least hits first; among equal hits the oldest first (created/1e10 < 1)."""
    return hits + created / 1e10


class HitBuffer:
    """Hit counts buffered per entry and written with the next sync: keeps a round trip off the
    hit path (eviction order only needs approximate counts)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, int]] = Counter()

    def count(self, scope: str, entry_id: int) -> None:
        with self._lock:
            self._counts[(scope, entry_id)] += 1

    def drain(self) -> Counter[tuple[str, int]]:
        with self._lock:
            counts, self._counts = self._counts, Counter()
        return counts


class Announcements:
    """Stream events not yet appended: sent oldest first with the next store or sync."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._waiting: deque[dict[str, Any]] = deque(maxlen=ANNOUNCE_MAX_EVENTS)

    def __len__(self) -> int:
        return len(self._waiting)

    def send(self, events: Iterable[dict[str, Any]] = ()) -> None:
        """Append `events` after the ones waiting, in one round trip; on a Redis error they all
        wait for the next call (and the error is raised)."""
        with self._lock:
            self._waiting.extend(events)
            batch = list(self._waiting)
            self._waiting.clear()
        if not batch:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for event in batch:
                pipe.xadd(STREAM_KEY, event, maxlen=STREAM_MAXLEN, approximate=True)
            pipe.execute()
        except REDIS_ERRORS:
            with self._lock:  # back in front of anything queued meanwhile, in order; past the
                # bound the oldest go (a deque built with maxlen keeps the last ones)
                self._waiting = deque([*batch, *self._waiting], maxlen=ANNOUNCE_MAX_EVENTS)
            raise


class SemanticStore:
    """Entries of all scopes in one Redis; every method is one round trip (or one SCAN walk)."""

    def __init__(self, client: redis.Redis, *, budget: Budget, ttl_s: float | None) -> None:
        self.client = client
        self.budget = budget
        self.ttl_s = ttl_s
        self.hits = HitBuffer()
        self.books = Books(client, BUDGET_PREFIX, budget, SEMANTIC_FORGET, reclaim_limit=RECLAIM_PER_STORE)
        self.announcements = Announcements(client)
        self._store = client.register_script(STORE_SCRIPT)
        self._tau = client.register_script(TAU_SCRIPT)
        self._hit = client.register_script(HIT_SCRIPT)
        self._validate = client.register_script(VALIDATE_SCRIPT)

    @staticmethod
    def entry_size(query: str, response: str, embedding: bytes) -> int:
        """Bytes an entry counts against the budget (text, vector and a fixed overhead)."""
        return len(query.encode()) + len(response.encode()) + len(embedding) + ENTRY_OVERHEAD_BYTES

    def put(
        self,
        scope: str,
        entry_id: int,
        query: str,
        response: str,
        embedding: bytes,
        params: dict[str, Any] | None,
        size: int,
        now: float,
        group: int = 0,
        answer_embedding: bytes = b"",
    ) -> list[tuple[str, int]]:
        """Store an entry created at ``now``, reclaiming expired ones and evicting over the tenant's
        and the global budgets; returns the removed entries as (scope, id), any scope."""
        # at least 1 ms: a sub-millisecond TTL rounded to 0 would be no TTL at all in Redis
        ttl_ms = max(1, math.ceil(self.ttl_s * 1000)) if self.ttl_s else 0
        tenant = tenant_of(scope + ":")
        entry = entry_key(scope, entry_id)
        keys = [*self.books.keys(tenant), entry, f"{scope}:lfu", f"{scope}:bytes"]
        limits = self.budget.lua_args()
        now_ms = int(now * 1000)
        args = [
            entry_id, query, response, embedding, now, json.dumps(params or {}), size, ttl_ms, now_ms,
            scope, RECLAIM_PER_STORE, lfu_score(0, now), limits[0], limits[1], group or "", answer_embedding,
        ]  # fmt: skip
        removed: list[tuple[str, int]] = []
        try:
            report = Report.of(self._store(keys=keys, args=args))
            removed += _pairs(report.extra)
            removed += _pairs(self.books.settle(tenant, report, spare=entry, now_ms=now_ms))
        except REDIS_ERRORS:
            # The script's answer was lost, or the ledger's: the script may have run all the same
            # (a slow Redis), so its entry is announced; an "add" for an entry that is not there
            # is skipped by every mirror.
            with contextlib.suppress(*REDIS_ERRORS):
                self.announcements.send(self._events(scope, entry_id, removed))
            raise
        # the stream is outside the tenant's slot: its events follow the script (module note)
        try:
            self.announcements.send(self._events(scope, entry_id, removed))
        except REDIS_ERRORS:  # the entry is in: its events wait for the next store or sync
            log.warning("semantic store: stream events postponed (%d waiting)", len(self.announcements))
        return removed

    @staticmethod
    def _events(scope: str, entry_id: int, removed: Sequence[tuple[str, int]]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = [{"op": "add", "scope": scope, "id": entry_id}]
        return events + [{"op": "del", "scope": s_scope, "id": victim} for s_scope, victim in removed]

    def validate(self, scope: str, entry_ids: Sequence[int]) -> list[float | None]:
        """Each entry's learned threshold, or None where it no longer exists.

        Entries are immutable but for hits and tau, so a hit proposed by the mirror needs only
        this from Redis: whether each candidate still exists and what its threshold is now.
        """
        taus = self._validate(keys=[entry_key(scope, i) for i in entry_ids])
        return [None if t is None else float(t) for t in taus]

    def raise_taus(self, scope: str, learned: Iterable[tuple[int, float]]) -> None:
        """tau = max(tau, similarity) for each (entry, similarity), shared with every replica."""
        batch = ScriptBatch(self.client)
        for entry_id, similarity in learned:
            batch.add(self._tau, [entry_key(scope, entry_id)], [similarity])
        batch.execute()

    def queue_hits(self, pipe: Any) -> None:
        """Queue the buffered hit counts on ``pipe`` (the sync's round trip carries them); a
        cluster's pipelines refuse scripts, so there they go in a round trip of their own. Stream
        events a store could not append go first, in a round trip of their own (rare)."""
        if len(self.announcements):
            self.announcements.send()
        if is_cluster(self.client):
            self.flush_hits()
            return
        for (scope, entry_id), n in self.hits.drain().items():
            keys = [entry_key(scope, entry_id), f"{scope}:lfu", rank_key(scope)]
            self._hit(keys=keys, args=[entry_id, n], client=pipe)

    def flush_hits(self) -> None:
        batch = ScriptBatch(self.client)
        for (scope, entry_id), n in self.hits.drain().items():
            batch.add(self._hit, [entry_key(scope, entry_id), f"{scope}:lfu", rank_key(scope)], [entry_id, n])
        batch.execute()

    def purge(self, pattern: str, only: re.Pattern[bytes] | None = None) -> tuple[int, set[str]]:
        """Delete every key matching ``pattern`` (and ``only``, where given, from its start);
        returns (keys deleted, scopes dropped).

        Each dropped scope is announced on the stream, so every replica forgets its mirror; the
        entries' budget bookkeeping is given back page by page.
        """
        scopes: set[str] = set()
        deleted = 0
        batch: list[bytes] = []
        for key in scan_keys(self.client, pattern, PURGE_BATCH):
            if only is not None and not only.match(key):
                continue
            batch.append(key)
            k = key.decode()
            if k.endswith(":lfu"):
                scopes.add(k[: -len(":lfu")])
            if len(batch) >= PURGE_BATCH:
                deleted += self._unlink(batch)
                batch = []
        if batch:
            deleted += self._unlink(batch)
        for scope in scopes:
            self.client.xadd(
                STREAM_KEY,
                {"op": "drop", "scope": scope, "id": 0},
                maxlen=STREAM_MAXLEN,
                approximate=True,
            )
        return deleted, scopes

    def _unlink(self, keys: list[bytes]) -> int:
        n = int(self.client.unlink(*keys))
        self.books.forget([k for k in keys if b":e:" in k])
        return n

    def sizes(self, scopes: Sequence[str]) -> dict[str, tuple[int, int]]:
        """(entries, bytes) per scope, as Redis counts them."""
        pipe = self.client.pipeline(transaction=False)
        for s in scopes:
            pipe.zcard(f"{s}:lfu")
            pipe.get(f"{s}:bytes")
        raw = pipe.execute() if scopes else []
        return {s: (int(raw[2 * i]), int(raw[2 * i + 1] or 0)) for i, s in enumerate(scopes)}
