"""One scope's FAISS mirror on one replica (:class:`ScopeIndex`) and the replica's totals.

Split from :mod:`caches.semantic.mirror` (which keeps the mirrors current from the stream and holds
them under the per-replica cap); the memory estimate here is what that cap counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from caches import vector_index
from caches.semantic.decision import FloorBand
from caches.vector_index import make_ip_index, on_gpu

# GPU mirrors: rebuild once removed entries are this share of the index (and at least this many).
TOMBSTONE_FRACTION = 0.2
TOMBSTONE_MIN = 64
# Mirror memory estimate (bytes): per entry besides vector and texts (FAISS id map, dict and set
# slots, EntryMeta), and per scope (its FAISS index, dicts, learned band): a flood of one-entry
# scopes must count too.
MIRROR_ENTRY_OVERHEAD = 256
MIRROR_SCOPE_OVERHEAD = 4096


@dataclass
class MirrorUsage:
    """Entries and estimated bytes of every registered scope of one replica."""

    entries: int = 0
    bytes: int = 0


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
        answer = np.frombuffer(row[6], dtype=np.float32) if len(row) > 6 and row[6] else None
        return cls(row[1].decode(), row[2].decode(), float(row[3]) if row[3] is not None else -1.0,
                   float(row[4]) if row[4] is not None else 0.0,
                   int(row[5]) if len(row) > 5 and row[5] else 0, answer)


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
    nbytes: int = MIRROR_SCOPE_OVERHEAD  # estimated memory (see MIRROR_ENTRY_OVERHEAD)
    usage: MirrorUsage | None = None  # the replica's totals, once registered
    # The mirror's stream cursor when this scope's snapshot began (caches/semantic/mirror.py
    # `load`): events the mirror follows past it before the scope is registered skip it.
    loaded_after: str | None = None

    def entry_bytes(self, meta: EntryMeta) -> int:
        answer = meta.answer_vector.nbytes if meta.answer_vector is not None else 0
        return 4 * self.dim + len(meta.query) + len(meta.response) + answer + MIRROR_ENTRY_OVERHEAD

    def _count(self, entries: int, nbytes: int) -> None:
        self.nbytes += nbytes
        if self.usage is not None:
            self.usage.entries += entries
            self.usage.bytes += nbytes

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
        self._count(len(fresh), sum(self.entry_bytes(meta[i]) for i in fresh))
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
        freed = 0
        for i in gone:
            m = self.meta.pop(i, None)
            freed += self.entry_bytes(m) if m is not None else 0
        self._count(-len(gone), -freed)
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
        if self.tombstones and k + len(self.tombstones) > vector_index.GPU_MAX_K:
            # A GPU index answers at most GPU_MAX_K neighbours, and the tombstones are searched
            # past: a scope over ~10k entries reaches that before the fraction rebuild point.
            self._rebuild()
        wanted = min(k + len(self.tombstones), self.index.ntotal)
        sims, ids = self.index.search(vec[None, :], wanted)
        found = [(int(i), float(s)) for i, s in zip(ids[0], sims[0], strict=True)
                 if i >= 0 and int(i) not in self.tombstones]
        return found[:k]
