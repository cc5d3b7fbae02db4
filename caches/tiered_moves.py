"""How TieredCache (caches/tiered.py) moves bytes between its tiers: the placement's promotions
and demotions, and the SSD's bookkeeping local to this process (recency, budget, TTL groups,
generation checks of what a tier found). A mixin: the attributes are TieredCache's own.

The SSD is best effort, like RAM: a refused SSD write (a full disk) is logged and counted, never
raised to the reader, and the rows it refused are not placed in RAM either (a RAM copy always has
its SSD copy first: see the crash-safety note in caches/tiered.py)."""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence

from caches import metrics
from caches.admission import PlacementPolicy
from caches.generations import Generations, split_by_generation, unframe
from caches.recency import RecencyOrder
from caches.tiered_stats import TieredStats
from caches.tiers.base import Tier, TierUnavailable
from caches.tiers.redis import RedisTier
from caches.tiers.rocksdb import RocksDBTier

log = logging.getLogger(__name__)

# SSD drops are batched: deleting one key per over-budget check would write a batch per read.
SSD_DROP_BATCH = 64


class TierMoves:
    # Set by TieredCache.__init__ (caches/tiered.py).
    ram: RedisTier | None
    ssd: RocksDBTier | None
    policy: PlacementPolicy | None
    ssd_budget: int
    ttl: float | dict[str, float] | None
    generations: Generations | None
    counters: TieredStats
    before_upper_delete: Callable[[list[str]], None] | None
    _recency: RecencyOrder

    # -- placement -----------------------------------------------------------------------------
    def _place(self, candidates: dict[str, bytes]) -> None:
        assert self.ram is not None and self.policy is not None
        placement = self.policy.admit({k: len(k) + len(v) for k, v in candidates.items()})
        admitted = {k: candidates[k] for k in placement.admitted}
        if placement.demoted and self.ssd is not None:
            need = [k for k in placement.demoted if k not in self.ssd]
            if need:
                try:
                    held = self.ram.get_many(need)
                except TierUnavailable:
                    self._undo_admission(list(admitted))
                    raise
                stored = self._ssd_put(held)  # 1. lower tier first
                if len(stored) < len(held):
                    # Deleting their RAM copy now would leave them in neither tier: stop before
                    # RAM changes. The policy already counts the admitted rows as resident: undo.
                    self._undo_admission(list(admitted))
                    raise TierUnavailable(f"SSD refused {len(held) - len(stored)} demoted rows: placement skipped")
        if placement.demoted and self.before_upper_delete is not None:
            self.before_upper_delete(placement.demoted)
        try:
            admitted = self._write_ram(admitted, placement.demoted)
        except TierUnavailable:
            # The policy already counts the admitted rows as resident and has forgotten the
            # demoted ones: take the admitted back (they were not written), and try to delete the
            # demoted (their SSD copy is in place). What Redis refuses now stays until its TTL.
            self._undo_admission(list(admitted))
            with contextlib.suppress(TierUnavailable):
                self.ram.delete_many(placement.demoted)
            raise
        metrics.count_by_namespace(metrics.PROMOTIONS, self.ram.name, list(admitted))
        metrics.count_by_namespace(metrics.DEMOTIONS, self.ram.name, placement.demoted)
        self.counters.promotions += len(admitted)
        self.counters.demotions += len(placement.demoted)

    def _write_ram(self, admitted: dict[str, bytes], demoted: list[str]) -> dict[str, bytes]:
        """The placement's RAM side: write the admitted rows, delete the demoted ones (after their
        SSD copies); returns the admitted rows actually written."""
        assert self.ram is not None and self.policy is not None
        if self.generations is not None:
            # Each write compared with its generation, in the script that writes it.
            gen_key = self.generations.key_of
            expect = {k: (gen_key(k), unframe(v)[0]) for k, v in admitted.items()}
            refused: list[str] = []
            groups = self._by_ttl(admitted)
            for i, (ttl, group) in enumerate(groups.items()):
                last = i == len(groups) - 1
                refused += self.ram.put_checked(group, demoted if last else [], expect, ttl_s=ttl)
            if not groups:
                self.ram.delete_many(demoted)
            if refused:
                self.policy.remove(refused)  # not written: the placement must not count them
                self.counters.generation_refused += len(refused)
                admitted = {k: v for k, v in admitted.items() if k not in set(refused)}
        elif isinstance(self.ttl, dict):
            self._grouped_put(self.ram, admitted)
            self.ram.delete_many(demoted)  # 2. upper tier second
        else:
            # 2. upper tier second; the admitted values travel in the same round trip.
            self.ram.put_and_delete(admitted, demoted, ttl_s=self.ttl)
        return admitted

    def _undo_admission(self, keys: list[str]) -> None:
        if self.policy is not None and keys:
            with contextlib.suppress(TierUnavailable):  # Redis down too: the metadata is refreshed on later reads
                self.policy.remove(keys)

    # -- SSD bookkeeping (local to this process) ---------------------------------------------
    def _ssd_put(self, items: dict[str, bytes]) -> set[str]:
        """Write to the SSD; returns the keys that landed (all, unless the disk refused some)."""
        if self.ssd is None or not items:
            return set()
        stored: set[str] = set()
        refused: list[str] = []
        for ttl, group in self._by_ttl(items).items():
            try:
                self.ssd.put_many(group, ttl_s=ttl)
            except TierUnavailable as exc:
                log.warning("SSD tier refused %d rows: %s", len(group), exc)
                self.counters.ssd_errors += 1
                refused += group
            else:
                stored.update(group)
        if refused:
            # A put may replace a value: the older SSD copy must not be served in its place. The
            # tier forgets it even when the disk refuses this delete too (rocksdb.py's module note).
            with contextlib.suppress(TierUnavailable):
                self.ssd.delete_many(refused)
            self._recency.forget(refused)
        self._recency.added(stored)
        return stored

    def _ssd_delete(self, keys: list[str]) -> None:
        """Delete from the SSD; a refusal is logged, not raised: the tier has forgotten the keys
        all the same (never served again, the disk delete retried with a later write)."""
        if self.ssd is None or not keys:
            return
        try:
            self.ssd.delete_many(keys)
        except TierUnavailable as exc:
            log.warning("SSD tier refused deleting %d rows (forgotten, retried later): %s", len(keys), exc)
            self.counters.ssd_errors += 1

    def _touch_ssd(self, keys: Sequence[str]) -> None:
        if self.ssd is not None:
            self._recency.touched(keys)

    def _enforce_ssd_budget(self) -> None:
        if self.ssd is None or self.ssd.size_bytes() <= self.ssd_budget:
            return
        drop = self._recency.coldest(self.ssd.size_bytes() - self.ssd_budget, self.ssd.entry_size, SSD_DROP_BATCH // 4)
        self._ssd_delete(drop)
        metrics.count_by_namespace(metrics.DROPS, self.ssd.name, drop)
        self.counters.ssd_drops += len(drop)

    def _ttl_for(self, key: str) -> float | None:
        if isinstance(self.ttl, dict):
            return self.ttl.get(metrics.namespace_of(key))
        return self.ttl

    def _by_ttl(self, items: dict[str, bytes]) -> dict[float | None, dict[str, bytes]]:
        groups: dict[float | None, dict[str, bytes]] = defaultdict(dict)
        for k, v in items.items():
            groups[self._ttl_for(k)][k] = v
        return groups

    def _grouped_put(self, tier: Tier, items: dict[str, bytes]) -> None:
        for ttl, group in self._by_ttl(items).items():
            tier.put_many(group, ttl_s=ttl)

    def _current(self, found: dict[str, bytes], gens: dict[str, int] | None,
                 drop_from: RocksDBTier | None = None) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """`split_by_generation`, counting the stale copies and deleting them from `drop_from`
        (the local SSD: a demotion or a fill that lost the race left them)."""
        current, unverified, stale = split_by_generation(found, gens)
        if stale:
            self.counters.generation_stale += len(stale)
            if drop_from is not None:
                if drop_from is self.ssd:
                    self._ssd_delete(stale)
                else:
                    drop_from.delete_many(stale)
                self._recency.forget(stale)
        return current, unverified
