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
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import redis

from caches.result import CacheUnavailable, RedisGuard
from caches.semantic.decision import FloorBand
from caches.semantic.store import EPOCH_KEY, STREAM_KEY, entry_key
from caches.vector_index import make_ip_index, on_gpu

SYNC_MIN_INTERVAL_S = 0.1  # a lookup syncs the stream at most this often (the thread does the rest)
TRIM_CHECK_S = 5.0  # how often the background thread checks for a stream trimmed past our cursor
SNAPSHOT_BATCH = 1_000  # entries read per pipeline when a scope is first loaded
STREAM_BATCH = 1_000  # events read per XREAD
# One query at a time is memory-bound: OpenMP threads only add wake-up latency and compete with
# the other replicas for the few cores a Serve replica gets.
FAISS_OMP_THREADS = 1
MIRROR_FIELDS = ["embedding", "query", "response", "tau", "created", "group", "answer_embedding"]
# GPU mirrors: rebuild once removed entries are this share of the index (and at least this many).
TOMBSTONE_FRACTION = 0.2
TOMBSTONE_MIN = 64


@dataclass
class EntryMeta:
    """What the mirror keeps of an entry besides its vector: enough to decide a miss alone.

    ``query``, ``response`` and ``created`` never change (``created`` gives a hit its ``Age``);
    ``tau`` is the last learned threshold seen here.
    """

    query: str
    response: str
    tau: float = -1.0
    created: float = 0.0
    group: int = 0  # judged-equivalent answers share a group (the verified policy's vote)
    answer_vector: np.ndarray | None = None  # the answer's embedding (the answer judge's input)

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> EntryMeta:
        """From an HMGET of :data:`MIRROR_FIELDS` (embedding first, then these six)."""
        answer = np.frombuffer(row[6], dtype=np.float32) if row[6] else None
        return cls(row[1].decode(), row[2].decode(), float(row[3]) if row[3] is not None else -1.0,
                   float(row[4]) if row[4] is not None else 0.0, int(row[5]) if row[5] else 0, answer)


