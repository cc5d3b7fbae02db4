"""How TieredCache (caches/tiered.py) moves bytes between its tiers: the placement's promotions
and demotions, and the SSD's bookkeeping local to this process (recency, budget, TTL groups,
generation checks of what a tier found). A mixin: the attributes are TieredCache's own."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

from caches import metrics
from caches.admission import PlacementPolicy
from caches.generations import Generations, split_by_generation, unframe
from caches.recency import RecencyOrder
from caches.tiered_stats import TieredStats
from caches.tiers.base import Tier
from caches.tiers.redis import RedisTier
from caches.tiers.rocksdb import RocksDBTier

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
        if placement.demoted and self.ssd is not None:
            need = [k for k in placement.demoted if k not in self.ssd]
            if need:
                self._ssd_put(self.ram.get_many(need))  # 1. lower tier first
        admitted = {k: candidates[k] for k in placement.admitted}
        if placement.demoted and self.before_upper_delete is not None:
            self.before_upper_delete(placement.demoted)
        if self.generations is not None:
            # Each write compared with its generation, in the script that writes it.
            gen_key = self.generations.key_of
            expect = {k: (gen_key(k), unframe(v)[0]) for k, v in admitted.items()}
            refused: list[str] = []
            groups = self._by_ttl(admitted)
            for i, (ttl, group) in enumerate(groups.items()):
                last = i == len(groups) - 1
                refused += self.ram.put_checked(group, placement.demoted if last else [], expect, ttl_s=ttl)
            if not groups:
                self.ram.delete_many(placement.demoted)
            if refused:
                self.policy.remove(refused)  # not written: the placement must not count them
                self.counters.generation_refused += len(refused)
                admitted = {k: v for k, v in admitted.items() if k not in set(refused)}
        elif isinstance(self.ttl, dict):
            self._grouped_put(self.ram, admitted)
            self.ram.delete_many(placement.demoted)  # 2. upper tier second
        else:
            # 2. upper tier second; the admitted values travel in the same round trip.
            self.ram.put_and_delete(admitted, placement.demoted, ttl_s=self.ttl)
        metrics.count_by_namespace(metrics.PROMOTIONS, self.ram.name, list(admitted))
        metrics.count_by_namespace(metrics.DEMOTIONS, self.ram.name, placement.demoted)
        self.counters.promotions += len(admitted)
        self.counters.demotions += len(placement.demoted)

    # -- SSD bookkeeping (local to this process) ---------------------------------------------
    def _ssd_put(self, items: dict[str, bytes]) -> None:
        if self.ssd is None or not items:
            return
        self._grouped_put(self.ssd, items)
        self._recency.added(items)

    def _touch_ssd(self, keys: Sequence[str]) -> None:
        if self.ssd is not None:
            self._recency.touched(keys)

    def _enforce_ssd_budget(self) -> None:
        if self.ssd is None or self.ssd.size_bytes() <= self.ssd_budget:
            return
        drop = self._recency.coldest(self.ssd.size_bytes() - self.ssd_budget, self.ssd.entry_size, SSD_DROP_BATCH // 4)
        self.ssd.delete_many(drop)
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
                drop_from.delete_many(stale)
                self._recency.forget(stale)
        return current, unverified
