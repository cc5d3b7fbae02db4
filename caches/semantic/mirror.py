"""Each replica's FAISS mirror of the scopes it serves, kept current from one Redis Stream.

Every replica mirrors each scope it serves into a FAISS ``IndexIDMap2(IndexFlatIP)`` (vectors are
L2-normalised, so inner product is cosine) and converges through one Redis Stream of
``add``/``del``/``drop`` events. A scope is loaded lazily from Redis the first time a replica
touches it; after that the stream keeps it current (:meth:`StreamMirror.sync`, run by a background
thread and, rate-limited, by lookups).

The mirror only proposes: a lookup it decides is a miss needs no Redis, one it decides is a hit is
validated in Redis (:meth:`caches.semantic.store.SemanticStore.validate`). So the mirror may lag
(a missed event, a trimmed stream, a Redis restart) without ever serving a stale answer; each of
those cases resets it, and it reloads lazily.

Bounded memory per replica: the mirrors of all scopes together are capped (``max_entries``,
``max_bytes``, an estimate of vectors, texts and per-entry and per-scope overhead). Over the cap,
whole least-recently-used scopes are dropped (they reload from Redis when used again), and if the
scope in use alone is over, its oldest entries go. Redis expires entries silently, so a sweep in the
background thread drops entries past their TTL from the mirrors, a bounded number per sweep.
Dropping from a mirror never loses data: Redis still has what is live there.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import faiss
import numpy as np
import redis

from caches.redis_client import Breaker
from caches.result import CacheUnavailable
from caches.semantic.scope_index import (
    MIRROR_ENTRY_OVERHEAD,
    MIRROR_SCOPE_OVERHEAD,
    TOMBSTONE_FRACTION,
    TOMBSTONE_MIN,
    EntryMeta,
    MirrorUsage,
    ScopeIndex,
)
from caches.semantic.store import EPOCH_KEY, STREAM_KEY, entry_key

SYNC_MIN_INTERVAL_S = 0.1  # a lookup syncs the stream at most this often (the thread does the rest)
TRIM_CHECK_S = 5.0  # how often the background thread checks for a stream trimmed past our cursor
SNAPSHOT_BATCH = 1_000  # entries read per pipeline when a scope is first loaded
STREAM_BATCH = 1_000  # events read per XREAD
# One query at a time is memory-bound: OpenMP threads only add wake-up latency and compete with
# the other replicas for the few cores a Serve replica gets.
FAISS_OMP_THREADS = 1
# re-exported: ScopeIndex and its constants lived here before caches.semantic.scope_index
__all__ = [
    "FAISS_OMP_THREADS", "MIRROR_ENTRY_OVERHEAD", "MIRROR_FIELDS", "MIRROR_SCOPE_OVERHEAD", "SNAPSHOT_BATCH",
    "SWEEP_BATCH", "SWEEP_EVERY_S", "SYNC_MIN_INTERVAL_S", "TOMBSTONE_FRACTION", "TOMBSTONE_MIN",
    "TRIM_CHECK_S", "EntryMeta", "MirrorUsage", "ScopeIndex", "StreamMirror",
]  # fmt: skip
MIRROR_FIELDS = ["embedding", "query", "response", "tau", "created", "group", "answer_embedding"]
SWEEP_EVERY_S = 1.0  # how often the background thread drops TTL-expired entries from the mirrors
SWEEP_BATCH = 2_000  # entries examined per sweep: bounds the time the lock is held


def _id_lt(a: str, b: str) -> bool:
    ams, _, aseq = a.partition("-")
    bms, _, bseq = b.partition("-")
    return (int(ams), int(aseq or 0)) < (int(bms), int(bseq or 0))


class StreamMirror:
    """The scopes mirrored on this replica and the stream cursor that keeps them current.

    ``lock`` guards the scopes; callers hold it while they read or change a :class:`ScopeIndex`.
    ``queue_writes`` lets the owner piggyback writes (buffered hit counts) on the sync's round trip;
    ``on_reset`` is called whenever everything mirrored is thrown away.
    """

    def __init__(
        self,
        client: redis.Redis,
        dim: int,
        guard: Breaker,
        *,
        queue_writes: Callable[[Any], None],
        on_reset: Callable[[], None],
        use_gpu: bool = False,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        ttl_s: float | None = None,
    ) -> None:
        faiss.omp_set_num_threads(FAISS_OMP_THREADS)
        self.client = client
        self.dim = dim
        self.use_gpu = use_gpu  # mirrors on the GPU when one is visible (caches.vector_index)
        self.guard = guard
        self.lock = threading.RLock()
        self.scopes: dict[str, ScopeIndex] = {}  # least recently used first
        self.usage = MirrorUsage()
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.evicted_scopes = 0
        self.expired = 0
        self._sweep_scopes: list[str] = []
        self._sweep_scope = ""
        self._sweep_ids: list[int] = []
        self._last_sweep = 0.0
        self.needs_reset = False  # set when Redis failed: it may have restarted empty meanwhile
        self._queue_writes = queue_writes
        self._on_reset = on_reset
        self._cursor = "$"  # set properly on the first sync
        self._epoch: bytes | None = None
        self._last_sync = 0.0
        self._last_trim_check = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------------
    def reset(self) -> None:
        with self.lock:
            for index in self.scopes.values():  # detached: a late add must not count here
                index.usage = None
            self.scopes.clear()
            self.usage.entries = self.usage.bytes = 0
            self._on_reset()
            self._cursor = "$"
            self._epoch = None
            self.needs_reset = False

    def drop(self, scopes: set[str]) -> None:
        with self.lock:
            for scope in scopes:
                self._pop(scope)

    def _pop(self, scope: str) -> None:
        index = self.scopes.pop(scope, None)
        if index is not None:
            self.usage.entries -= len(index.ids)
            self.usage.bytes -= index.nbytes
            index.usage = None

    def start(self, interval_s: float) -> None:
        """Sync and (every :data:`TRIM_CHECK_S`) check for trimming in a thread, every ``interval_s``."""
        if self._thread and self._thread.is_alive():
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    if time.monotonic() - self._last_sweep > SWEEP_EVERY_S:
                        self.sweep_expired()
                    self.guard.call("semantic.sync", self.sync)
                    if time.monotonic() - self._last_trim_check > TRIM_CHECK_S:
                        self.check_trimmed()
                except CacheUnavailable:
                    self.needs_reset = True
                except Exception:  # noqa: BLE001 - a sync thread must survive anything and retry
                    time.sleep(interval_s)

        self._thread = threading.Thread(target=loop, name="semantic-cache-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)
            self._thread = None

    def due(self) -> bool:
        """Whether a lookup should sync now (at most every :data:`SYNC_MIN_INTERVAL_S`)."""
        return time.monotonic() - self._last_sync >= SYNC_MIN_INTERVAL_S

    # -- stream ---------------------------------------------------------------------------------
    def sync(self) -> int:
        """Apply stream events (adds, deletes, scope drops); returns how many. Raises Redis errors."""
        if self.needs_reset:
            self.reset()
        if self._epoch is not None and self._cursor != "$":
            # steady state, one round trip: buffered writes, the epoch, the next events
            pipe = self.client.pipeline(transaction=False)
            self._queue_writes(pipe)
            pipe.get(EPOCH_KEY)
            # the stream's oldest entry, read with the events: an XREAD from a cursor the stream
            # was trimmed past silently jumps the gap (events lost), so look before following
            pipe.xrange(STREAM_KEY, "-", "+", 1)
            pipe.xread({STREAM_KEY: self._cursor}, count=STREAM_BATCH)
            replies = pipe.execute()
            epoch, first, reply = replies[-3], replies[-2], replies[-1]
            if first and self._cursor != "0-0" and _id_lt(self._cursor, first[0][0].decode()):
                self.reset()  # trimmed past our cursor: mirrors reload lazily from Redis
                return 0
            if epoch == self._epoch:
                applied = self._follow(reply)
                self._last_sync = time.monotonic()
                return applied
        epoch = self.client.get(EPOCH_KEY)
        if epoch is None:
            self.client.set(EPOCH_KEY, secrets.token_hex(8), nx=True)
            epoch = self.client.get(EPOCH_KEY)
        if self._epoch is not None and epoch != self._epoch:
            # Redis was restarted or flushed: everything mirrored is gone from the source of truth
            self.reset()
        if self._epoch is None:
            self._epoch = epoch
            if self._cursor == "$":
                last = self.client.xrevrange(STREAM_KEY, count=1)
                self._cursor = last[0][0].decode() if last else "0-0"
        # lost if Redis is down now: eviction order only needs approximate counts
        with contextlib.suppress(redis.RedisError):
            pipe = self.client.pipeline(transaction=False)
            self._queue_writes(pipe)
            pipe.execute()
        applied = self._follow(self.client.xread({STREAM_KEY: self._cursor}, count=STREAM_BATCH))
        self._last_sync = time.monotonic()
        return applied

    def _follow(self, reply: Any) -> int:
        """Apply ``reply`` and read on until the stream is drained."""
        applied = 0
        while reply:
            events = reply[0][1]
            applied += self._apply(events)
            self._cursor = events[-1][0].decode()
            if len(events) < STREAM_BATCH:
                break
            reply = self.client.xread({STREAM_KEY: self._cursor}, count=STREAM_BATCH)
        return applied

    def _apply(self, events: list[tuple[bytes, dict[bytes, bytes]]]) -> int:
        adds: list[tuple[str, int]] = []
        applied = 0
        with self.lock:
            for _, fields in events:
                scope = fields[b"scope"].decode()
                op = fields[b"op"]
                if op == b"drop":
                    self._pop(scope)
                    applied += 1
                    continue
                index = self.scopes.get(scope)
                if index is None:  # not mirrored here: it will be loaded whole when first used
                    continue
                entry_id = int(fields[b"id"])
                if op == b"add" and entry_id not in index.ids:
                    adds.append((scope, entry_id))
                elif op == b"del":
                    index.remove([entry_id])
                    applied += 1
        if adds:
            pipe = self.client.pipeline(transaction=False)
            for scope, entry_id in adds:
                pipe.hmget(entry_key(scope, entry_id), MIRROR_FIELDS)
            rows = pipe.execute()
            with self.lock:
                for (scope, entry_id), row in zip(adds, rows, strict=True):
                    index = self.scopes.get(scope)
                    if row[0] is None or index is None:  # deleted since, or scope dropped
                        continue
                    vector = np.frombuffer(row[0], dtype=np.float32)[None, :]
                    index.add([entry_id], vector, [EntryMeta.from_row(row)])
                    applied += 1
                self.enforce_cap()
        return applied

    def check_trimmed(self) -> None:
        """If the stream was trimmed past our cursor we missed events: reload mirrors lazily."""
        self._last_trim_check = time.monotonic()
        first = self.guard.call("semantic.trim_check", self.client.xrange, STREAM_KEY, "-", "+", 1)
        if first and self._cursor not in ("$", "0-0") and _id_lt(self._cursor, first[0][0].decode()):
            self.reset()

    # -- scopes ---------------------------------------------------------------------------------
    def get(self, scope: str) -> ScopeIndex | None:
        """The scope's mirror, now the most recently used one (None when not mirrored here)."""
        with self.lock:
            index = self.scopes.pop(scope, None)
            if index is not None:
                self.scopes[scope] = index
            return index

    def load(self, scope: str) -> ScopeIndex:
        """A scope's snapshot from Redis (not yet registered: see :meth:`register`)."""
        index = ScopeIndex(self.dim, self.use_gpu)
        if self._cursor == "$":
            # After a reset the next sync would follow the stream from its end *then*, skipping
            # what is stored between this snapshot and that sync: follow it from here instead.
            last = self.client.xrevrange(STREAM_KEY, count=1)
            with self.lock:
                if self._cursor == "$":
                    self._cursor = last[0][0].decode() if last else "0-0"
        index.loaded_after = self._cursor
        ids = [int(m) for m in self.client.zrange(f"{scope}:lfu", 0, -1)]
        for start in range(0, len(ids), SNAPSHOT_BATCH):
            chunk = ids[start : start + SNAPSHOT_BATCH]
            pipe = self.client.pipeline(transaction=False)
            for entry_id in chunk:
                pipe.hmget(entry_key(scope, entry_id), MIRROR_FIELDS)
            rows = pipe.execute()
            alive = [(i, r) for i, r in zip(chunk, rows, strict=True) if r[0] is not None and not self._expired(r)]
            if alive:
                vectors = np.stack([np.frombuffer(r[0], dtype=np.float32) for _, r in alive])
                index.add([i for i, _ in alive], vectors, [EntryMeta.from_row(r) for _, r in alive])
        return index

    def register(self, scope: str, index: ScopeIndex) -> ScopeIndex:
        """Mirror a loaded scope; events up to the load are in the snapshot, later ones are applied
        on top (adds are idempotent by id, deletes of absent ids no-ops), so the mirror converges.
        If another thread registered it first, that one is kept."""
        with self.lock:
            if scope in self.scopes:
                return self.scopes[scope]
            self.scopes[scope] = index
            index.usage = self.usage
            self.usage.entries += len(index.ids)
            self.usage.bytes += index.nbytes
            self.enforce_cap(keep=scope)
            return index

    def missed_events(self, index: ScopeIndex) -> bool:
        """Whether the mirror followed the stream past where `index`'s snapshot began: its
        events in between were skipped (the scope was not registered yet), see :meth:`catch_up`."""
        return index.loaded_after != self._cursor

    def catch_up(self, scope: str, index: ScopeIndex) -> int:
        """Bring a just-registered scope up to Redis: entries stored while it was loading (their
        "add" events skipped it) are added, entries deleted meanwhile are dropped. Without this a
        replica never proposed such an entry (an exact repeat missed there for good). Returns
        how many entries changed."""
        listed = {int(m) for m in self.client.zrange(f"{scope}:lfu", 0, -1)}
        with self.lock:
            missing = sorted(listed - index.ids)
            # not listed: deleted, or added by an event after the ZRANGE; only Redis tells which
            unlisted = sorted(index.ids - listed)
        if not missing and not unlisted:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for entry_id in missing:
            pipe.hmget(entry_key(scope, entry_id), MIRROR_FIELDS)
        for entry_id in unlisted:
            pipe.exists(entry_key(scope, entry_id))
        replies = pipe.execute()
        rows, exists = replies[: len(missing)], replies[len(missing):]
        changed = 0
        with self.lock:
            if self.scopes.get(scope) is not index:
                return 0  # dropped (or replaced) meanwhile: it reloads whole when used again
            alive = [(i, r) for i, r in zip(missing, rows, strict=True) if r[0] is not None and not self._expired(r)]
            if alive:
                vectors = np.stack([np.frombuffer(r[0], dtype=np.float32) for _, r in alive])
                index.add([i for i, _ in alive], vectors, [EntryMeta.from_row(r) for _, r in alive])
                changed += len(alive)
            dead = [i for i, there in zip(unlisted, exists, strict=True) if not there]
            index.remove(dead)
            changed += len(dead)
            self.enforce_cap(keep=scope)
        return changed

    def remove_entries(self, removed: Sequence[tuple[str, int]], keep: str | None = None) -> None:
        """Drop entries Redis removed (any scope), then hold the cap (sparing ``keep``)."""
        with self.lock:
            for scope, entry_id in removed:
                index = self.scopes.get(scope)
                if index is not None:
                    index.remove([entry_id])
            self.enforce_cap(keep=keep)

    # -- bounded memory -------------------------------------------------------------------------
    def _over(self, entries: int | None = None, nbytes: int | None = None) -> bool:
        entries = self.usage.entries if entries is None else entries
        nbytes = self.usage.bytes if nbytes is None else nbytes
        return (self.max_entries is not None and entries > self.max_entries) or (
            self.max_bytes is not None and nbytes > self.max_bytes
        )

    def enforce_cap(self, keep: str | None = None) -> None:
        """Drop least recently used scopes (never ``keep``) until under the cap; if ``keep`` alone
        is over, its oldest entries go."""
        with self.lock:
            while self._over():
                victim = next((s for s in self.scopes if s != keep), None)
                if victim is None:
                    break
                self._pop(victim)
                self.evicted_scopes += 1
            index = self.scopes.get(keep) if keep is not None else None
            if index is not None and self._over():
                entries, nbytes, victims = self.usage.entries, self.usage.bytes, []
                for i in sorted(index.meta, key=lambda i: index.meta[i].created):
                    if not self._over(entries, nbytes):
                        break
                    victims.append(i)
                    entries, nbytes = entries - 1, nbytes - index.entry_bytes(index.meta[i])
                index.remove(victims)

    def _expired(self, row: Sequence[Any]) -> bool:
        return self.ttl_s is not None and row[4] is not None and float(row[4]) + self.ttl_s <= time.time()

    def sweep_expired(self, limit: int = SWEEP_BATCH) -> int:
        """Drop entries past their TTL, examining at most ``limit``; successive calls walk every
        scope in turn (a cursor), so the lock is held briefly. Empty scopes go too. Returns how
        many entries were dropped."""
        self._last_sweep = time.monotonic()
        if not self.ttl_s:
            return 0
        now, examined, dropped, new_pass = time.time(), 0, 0, False
        with self.lock:
            while examined < limit:
                if not self._sweep_ids:
                    if not self._sweep_scopes:
                        if new_pass:
                            break
                        self._sweep_scopes, new_pass = list(self.scopes), True
                        continue
                    self._sweep_scope = self._sweep_scopes.pop()
                    index = self.scopes.get(self._sweep_scope)
                    if index is not None and not index.ids:
                        self._pop(self._sweep_scope)
                    self._sweep_ids = list(index.meta) if index is not None else []
                    continue
                n = min(limit - examined, len(self._sweep_ids))
                chunk, self._sweep_ids = self._sweep_ids[-n:], self._sweep_ids[:-n]
                examined += n
                index = self.scopes.get(self._sweep_scope)
                if index is None:
                    self._sweep_ids = []
                    continue
                gone = [i for i in chunk if (m := index.meta.get(i)) is not None and m.created + self.ttl_s <= now]
                index.remove(gone)
                dropped += len(gone)
        self.expired += dropped
        return dropped