@dataclass
class ScopeIndex:
    """One scope's vectors and entry metadata, plus the floor learned for it here (verified mode).

    On a GPU (``use_gpu`` and one visible, see :mod:`caches.vector_index`) the flat index cannot
    ``remove_ids``: removed entries become tombstones, filtered out of every search, and the index
    is rebuilt from its live vectors once tombstones pass :data:`TOMBSTONE_FRACTION` of it (the
    approach DESIGN.md names for indexes without removal). On the CPU entries are removed at once.
    """

    dim: int
    use_gpu: bool = False
    index: Any = None
    ids: set[int] = field(default_factory=set)
    meta: dict[int, EntryMeta] = field(default_factory=dict)
    band: FloorBand = field(default_factory=FloorBand)
    tombstones: set[int] = field(default_factory=set)
    removable: bool = True  # False: tombstones instead of remove_ids (a GPU index)

    def __post_init__(self) -> None:
        self.index = make_ip_index(self.dim, self.use_gpu)
        self.removable = self.removable and not on_gpu(self.index)

    def add(self, ids: Sequence[int], vectors: np.ndarray, meta: Sequence[EntryMeta]) -> None:
        """Add entries not yet here (idempotent by id, so snapshot and stream may overlap)."""
        fresh = [i for i, entry_id in enumerate(ids) if entry_id not in self.ids]
        if not fresh:
            return
        for i in fresh:
            self.meta[ids[i]] = meta[i]
        # an entry removed and seen again (a reload) is still in the index: revive, do not re-add
        revived = [i for i in fresh if ids[i] in self.tombstones]
        self.tombstones.difference_update(ids[i] for i in revived)
        new = [i for i in fresh if i not in set(revived)]
        if new:
            self.index.add_with_ids(
                np.ascontiguousarray(vectors[new], dtype=np.float32),
                np.asarray([ids[i] for i in new], dtype=np.int64),
            )
        self.ids.update(ids[i] for i in fresh)

    def remove(self, ids: Sequence[int]) -> None:
        gone = [i for i in ids if i in self.ids]
        if not gone:
            return
        self.ids.difference_update(gone)
        for i in gone:
            self.meta.pop(i, None)
        if self.removable:
            self.index.remove_ids(np.asarray(gone, dtype=np.int64))
            return
        self.tombstones.update(gone)
        if len(self.tombstones) > max(TOMBSTONE_MIN, TOMBSTONE_FRACTION * self.index.ntotal):
            self._rebuild()

    def _rebuild(self) -> None:
        """A fresh index of the live vectors only (GPU path: drops every tombstone)."""
        all_ids = faiss.vector_to_array(self.index.id_map)
        vectors = self.index.index.reconstruct_n(0, self.index.ntotal) if self.index.ntotal else None
        live = np.asarray([j for j, i in enumerate(all_ids) if int(i) not in self.tombstones], dtype=np.int64)
        self.index = make_ip_index(self.dim, self.use_gpu)
        if vectors is not None and len(live):
            self.index.add_with_ids(np.ascontiguousarray(vectors[live]), all_ids[live])
        self.tombstones.clear()

    def search(self, vec: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The ``k`` nearest (id, cosine), nearest first; empty when the scope is."""
        if self.index.ntotal == 0:
            return []
        wanted = min(k + len(self.tombstones), self.index.ntotal)
        sims, ids = self.index.search(vec[None, :], wanted)
        found = [(int(i), float(s)) for i, s in zip(ids[0], sims[0], strict=True)
                 if i >= 0 and int(i) not in self.tombstones]
        return found[:k]


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
        guard: RedisGuard,
        *,
        queue_writes: Callable[[Any], None],
        on_reset: Callable[[], None],
        use_gpu: bool = False,
    ) -> None:
        faiss.omp_set_num_threads(FAISS_OMP_THREADS)
        self.client = client
        self.dim = dim
        self.use_gpu = use_gpu  # mirrors on the GPU when one is visible (caches.vector_index)
        self.guard = guard
        self.lock = threading.RLock()
        self.scopes: dict[str, ScopeIndex] = {}
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
            self.scopes.clear()
            self._on_reset()
            self._cursor = "$"
            self._epoch = None
            self.needs_reset = False

    def drop(self, scopes: set[str]) -> None:
        with self.lock:
            for scope in scopes:
                self.scopes.pop(scope, None)

    def start(self, interval_s: float) -> None:
        """Sync and (every :data:`TRIM_CHECK_S`) check for trimming in a thread, every ``interval_s``."""
        if self._thread and self._thread.is_alive():
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.guard.call(self.sync)
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
            pipe.xread({STREAM_KEY: self._cursor}, count=STREAM_BATCH)
            replies = pipe.execute()
            epoch, reply = replies[-2], replies[-1]
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
                    self.scopes.pop(scope, None)
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
        return applied

    def check_trimmed(self) -> None:
        """If the stream was trimmed past our cursor we missed events: reload mirrors lazily."""
        self._last_trim_check = time.monotonic()
        first = self.guard.call(lambda: self.client.xrange(STREAM_KEY, count=1))
        if first and self._cursor not in ("$", "0-0") and _id_lt(self._cursor, first[0][0].decode()):
            self.reset()

    # -- scopes ---------------------------------------------------------------------------------
    def get(self, scope: str) -> ScopeIndex | None:
        with self.lock:
            return self.scopes.get(scope)

    def load(self, scope: str) -> ScopeIndex:
        """A scope's snapshot from Redis (not yet registered: see :meth:`register`)."""
        index = ScopeIndex(self.dim, self.use_gpu)
        ids = [int(m) for m in self.client.zrange(f"{scope}:lfu", 0, -1)]
        for start in range(0, len(ids), SNAPSHOT_BATCH):
            chunk = ids[start : start + SNAPSHOT_BATCH]
            pipe = self.client.pipeline(transaction=False)
            for entry_id in chunk:
                pipe.hmget(entry_key(scope, entry_id), MIRROR_FIELDS)
            rows = pipe.execute()
            alive = [(i, r) for i, r in zip(chunk, rows, strict=True) if r[0] is not None]
            if alive:
                vectors = np.stack([np.frombuffer(r[0], dtype=np.float32) for _, r in alive])
                index.add([i for i, _ in alive], vectors, [EntryMeta.from_row(r) for _, r in alive])
        return index

    def register(self, scope: str, index: ScopeIndex) -> ScopeIndex:
        """Mirror a loaded scope; events up to the load are in the snapshot, later ones are applied
        on top (adds are idempotent by id, deletes of absent ids no-ops), so the mirror converges.
        If another thread registered it first, that one is kept."""
        with self.lock:
            return self.scopes.setdefault(scope, index)
