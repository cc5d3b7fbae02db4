"""`SharedWTinyLFU`: the W-TinyLFU of `wtinylfu.py`, its state in the RAM tier's Redis.

Why shared: the RAM budget is one shared Redis, so the eviction order must see every replica's
reads; and metadata that lives and dies with the values (a Redis restart empties both) can never
describe entries that are not there for long (a key whose value expired by TTL is dropped from
the metadata on its next read, or by the cache's upkeep, `reconcile_step`, when no read comes:
until then it counts as resident, and the policy would demote for room that is free).
Per-replica metadata would evict on a partial view and split one budget into N guesses.

On a Redis Cluster the RAM tier is split into hash-tag groups (caches/tiers/redis.py) and so is
this policy: one sketch and one set of metadata per group, under the group's tag, each with its
share of the budget; a batch runs one script call per group it touches, and the values the
record script reads are declared in its KEYS.

How: the sketch *and* the placement metadata (regions, LRU order, sizes, byte totals, the
climber) sit in ten Redis keys under one prefix (`KEY_ORDER`), changed only by the Lua scripts in
`lua/` (one call per batch, atomic, so replicas never race on a victim). `lua/common.lua` holds
the helpers the record/admit/remove/reconcile scripts share and is prepended to each. The
integration tests replay the same trace through this class and `WTinyLFU` and compare every
decision.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, TypeVar

import redis

from caches.admission.policy import Placement, PlacementPolicy, split_placement
from caches.admission.sketch import COUNTER_MAX, SKETCH_DEPTH, sketch_indexes
from caches.admission.wtinylfu import CLIMB_RESTART_THRESHOLD, CLIMB_STEP_DECAY, WTinyLFUConfig, lua_number
from caches.redis_client import REDIS_ERRORS, RedisUnavailable, ScriptBatch, Sweep, is_cluster
from caches.tiers.base import TierUnavailable

if TYPE_CHECKING:
    from caches.tiers.base import Tier
    from caches.tiers.redis import RedisTier

T = TypeVar("T")

log = logging.getLogger("tierserve.placement")

# The policy's Redis keys are f"{prefix}:{name}"; every script takes all of them, in this order.
WINDOW = "window"  # zset: key -> LRU tick, the admission window
PROBATION = "probation"  # zset: main region, not yet re-read
PROTECTED = "protected"  # zset: main region, re-read while in probation
REGION = "region"  # hash: key -> w | p | q
SIZE = "size"  # hash: key -> bytes
BYTES = "bytes"  # hash: w | p | q -> bytes per region
TICK = "tick"  # string: the LRU clock
SKETCH = "sketch"  # string: BITFIELD of u4 counters, row-major
ADDS = "adds"  # string: reads counted since the last halving
# hash: the climber's window, step, prev, reads, hits; and the sketch's aging (agings, aged,
# aging_at: lua/halve.lua), in this hash because record.lua, which decides a halving, has no other
CLIMBER = "climber"
KEY_ORDER = (WINDOW, PROBATION, PROTECTED, REGION, SIZE, BYTES, TICK, SKETCH, ADDS, CLIMBER)

HALVING_CHUNK_BYTES = 64 << 10  # aging in slices keeps each Redis script call well under 1 ms
# Halvings a sketch can be owed at most (lua/halve.lua): a 4-bit counter is 0 after 4.
MAX_HALVINGS_OWED = 4
PENDING_MAX_KEYS = 100_000  # reads buffered while Redis is unreachable (never sent), flushed on return
# Keys per placement script call. Redis' Lua caps `unpack` (and a C call's arguments) near 8,000
# values; the record script unpacks 4 BITFIELD words per sketch row per key (16 per key), so a
# batch of ~500 keys failed with `too many results to unpack`. 256 keys = 4,096 values: half the
# cap, and it bounds each call's run time (the server is single-threaded). Chunks of one batch
# are applied in order, which is what one call over the whole batch would have done.
MAX_KEYS_PER_SCRIPT = 256
# Sketch counters per BITFIELD command when flushing the counts buffered during an outage; a
# command carries whole keys (all SKETCH_DEPTH counters of each), so a key is flushed or not.
MAX_COUNTERS_PER_FLUSH = 1024
KEYS_PER_FLUSH = MAX_COUNTERS_PER_FLUSH // SKETCH_DEPTH
# How redis-py words a failure to open a connection ("Timeout connecting to server", "Error 111
# connecting to host:port. Connection refused."): raised before any command is written.
CONNECT_FAILURE = "connecting to"
# Size-hash fields one reconcile step reads (HSCAN COUNT) and checks: one script call's worth, so
# each step is short on the single-threaded server (a small, listpack-encoded hash comes back
# whole: still small, and chunked by MAX_KEYS_PER_SCRIPT).
RECONCILE_CHUNK = MAX_KEYS_PER_SCRIPT
# How long an entry must have stood still before the reconcile may forget it for a missing value:
# admit places a key before the cache writes its value (an SSD write of the demoted rows comes in
# between), and an entry forgotten in that gap leaves a value in RAM that no eviction will ever
# pick. Far longer than that gap; expired bytes are counted this much longer, which costs little.
RECONCILE_GRACE_S = 10.0
# RAM values without a region this replica remembers at once (a few dozen bytes each): past it,
# the ones beyond wait for a later sweep.
ORPHAN_MAX_TRACKED = 100_000


@cache
def lua_source(name: str) -> str:
    """A script from lua/ (shipped as package data); record/admit/remove/reconcile get common.lua
    first."""
    text = resources.files(__package__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
    if name in ("record", "admit", "remove", "reconcile"):
        text = lua_source("common") + text
    return text


def _chunks(items: Sequence[T], n: int) -> Iterator[list[T]]:
    for i in range(0, len(items), n):
        yield list(items[i : i + n])


def never_sent(exc: BaseException) -> bool:
    """Whether a failed Redis call surely never reached the server: the breaker skipped it, or
    the connection could not be opened (refused, connect timeout). Anything else, a read timeout
    above all, may come after the command RAN, its reply lost (a slow server, not a dead one):
    the caller must assume it did. A call never sent that looks otherwise (a timeout in a new
    connection's handshake, a full pool) is then taken as run: the safe side (see "counting
    reads" in SharedWTinyLFU)."""
    if not isinstance(exc, RedisUnavailable):
        return False
    cause = exc.__cause__
    if cause is None:  # Breaker.call raises, unchained, before calling; every failure it saw chains
        return exc.__context__ is None
    return isinstance(cause, (redis.ConnectionError, redis.TimeoutError)) and CONNECT_FAILURE in str(cause)


class SharedWTinyLFU(PlacementPolicy):
    """W-TinyLFU whose sketch and metadata live in the RAM tier's Redis (see module note)."""

    name = "tierserve"

    def __init__(self, tier: RedisTier, config: WTinyLFUConfig, *, prefix: str = "tierserve:placement") -> None:
        self.tier = tier
        self.prefix = prefix
        # One policy per hash-tag group of the RAM tier (one on a single server): its keys carry
        # the group's tag, so a script's keys, the values it reads included, are one slot; each
        # group gets an equal share of the budget (keys spread evenly over the groups by hash).
        self.shards = tier.shards
        self.cfg = config if self.shards == 1 else replace(config, budget_bytes=max(1, config.budget_bytes // self.shards))
        self.shard_keys = [[f"{tier.tag(s)}{prefix}:{name}" for name in KEY_ORDER] for s in range(self.shards)]
        self.key = {name: self.shard_keys[0][i] for i, name in enumerate(KEY_ORDER)}
        self.keys = self.shard_keys[0]
        client = tier.client
        self._record = client.register_script(lua_source("record"))
        self._admit = client.register_script(lua_source("admit"))
        self._remove = client.register_script(lua_source("remove"))
        self._halve = client.register_script(lua_source("halve"))
        self._reconcile = client.register_script(lua_source("reconcile"))
        self._orphans = client.register_script(lua_source("orphans"))
        self.pending: Counter[str] = Counter()  # reads whose record call never reached Redis
        self.agings = 0
        # Where the next reconcile_step resumes: over the groups' size hashes, and over the RAM
        # tier's sizes hashes for values no region holds (`_orphan_slice`).
        self._reconcile_at = Sweep(self.shards)
        self._orphans_at = Sweep(self.shards)
        self._aging_group = 0  # the group whose owed halvings the next upkeep step finishes
        # RAM values seen without a region, by Redis name: when first seen (monotonic) and in
        # which sweep last. Deleted once seen so again at least reconcile_grace_s later; one not
        # seen in a whole sweep is gone (deleted, re-admitted) and forgotten.
        self._orphans_seen: dict[str, tuple[float, int]] = {}
        self._orphan_sweeps = 0
        # Per group: the first tick seen in the current grace period and when (monotonic), and
        # the settled tick, one seen at least reconcile_grace_s ago (see RECONCILE_GRACE_S).
        self.reconcile_grace_s = RECONCILE_GRACE_S
        self._tick_seen: list[tuple[float, int] | None] = [None] * self.shards
        self._settled = [0] * self.shards

    def _key(self, shard: int, name: str) -> str:
        return self.shard_keys[shard][KEY_ORDER.index(name)]

    @property
    def _common(self) -> list[object]:
        c = self.cfg
        return [c.width, SKETCH_DEPTH, c.budget_bytes, c.window_bytes, repr(c.protected_fraction)]

    # -- counting reads -------------------------------------------------------------------------
    # A read is counted by the record script that serves it. When that call fails, the read is
    # kept in `pending` (added to the sketch by the next call that reaches Redis) only if the call
    # surely never reached Redis (`never_sent`): on a slow server a timed-out call may have run,
    # its reply lost, and buffering it too counted the read twice, so keys read during a slow
    # spell won admission duels against hotter keys. Counting such a read zero times instead is
    # harmless for a frequency sketch: a read missing here and there (only while Redis is slow)
    # moves an estimate by one, as a hash collision or a halving does, and favours no key.

    def record(self, keys: Sequence[str], hits: set[str]) -> None:
        calls = [(shard, chunk) for shard, group in self.tier.by_shard(keys).items()
                 for chunk in _chunks(group, MAX_KEYS_PER_SCRIPT)]
        for i, (shard, chunk) in enumerate(calls):
            args = self._record_args(fetch=False)
            for k in chunk:
                args += [k, 1 if k in hits else 0]
            try:
                self._run_record(shard, chunk, self.shard_keys[shard], args)
            except TierUnavailable:
                self._buffer(k for _, later in calls[i + 1:] for k in later)  # never sent
                raise

    def lookup(self, ram: Tier, keys: Sequence[str]) -> dict[str, bytes] | None:
        """Read the RAM tier and record the accesses, one round trip per chunk and group
        (lua/record.lua), when `ram` is the tier this policy's state lives in. When it raises
        TierUnavailable it has dealt with the reads itself (counted, buffered, or sent and maybe
        run): the caller must not `record` them again, or they count twice."""
        if ram is not self.tier:
            return None
        if self.shards > 1:
            return self._lookup_groups(keys)
        found: dict[str, bytes] = {}
        chunks = list(_chunks(keys, MAX_KEYS_PER_SCRIPT))
        for i, chunk in enumerate(chunks):
            names = [self.tier.physical(k) for k in chunk]
            try:
                reply = self._run_record(0, chunk, [*self.shard_keys[0], *names], [*self._record_args(fetch=True), *chunk])
            except TierUnavailable:
                self._buffer(k for later in chunks[i + 1:] for k in later)  # never sent
                raise
            found.update({k: v for k, v in zip(chunk, reply[1:], strict=True) if v is not None})
        return found

    def _lookup_groups(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The lookup over hash-tag groups (a cluster): every group's script call in one
        pipeline per node (a cluster pipeline refuses scripts: redis_client.ScriptBatch). One
        batch per node, so a failure says which calls were never sent: on a cluster with one
        master down, the calls on the others have run, and only the down node's reads wait."""
        by_node: dict[str, list[tuple[int, list[str], list[str], list[object]]]] = {}
        for shard, group in self.tier.by_shard(keys).items():
            for chunk in _chunks(group, MAX_KEYS_PER_SCRIPT):
                script_keys = [*self.shard_keys[shard], *(self.tier.physical(k) for k in chunk)]
                call = (shard, chunk, script_keys, [*self._record_args(fetch=True), *chunk])
                by_node.setdefault(self._node_of(script_keys[0]), []).append(call)
        self._flush_or_buffer(keys)
        nodes = list(by_node.values())
        found: dict[str, bytes] = {}
        for i, calls in enumerate(nodes):
            batch = ScriptBatch(self.tier.client)
            for _, _, script_keys, args in calls:
                batch.add(self._record, script_keys, args)
            try:
                replies = self.tier._call("placement.record", batch.execute)
            except TierUnavailable as exc:
                if never_sent(exc):
                    self._buffer(k for _, chunk, _, _ in calls for k in chunk)
                self._buffer(k for later in nodes[i + 1:] for _, chunk, _, _ in later for k in chunk)
                raise
            for (shard, chunk, _, _), reply in zip(calls, replies, strict=True):
                if reply[0]:
                    self._age_decided(shard)
                found.update({k: v for k, v in zip(chunk, reply[1:], strict=True) if v is not None})
        return found

    def _node_of(self, key: str) -> str:
        """The cluster node serving `key` (from the client's slot map, no round trip); '' on one
        server. A key whose slot no node covers gets '' too: its call fails in the batch, as a
        Redis error."""
        client = self.tier.client
        if not is_cluster(client):
            return ""
        try:
            return str(client.get_node_from_key(key).name)
        except REDIS_ERRORS:
            return ""

    def _record_args(self, *, fetch: bool) -> list[object]:
        c = self.cfg
        return [
            *self._common, c.sample, 1 if c.adaptive else 0, c.climb_sample, repr(lua_number(c.climb_step)),
            repr(CLIMB_STEP_DECAY), repr(CLIMB_RESTART_THRESHOLD), c.max_window_bytes, c.min_window_bytes,
            1 if fetch else 0,
        ]

    def _run_record(self, shard: int, keys: Sequence[str], script_keys: list[str], args: list[object]) -> list:
        self._flush_or_buffer(keys)
        try:
            reply = self.tier._call("placement.record", self._record, script_keys, args)
        except TierUnavailable as exc:
            if never_sent(exc):
                self._buffer(keys)
            raise
        if reply[0]:
            self._age_decided(shard)
        return reply

    def _buffer(self, keys: Iterable[str]) -> None:
        """Count reads that never reached Redis here, until a call does (bounded: past
        PENDING_MAX_KEYS distinct keys a long outage's further reads go uncounted)."""
        if len(self.pending) < PENDING_MAX_KEYS:
            self.pending.update(keys)

    def _flush_or_buffer(self, keys: Sequence[str]) -> None:
        """Flush `pending` before a record call; if that fails, the record call is not made, so
        its reads are surely uncounted: buffered, whatever the flush's failure."""
        if not self.pending:
            return
        try:
            self._flush_pending()
        except Exception:
            self._buffer(keys)
            raise

    def _flush_pending(self) -> None:
        """Add the buffered counts to the sketch, one BITFIELD per KEYS_PER_FLUSH keys. Each
        command's counts leave `pending` before it is sent: one that then fails goes back only if
        it was surely never sent (`never_sent`), else it may have run and is dropped (counted at
        most once). Taking them out first also keeps two threads from flushing the same counts."""
        for shard, group in self.tier.by_shard(list(self.pending)).items():
            for chunk in _chunks(group, KEYS_PER_FLUSH):
                counts = {k: n for k in chunk if (n := self.pending.pop(k, 0)) > 0}
                if not counts:
                    continue
                ops: list[object] = ["OVERFLOW", "SAT"]
                for key, n in counts.items():
                    for o in sketch_indexes(key, self.cfg.width):
                        ops += ["INCRBY", "u4", f"#{o}", min(n, COUNTER_MAX)]
                try:
                    self.tier._call("placement.flush", self.tier.client.execute_command, "BITFIELD",
                                    self._key(shard, SKETCH), *ops)
                except Exception as exc:
                    if never_sent(exc):
                        self.pending.update(counts)
                    raise

    def _age_decided(self, shard: int) -> None:
        """The halving a read's record call just decided (`agings` counts decisions, as the
        in-process sketch counts its halvings), done now, slice by slice, so other replicas keep
        counting meanwhile. A failure does not fail the read (its record ran, and its values are
        in hand): the halving is owed in Redis, and the upkeep finishes it."""
        self.agings += 1
        self._catch_up(shard)

    def _catch_up(self, shard: int) -> None:
        """Halve the group's sketch until it has every halving owed. Each call halves one slice
        and records its progress in the same atomic script (lua/halve.lua): a call whose reply
        was lost is not redone (halving its slice twice) by the next, which takes the next slice.
        Bounded: replicas that keep deciding halvings meanwhile cannot hold it here. A failure is
        logged and the rest left owed, for the next call here on any replica (the read that
        decides a halving, the upkeep's `reconcile_step`)."""
        total = self.cfg.width * SKETCH_DEPTH // 2
        slices = -(-total // HALVING_CHUNK_BYTES)
        keys = [self._key(shard, SKETCH), self._key(shard, CLIMBER)]
        try:
            for _ in range((MAX_HALVINGS_OWED + 1) * slices):  # the pass in progress and those owed
                if not self.tier._call("placement.age", self._halve, keys, [total, HALVING_CHUNK_BYTES, MAX_HALVINGS_OWED]):
                    return
        except TierUnavailable as exc:
            log.debug("placement %s: halving of group %d still owed: %s", self.prefix, shard, exc)

    def admit(self, sizes: dict[str, int]) -> Placement:
        if not sizes:
            return Placement()
        evicted: list[str] = []
        for shard, group in self.tier.by_shard(list(sizes)).items():
            for chunk in _chunks(group, MAX_KEYS_PER_SCRIPT):
                args: list[object] = list(self._common)
                for k in chunk:
                    args += [k, sizes[k]]
                reply = self.tier._call("placement.admit", self._admit, self.shard_keys[shard], args)
                evicted += [e.decode() if isinstance(e, bytes) else e for e in reply]
        return split_placement(list(sizes), evicted)

    def remove(self, keys: Sequence[str]) -> None:
        for shard, group in self.tier.by_shard(keys).items():
            for chunk in _chunks(group, MAX_KEYS_PER_SCRIPT):
                self.tier._call("placement.remove", self._remove, self.shard_keys[shard], [*self._common, *chunk])

    def _per_shard(self, op: str, command: str, name: str, *args: object) -> list:
        def run() -> list:
            pipe = self.tier.client.pipeline(transaction=False)
            for s in range(self.shards):
                pipe.execute_command(command, self._key(s, name), *args)
            return pipe.execute()

        return self.tier._call(op, run)

    def resident_bytes(self) -> int:
        return sum(int(v) for raw in self._per_shard("placement.bytes", "HVALS", BYTES) for v in raw)

    def window_bytes(self) -> int:
        raw = self._per_shard("placement.window", "HGET", CLIMBER, "window")
        return sum(int(float(r)) if r is not None else self.cfg.window_bytes for r in raw)

    def resident_keys(self, prefix: str = "") -> list[str]:
        """Keys the metadata places under `prefix`; may include some whose value expired by TTL
        (they are dropped on their next read or by `reconcile_step`), which is what a purge must
        remove too."""
        pattern = f"{prefix}*" if prefix else "*"
        found = self.tier._call("placement.scan", lambda: [
            k for s in range(self.shards)
            for k, _ in self.tier.client.hscan_iter(self._key(s, REGION), match=pattern, count=1000)])
        return [k.decode() if isinstance(k, bytes) else k for k in found]

    def estimate(self, key: str) -> int:
        ops: list[object] = []
        for o in sketch_indexes(key, self.cfg.width):
            ops += ["GET", "u4", f"#{o}"]
        sketch = self._key(self.tier.shard_of(key), SKETCH)
        vals = self.tier._call("placement.estimate", self.tier.client.execute_command, "BITFIELD", sketch, *ops)
        return min(int(v) for v in vals)

    def reset(self) -> None:
        """Forget everything (tests, benchmarks): metadata and counts."""
        for keys in self.shard_keys:
            self.tier._call("placement.reset", self.tier.client.delete, *keys)

    # -- upkeep ---------------------------------------------------------------------------------
    def reconcile_step(self, count: int = RECONCILE_CHUNK) -> int:
        """Forget entries whose value Redis expired by TTL with no read since (a read would have
        forgotten it): one HSCAN of ~`count` fields of one group's size hash and one script call
        per MAX_KEYS_PER_SCRIPT of them (lua/reconcile.lua), resumed where the last step stopped
        (the next group once a group's cursor wraps). Returns how many were forgotten. Raises
        TierUnavailable, like every call here.

        Then it finishes one group's halvings owed (the groups in turn, one a step, apart from the
        sweep's group, which may stay on one big group for minutes): one whose call failed (a lost
        reply, an outage) is resumed here, by whichever replica's upkeep gets there first; a group
        owing none costs one short call. A halving that fails is logged and left owed: it must
        not stop the sweeps, which free room."""
        at = self._reconcile_at
        cursor, forgotten = self._reconcile_slice(at.group, at.cursor, count)
        at.advance(cursor)
        orphans = self._orphans_at
        orphans.advance(self._orphan_slice(orphans.group, orphans.cursor, count))
        if orphans.wrapped:
            self._orphan_sweeps += 1
            self._orphans_seen = {n: seen for n, seen in self._orphans_seen.items()
                                  if seen[1] >= self._orphan_sweeps - 1}
        group, self._aging_group = self._aging_group, (self._aging_group + 1) % self.shards
        self._catch_up(group)
        return forgotten

    def _orphan_slice(self, shard: int, cursor: int, count: int) -> int:
        """One HSCAN page of the RAM tier's sizes hash of one group: values no region holds are
        noted, and deleted (lua/orphans.lua, which checks again atomically) once they were seen so
        at least reconcile_grace_s before: a demotion's value stands without a region for the
        moment between the admit and its delete, a lost admit reply's for good. Returns the
        next cursor."""
        sizes, total = self.tier.bookkeeping(shard)
        region = self._key(shard, REGION)
        cursor, fields = self.tier._call("placement.orphans", self.tier.client.hscan, sizes, cursor, None, count)
        names = [f.decode() if isinstance(f, bytes) else str(f) for f in fields]
        now = time.monotonic()
        for chunk in _chunks(names, MAX_KEYS_PER_SCRIPT):
            keys = [self.tier.logical(n) for n in chunk]
            found = self.tier._call("placement.orphans", self._orphans, [region, sizes, total, *chunk],
                                    ["0", *keys])
            # by the names HSCAN gave (a value written before a change of the shard count sits
            # under its old group's tag: rebuilding its name would point at another slot)
            unheld = {k.decode() if isinstance(k, bytes) else str(k) for k in found}
            orphans = {name for name, key in zip(chunk, keys, strict=True) if key in unheld}
            for name in chunk:
                if name not in orphans:
                    self._orphans_seen.pop(name, None)
            due: list[str] = []
            for n in orphans:
                first = self._orphans_seen.get(n, (now, 0))[0]
                if now - first >= self.reconcile_grace_s:
                    due.append(n)
                elif n in self._orphans_seen or len(self._orphans_seen) < ORPHAN_MAX_TRACKED:
                    self._orphans_seen[n] = (first, self._orphan_sweeps)
            if due:
                self.tier._call("placement.orphans", self._orphans, [region, sizes, total, *due],
                                ["1", *(self.tier.logical(n) for n in due)])
                for n in due:
                    self._orphans_seen.pop(n, None)
        return int(cursor)

    @property
    def reconcile_wrapped(self) -> bool:
        """True when the last reconcile_step finished a sweep of every group."""
        return self._reconcile_at.wrapped

    def _reconcile_slice(self, shard: int, cursor: int, count: int) -> tuple[int, int]:
        """(next cursor, entries forgotten) for one HSCAN page of one group's size hash."""
        cursor, fields = self.tier._call("placement.reconcile", self.tier.client.hscan,
                                         self._key(shard, SIZE), cursor, None, count)
        keys = [f.decode() if isinstance(f, bytes) else str(f) for f in fields]
        # A group's values live under the group's tag (RedisTier.physical: the names the record
        # script reads), so the call's keys, values included, are all in this group's slot.
        tag = self.tier.tag(shard)
        forgotten = 0
        for chunk in _chunks(keys, MAX_KEYS_PER_SCRIPT):
            n, tick = self.tier._call("placement.reconcile", self._reconcile,
                                      [*self.shard_keys[shard], *(tag + k for k in chunk)],
                                      [*self._common, self._settled[shard], *chunk])
            forgotten += int(n)
            self._saw_tick(shard, int(tick))
        return int(cursor), forgotten

    def _saw_tick(self, shard: int, tick: int) -> None:
        """Advance the group's settled tick: an entry placed or moved at or before it has stood
        still for at least reconcile_grace_s (ticks only grow while the metadata lives)."""
        now = time.monotonic()
        seen = self._tick_seen[shard]
        if seen is None or tick < seen[1]:  # first sight, or the metadata was emptied: start over
            self._tick_seen[shard] = (now, tick)
            self._settled[shard] = 0
        elif now - seen[0] >= self.reconcile_grace_s:
            self._settled[shard] = seen[1]
            self._tick_seen[shard] = (now, tick)
