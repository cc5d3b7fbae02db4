"""How TieredCache (caches/tiered.py) moves bytes between its tiers: the placement's promotions
and demotions, and the SSD's bookkeeping local to this process (recency, budget, TTL groups,
generation checks of what a tier found). A mixin: the attributes are TieredCache's own.

The SSD is best effort, like RAM: a refused SSD write (a full disk) is logged and counted, never
raised to the reader, and the rows it refused are not placed in RAM either (a RAM copy always has
its SSD copy first: see the crash-safety note in caches/tiered.py).

Expiry: every row carries the absolute expiry it got when it was read from the cold tier (or
stored by `put_many`): now + its namespace's TTL (`_ttl_for`). A promotion (SSD -> RAM) and a
demotion (RAM -> SSD) write the copy with that same expiry, read from the tier it comes from
(`TierRead.expires_at`), never with a fresh TTL: else a chain of moves kept a row alive long
after its TTL, and a row changed at the source without an invalidation was served stale for as
long as the moves went on. A row whose expiry has passed by the move is not moved. A cache
without a cold tier (`ttl_from_source` False: values that never go stale) starts the TTL again
with each move instead."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from caches import metrics
from caches.admission import PlacementPolicy
from caches.generations import Generations, split_by_generation, unframe
from caches.recency import RecencyOrder
from caches.tiered_stats import TieredStats
from caches.tiers.base import NO_EXPIRY, TierUnavailable, expired
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
    ttl_from_source: bool
    generations: Generations | None
    counters: TieredStats
    before_upper_delete: Callable[[list[str]], None] | None
    _recency: RecencyOrder

    # -- placement -----------------------------------------------------------------------------
    def _place(self, candidates: dict[str, bytes], expires_at: Mapping[str, float]) -> None:
        """Place `candidates` in RAM as the policy decides, each with its absolute expiry from
        `expires_at` (every candidate's: the time it has left, not a fresh TTL; no default, as a
        forgotten one would mean a row that never expires); demote what the policy evicts."""
        assert self.ram is not None and self.policy is not None
        now = time.time()
        # Expired since it was read: served this once, but not moved (the policy never sees it).
        candidates = {k: v for k, v in candidates.items() if not expired(expires_at[k], now)}
        if not candidates:
            return
        placement = self.policy.admit({k: len(k) + len(v) for k, v in candidates.items()})
        admitted = {k: candidates[k] for k in placement.admitted}
        if placement.demoted and self.ssd is not None:
            need = [k for k in placement.demoted if k not in self.ssd]
            if need:
                try:
                    found = self.ram.get_many(need)  # each value with the expiry it has in RAM
                except TierUnavailable:
                    self._undo_admission(list(admitted))
                    raise
                # An expired RAM copy is not moved: the RAM delete below drops it, the row is gone.
                read_at = time.time()
                held = {k: v for k, v in found.items() if not expired(found.expires_at[k], read_at)}
                kept = found.expires_at if self.ttl_from_source else self._fresh_expiry(list(held))
                stored = self._ssd_put(held, kept)  # 1. lower tier first
                if len(stored) < len(held):
                    # Deleting their RAM copy now would leave them in neither tier: stop before
                    # RAM changes. The policy already counts the admitted rows as resident: undo.
                    self._undo_admission(list(admitted))
                    raise TierUnavailable(f"SSD refused {len(held) - len(stored)} demoted rows: placement skipped")
        if placement.demoted and self.before_upper_delete is not None:
            self.before_upper_delete(placement.demoted)
        try:
            admitted = self._write_ram(admitted, placement.demoted, expires_at)
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

    def _write_ram(self, admitted: dict[str, bytes], demoted: list[str],
                   expires_at: Mapping[str, float]) -> dict[str, bytes]:
        """The placement's RAM side: write the admitted rows, each expiring when its copy below
        does (`expires_at`: one batch mixes TTLs, so one round trip whatever the namespaces),
        and delete the demoted ones (after their SSD copies); returns the admitted rows actually
        written."""
        assert self.ram is not None and self.policy is not None
        expiry = {k: expires_at[k] for k in admitted}
        if self.generations is not None:
            # Each write compared with its generation, in the script that writes it.
            gen_key = self.generations.key_of
            expect = {k: (gen_key(k), unframe(v)[0]) for k, v in admitted.items()}
            refused = self.ram.put_checked(admitted, demoted, expect, expires_at=expiry)
            if refused:
                self.policy.remove(refused)  # not written: the placement must not count them
                self.counters.generation_refused += len(refused)
                admitted = {k: v for k, v in admitted.items() if k not in set(refused)}
        else:
            # 2. upper tier second; the admitted values travel in the same round trip.
            self.ram.put_and_delete(admitted, demoted, expires_at=expiry)
        return admitted

    def _undo_admission(self, keys: list[str]) -> None:
        if self.policy is not None and keys:
            with contextlib.suppress(TierUnavailable):  # Redis down too: the metadata is refreshed on later reads
                self.policy.remove(keys)

    # -- SSD bookkeeping (local to this process) ---------------------------------------------
    def _ssd_put(self, items: dict[str, bytes], expires_at: Mapping[str, float]) -> set[str]:
        """Write to the SSD, each row with its absolute expiry from `expires_at` (one batch, one
        write); returns the keys that landed (all, unless the disk refused them)."""
        if self.ssd is None or not items:
            return set()
        try:
            self.ssd.put_many(items, expires_at={k: expires_at[k] for k in items})
        except TierUnavailable as exc:
            log.warning("SSD tier refused %d rows: %s", len(items), exc)
            self.counters.ssd_errors += 1
            # A put may replace a value: the older SSD copy must not be served in its place. The
            # tier forgets it even when the disk refuses this delete too (rocksdb.py's module note).
            with contextlib.suppress(TierUnavailable):
                self.ssd.delete_many(list(items))
            self._recency.forget(list(items))
            return set()
        self._recency.added(items)
        return set(items)

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

    def _fresh_expiry(self, keys: Sequence[str]) -> dict[str, float]:
        """The absolute expiry of rows read from the source (the cold tier) or stored from above
        the cache just now: now + their namespace's TTL (NO_EXPIRY without one). The only place a
        TTL starts; every later copy of the row keeps this expiry."""
        now = time.time()
        out: dict[str, float] = {}
        for k in keys:
            ttl = self._ttl_for(k)
            out[k] = now + ttl if ttl else NO_EXPIRY
        return out

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
