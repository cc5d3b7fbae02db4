"""TieredCache: RAM (Redis, shared) -> SSD (RocksDB, per process) -> cold (Feast or nothing).

Why it is built this way:
- Batched lookup down the tiers: one Redis round trip, one RocksDB multi-get, one cold call per batch.
- Placement is delegated to a `PlacementPolicy` (caches/admission/): by default the
  cluster-wide W-TinyLFU whose sketch and metadata live in the same Redis as the RAM tier. The
  cache only moves bytes the policy decided to move. Baselines (LRU, Belady in benchmarks/) plug in unchanged.
- SSD is filled on every cold read (inclusive) and receives every RAM demotion that it does not
  already hold. It drops its coldest entries (least recently read, across all tiers, in this
  process) when over its byte budget: the cold tier still has them. Because SSD recency follows
  every read and not only RAM misses, the RAM policy cannot make SSD worse: tierserve's cold
  reads never exceed LRU's for the same SSD budget.
- Crash safety: a demotion writes the SSD copy first and deletes the RAM copy second. A SIGKILL
  in between leaves the entry in both tiers (a duplicate that the next admission or TTL cleans),
  never in neither. Tests inject `before_upper_delete` (a callable) to kill a process right there.
- Failure: RAM unavailable -> reads fall through to SSD and cold, the policy buffers access
  counts locally, callers get `degraded=True` and no exception; the Redis client reconnects by
  itself once the breaker reopens. SSD unavailable (a full or broken disk: rocksdict's IO errors
  are `TierUnavailable`) -> the same: an SSD read that fails is a miss answered by the cold tier,
  a refused SSD write is skipped (`degraded=True`), and a row the SSD refused is not placed in
  RAM either (the crash-safety order below needs its SSD copy first); each call tries the disk
  again, so the cache recovers by itself when the disk does. Cold unavailable -> what the upper
  tiers hold is served, the rest is reported missing.
- Upkeep: the RAM tier's byte total and sizes hash are kept by its scripts, but Redis expires
  values by TTL without telling them, so they would drift upward for ever (reporting a full RAM
  that is empty). `maintain()` forgets the sizes of expired values, a bounded slice per call
  (HSCAN cursors kept between calls), and `open()` runs it on a daemon thread every
  `maintain_every_s` seconds; Redis errors are swallowed there and retried on the next round.
- Invalidation: delete the shared RAM copy, the placement metadata and the local SSD copy, and
  publish the keys on the stream so every other replica drops its SSD copy (and the RAM copy
  again, which closes the race where a replica re-promoted an old SSD copy meanwhile).
- TTL per namespace (the key's first part), applied in RAM (PX) and SSD (expiry header). With a
  cold tier it starts when a row is read from it (or stored by `put_many`) and is not restarted
  by a move between RAM and SSD: each copy keeps the row's absolute expiry (caches/tiered_moves.py),
  so no row is served longer than its TTL after the cold read that brought it in. For values
  that never go stale (the embeddings, `ttl_from_source=False`) a move starts it again.
- Generation-checked writes (optional, `generations`; the user feature rows): every value carries
  its entity's generation as read before the value was read, a RAM write lands only while that
  generation is current (one Lua compare-and-write) and a copy of another generation is never
  served from any tier; `invalidate(bump=True)` moves the generations first. Why, and the rules
  when Redis is down: caches/generations.py.

The moves between tiers (placement, SSD bookkeeping) are in caches/tiered_moves.py, the read's
result and the counters in caches/tiered_stats.py.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from caches.admission import PlacementPolicy, SharedWTinyLFU, WTinyLFU, WTinyLFUConfig
from caches.generations import (
    UNKNOWN,
    Generations,
    GenerationsUnavailable,
    frame,
    unframe,
)
from caches.invalidation import InvalidationBus, InvalidationEvent
from caches.recency import RecencyOrder
from caches.tiered_moves import TierMoves
from caches.tiered_stats import TieredResult, TieredStats
from caches.tiers.base import Tier, TierUnavailable
from caches.tiers.redis import RedisTier, shards_for
from caches.tiers.rocksdb import RocksDBTier, claim_dir, reclaim_dead_dirs

# What callers outside caches/ need of the tiers, so that they never import caches.tiers directly:
# the failure type, and claiming / reclaiming a process's own SSD directory.
__all__ = ["TieredCache", "TierUnavailable", "claim_dir", "reclaim_dead_dirs"]

log = logging.getLogger(__name__)

# How often open()'s caches run `maintain()`, and how many bounded reconcile steps (one HSCAN
# page and one short script each, RedisTier.reconcile_step) one run may take: separate calls, so
# Redis serves everyone else in between, and ~2,000 sizes a second per replica keeps up with
# what expires in a RAM budget of some millions of entries.
MAINTAIN_EVERY_S = 1.0
MAINTAIN_STEPS = 8


class TieredCache(TierMoves):
    def __init__(
        self,
        *,
        ram: RedisTier | None,
        ssd: RocksDBTier | None,
        cold: Tier | None = None,
        policy: PlacementPolicy | None = None,
        ssd_budget_bytes: int,
        ttl_s: float | dict[str, float] | None = None,
        bus: InvalidationBus | None = None,
        name: str = "tiered",
        generations: Generations | None = None,
        ttl_from_source: bool = True,
    ) -> None:
        if ram is not None and policy is None:
            raise ValueError("a RAM tier needs a placement policy")
        self.name = name
        self.ram, self.ssd, self.cold, self.policy = ram, ssd, cold, policy
        self.ssd_budget = ssd_budget_bytes
        self.ttl = ttl_s
        # Whether a row's TTL counts from its read from the cold tier (or its put) and every move
        # keeps it (a source whose rows change: the TTL bounds how old a served row can be), or
        # starts again with each move (values that never go stale, the embeddings: the TTL only
        # ends entries nobody reads).
        self.ttl_from_source = ttl_from_source
        self.bus = bus
        self.generations = generations
        # Entries left by a previous run of this process come first in the order: oldest of all.
        self._recency = RecencyOrder(ssd.keys() if ssd is not None else (),  # noqa: SIM118 (a method)
                                     held=ssd.__contains__ if ssd is not None else None)
        self.counters = TieredStats(ssd_budget_bytes=ssd_budget_bytes)
        # Called with the demoted keys between the SSD write and the RAM delete of a demotion:
        # tests inject a callable here to crash a process at that point. None in production.
        self.before_upper_delete: Callable[[list[str]], None] | None = None
        if bus is not None:
            bus.subscribe(self._on_event)
        self._maintain_stop = threading.Event()
        self._maintainer: threading.Thread | None = None

    def start_maintenance(self, every_s: float = MAINTAIN_EVERY_S) -> None:
        """Run `maintain()` every `every_s` seconds on a daemon thread until `close()`."""
        if self._maintainer is not None or self.ram is None:
            return

        def run() -> None:
            while not self._maintain_stop.wait(every_s):
                try:
                    self.maintain()
                except Exception:  # noqa: BLE001 - upkeep must outlive any one bad round
                    log.exception("tiered cache %s: maintenance round failed", self.name)

        self._maintainer = threading.Thread(target=run, name=f"tierserve-maintain-{self.name}", daemon=True)
        self._maintainer.start()

    def maintain(self, steps: int = MAINTAIN_STEPS) -> int:
        """One bounded round of upkeep: forget the RAM sizes of values Redis expired by TTL (up to
        `steps` slices of the sizes hash, resumed where the last round stopped; a round ends
        early once the sweep has wrapped), then the same for the placement policy's entries
        (PlacementPolicy.reconcile_step: else it counts expired values as resident until they
        are read again, and demotes for room that is free). Returns how many RAM sizes were
        forgotten. Never raises TierUnavailable: a Redis outage only postpones it to the next
        round."""
        if self.ram is None:
            return 0
        ram = self.ram
        n = self._sweep("RAM reconcile", ram.reconcile_step, lambda: ram.reconcile_wrapped, steps)
        self.counters.ram_reconciled += n
        if self.policy is not None:
            # A sweep of its own (its own cursor): the tier's byte total and the policy's are
            # kept apart, and an outage of one call must not skip the other.
            policy = self.policy
            forgotten = self._sweep("placement reconcile", policy.reconcile_step,
                                    lambda: policy.reconcile_wrapped, steps)
            if forgotten:
                log.debug("tiered cache %s: placement forgot %d expired entries", self.name, forgotten)
        return n

    def _sweep(self, what: str, step: Callable[[], int], wrapped: Callable[[], bool], steps: int) -> int:
        """Up to `steps` bounded steps, fewer once the sweep has wrapped; a Redis outage ends the
        round early (the next round resumes). Returns the sum of what the steps returned."""
        done = 0
        try:
            for _ in range(steps):
                done += step()
                if wrapped():
                    break
        except TierUnavailable as exc:
            log.debug("tiered cache %s: %s postponed: %s", self.name, what, exc)
        return done

    # ------------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        *,
        redis_url: str,
        rocksdb_dir: Path | str,
        ram_budget_bytes: int,
        ssd_budget_bytes: int,
        cold: Tier | None = None,
        ttl_s: float | dict[str, float] | None = None,
        name: str = "tiered",
        policy: str = "tierserve",
        entry_bytes: int | None = None,
        invalidation: bool = True,
        generation_of: Callable[[str], str] | None = None,
        maintain_every_s: float | None = MAINTAIN_EVERY_S,
        ttl_from_source: bool = True,
    ) -> TieredCache:
        """The production wiring: shared Redis RAM tier + W-TinyLFU in Redis + local RocksDB.

        Every cache (and every replica of it) with the same `name` shares the RAM budget, the
        placement metadata and the access counts; `rocksdb_dir` must be this process' own.
        `generation_of` (cache key -> its entity's generation counter key) turns on
        generation-checked writes; the counters live in the RAM tier's Redis.
        `maintain_every_s`: how often the upkeep thread runs (`maintain()`); None: no thread,
        the caller runs `maintain()` itself. `ttl_from_source`: see `__init__` (True: the TTL runs
        from the cold read through every move)."""
        cfg = WTinyLFUConfig(ram_budget_bytes, **({"entry_bytes": entry_bytes} if entry_bytes else {}))
        # On a Redis Cluster: hash-tag groups, a key with its generation counter (tiers/redis.py)
        ram = RedisTier(redis_url, meta_prefix=f"tierserve:tier:{name}", group_of=generation_of,
                        shards=shards_for(ram_budget_bytes, cfg.entry_bytes), cache=name)
        pol: PlacementPolicy
        if policy == "tierserve":
            pol = SharedWTinyLFU(ram, cfg, prefix=f"tierserve:placement:{name}")
        elif policy == "local":
            pol = WTinyLFU(cfg)
        else:
            raise ValueError(f"unknown policy {policy!r}")
        ssd = RocksDBTier(rocksdb_dir, cache=name)
        bus = InvalidationBus(redis_url, stream=f"tierserve:invalidations:{name}") if invalidation else None
        # a counter outlives every copy it tags while its entity is read: the longest row TTL
        counter_ttl = max(ttl_s.values(), default=None) if isinstance(ttl_s, dict) else ttl_s
        gens = (Generations(ram.client, generation_of, redis_name=ram.counter_name, ttl_s=counter_ttl)
                if generation_of is not None else None)
        cache = cls(ram=ram, ssd=ssd, cold=cold, policy=pol, ssd_budget_bytes=ssd_budget_bytes,
                    ttl_s=ttl_s, bus=bus, name=name, generations=gens, ttl_from_source=ttl_from_source)
        if maintain_every_s is not None:
            cache.start_maintenance(maintain_every_s)
        return cache

    # -- reads ---------------------------------------------------------------------------------
    def get_many(self, keys: Sequence[str], generations: Mapping[str, int] | None = None) -> TieredResult:
        """`generations`: the keys' generations as the caller read them before this call (one
        round trip saved, and the caller's own answer is then keyed on the same ones); read
        here when not given. Only for a generation-checked cache."""
        keys = list(dict.fromkeys(keys))
        degraded = False
        checked = self.generations is not None and bool(keys)
        gens: dict[str, int] | None = None
        if checked:
            assert self.generations is not None
            try:
                # Before any tier is read: a value tagged with these was read after them.
                known = generations or {}
                gens = ({k: known[k] for k in keys} if all(k in known for k in keys)
                        else self.generations.read(keys))
            except GenerationsUnavailable:
                degraded = True
        ram_hits: dict[str, bytes] = {}
        ram_ok = self.ram is not None
        recorded = False
        if self.ram is not None and keys:
            try:
                # One round trip where the policy can: its script reads the values and records the accesses.
                t0 = time.perf_counter()
                # A lookup that raises has buffered the reads it must count itself (or its script
                # may have run, its reply lost): recording them again would count them twice.
                recorded = self.policy is not None
                fused = self.policy.lookup(self.ram, keys) if self.policy is not None else None
                recorded = fused is not None  # None: this policy does not read RAM; record below
                if fused is not None:
                    ram_hits = fused
                    self.ram.account_read(keys, ram_hits, time.perf_counter() - t0)
                else:
                    ram_hits = self.ram.get_many(keys)
            except TierUnavailable:
                ram_ok, degraded = False, True
        if self.policy is not None and keys and not recorded:
            try:
                self.policy.record(keys, set(ram_hits))
            except TierUnavailable:
                ram_ok, degraded = False, True

        unverified: dict[str, bytes] = {}
        if checked:
            ram_hits, _ = self._current(ram_hits, gens)  # RAM copies of another generation: misses
        misses = [k for k in keys if k not in ram_hits]
        ssd_hits: dict[str, bytes] = {}
        # Each SSD row's absolute expiry: a promotion keeps it (the TTL started at the cold read).
        ssd_expiry: dict[str, float] = {}
        if self.ssd is not None and misses:
            try:
                ssd_read = self.ssd.get_many(misses)
                ssd_hits, ssd_expiry = ssd_read, ssd_read.expires_at
            except TierUnavailable as exc:
                # As for RAM: every SSD miss is answered by the cold tier, the read degraded.
                log.warning("SSD tier unavailable: %s", exc)
                self.counters.ssd_errors += 1
                degraded = True
            else:
                if len(ssd_hits) < len(misses):
                    self._recency.forget([k for k in misses if k not in ssd_hits])  # gone (expired) or never held
        if checked:
            ssd_hits, unverified = self._current(ssd_hits, gens, drop_from=self.ssd)
        self._touch_ssd(keys)
        cold_keys = [k for k in misses if k not in ssd_hits]
        cold_hits: dict[str, bytes] = {}
        cold_ok = self.cold is not None
        if self.cold is not None and cold_keys:
            try:
                cold_hits = self.cold.get_many(cold_keys)
            except TierUnavailable as exc:
                log.warning("cold tier unavailable: %s", exc)
                degraded, cold_ok = True, False
        if checked:
            cold_hits = {k: frame(gens[k] if gens is not None else UNKNOWN, v) for k, v in cold_hits.items()}
            if not cold_ok:
                # Generations unreadable and no source to ask: the SSD copy, unverified (degraded).
                ssd_hits.update({k: v for k, v in unverified.items() if k not in cold_hits})
        # The TTL of a row starts here, at its read from the source: every copy keeps this expiry.
        cold_expiry = self._fresh_expiry(list(cold_hits))
        ssd_refused = False
        if cold_hits and self.ssd is not None:
            stored = self._ssd_put(cold_hits, cold_expiry)  # lower tier first: the SSD copy exists before RAM's
            if len(stored) < len(cold_hits):
                degraded = ssd_refused = True
        candidates = {k: (ssd_hits[k] if k in ssd_hits else cold_hits[k])
                      for k in misses if k in ssd_hits or k in cold_hits}
        expiry = ({k: (ssd_expiry[k] if k in ssd_hits else cold_expiry[k]) for k in candidates}
                  if self.ttl_from_source else self._fresh_expiry(list(candidates)))  # else: starts again
        # A disk refusing writes now would refuse the placement's demotions too, after the policy
        # had already moved its metadata: place nothing this time (RAM keeps what it has).
        if candidates and ram_ok and not ssd_refused and (gens is not None or not checked):
            try:
                self._place(candidates, expiry)
            except TierUnavailable:
                degraded = True
        self._enforce_ssd_budget()

        sources: dict[str, str] = {}
        values: dict[str, bytes] = {}
        for tier_name, found in (("redis", ram_hits), ("rocksdb", ssd_hits), ("feast", cold_hits)):
            for k, v in found.items():
                values[k] = unframe(v)[1] if checked else v
                sources[k] = getattr(self.cold, "name", tier_name) if found is cold_hits else tier_name
        if degraded:
            self.counters.degraded_reads += 1
        return TieredResult(
            values=values, sources=sources, missing=[k for k in keys if k not in values], degraded=degraded,
            ram_hits=len(ram_hits), ssd_hits=len(ssd_hits), cold_hits=len(cold_hits),
        )

    # -- writes --------------------------------------------------------------------------------
    def put_many(self, items: dict[str, bytes], generations: Mapping[str, int] | None = None) -> bool:
        """Store values computed above the cache (e.g. embeddings): SSD first, then RAM as the
        policy places them. Returns False when a tier was unavailable: RAM (stored on SSD only)
        or SSD (not stored; any older copy of the keys dropped all the same).
        A generation-checked cache tags them with `generations` (read before the values were
        computed), or with the generations read now."""
        if not items:
            return True
        ok = True
        if self.generations is not None:
            gens = dict(generations or {})
            # Unreadable: tagged UNKNOWN, never served once the generations are readable again.
            with contextlib.suppress(GenerationsUnavailable):
                gens.update(self.generations.read([k for k in items if k not in gens]))
            items = {k: frame(gens.get(k, UNKNOWN), v) for k, v in items.items()}
        # Values computed now: their TTL starts now, like a row read from the cold tier.
        expiry = self._fresh_expiry(list(items))
        placeable = items
        if self.ssd is not None:
            stored = self._ssd_put(items, expiry)
            self._touch_ssd(list(stored))
            if len(stored) < len(items):
                # Not on SSD: not in RAM either (the SSD copy comes first); a disk refusing some
                # rows would refuse the placement's demotions too, so place none now.
                ok, placeable = False, {}
        if self.ram is not None and self.policy is not None:
            try:
                # A put may replace a value: drop any RAM copy so the placement rewrites it.
                self.ram.delete_many(list(items))
                self.policy.remove(list(items))
                if placeable:
                    self._place(placeable, expiry)
            except TierUnavailable:
                ok = False
        self._enforce_ssd_budget()
        return ok

    def invalidate(self, keys: Sequence[str], *, broadcast: bool = True, bump: bool = False) -> bool:
        """Drop every copy of the keys; True when it reached everyone: the shared RAM copy was
        deleted and the stream carries the keys to the other replicas. False means a replica
        may still hold an old copy: the caller keeps its pending record and retries.
        `bump` (after a write to the source): move the keys' generations first, so that no copy
        read before the write is placed or served from then on."""
        keys = list(dict.fromkeys(keys))
        bumped = True
        if bump and self.generations is not None and keys:
            try:
                self.generations.bump(keys)
            except GenerationsUnavailable as exc:
                log.warning("generations of %d keys not moved: %s", len(keys), exc)
                bumped = False
        done = self._drop_everywhere(keys) and bumped
        if broadcast and self.bus is not None and keys:
            done = self.bus.publish_keys(keys) is not None and done
        return done

    def purge_prefix(self, prefix: str, *, broadcast: bool = True) -> int:
        """Delete every key under a prefix (an old model version) from every tier copy."""
        n = 0
        if self.ram is not None:
            try:
                keys = list(self.ram.scan_prefix(prefix))
                n += self.ram.delete_many(keys)
                if self.policy is not None:
                    self.policy.remove(self.policy.resident_keys(prefix))
            except TierUnavailable:
                pass
        if self.ssd is not None:
            gone = self.ssd.keys_with_prefix(prefix)
            self._ssd_delete(gone)  # forgotten by the tier even when the disk refuses
            n += len(gone)
            self._recency.forget(gone)
        if broadcast and self.bus is not None:
            self.bus.publish_prefix(prefix)
        return n

    def _drop_everywhere(self, keys: list[str]) -> bool:
        if not keys:
            return True
        ram_ok = True
        if self.ram is not None:
            try:
                self.ram.delete_many(keys)
                if self.policy is not None:
                    self.policy.remove(keys)
            except TierUnavailable:
                ram_ok = False  # the RAM copy may come back with Redis: the caller retries
        if self.ssd is not None:
            # A refused delete still drops the keys for this process (never served again), so
            # the invalidation reached this SSD: it does not make the caller retry.
            self._ssd_delete(keys)
            self._recency.forget(keys)
        return ram_ok

    def _on_event(self, event: InvalidationEvent) -> None:
        if self.bus is not None and event.origin == self.bus.origin:
            return  # applied synchronously when published
        if event.kind == "keys":
            self._drop_everywhere(event.keys)
        elif event.kind == "prefix":
            self.purge_prefix(event.prefix, broadcast=False)


    # -- introspection -------------------------------------------------------------------------
    def stats(self) -> TieredStats:
        out = self.counters
        for tier in (self.ram, self.ssd, self.cold):
            if tier is not None:
                out.tiers[tier.name] = tier.stats()
        if self.policy is not None:
            with contextlib.suppress(TierUnavailable):
                out.ram_policy_bytes = self.policy.resident_bytes()
        return out

    def close(self) -> None:
        self._maintain_stop.set()
        if self._maintainer is not None:
            # Before the tiers close: a round in flight must not use a closed client.
            self._maintainer.join(timeout=5)
            self._maintainer = None
        if self.bus is not None:
            self.bus.close()
        if self.ssd is not None:
            self.ssd.close()
        if self.ram is not None:
            self.ram.close()
