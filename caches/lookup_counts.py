"""Cache lookup counts by layer, tenant and outcome, shared by every Ingress replica in Redis.

Why Redis: each Ingress replica used to count only the lookups it answered itself, so with two
replicas `GET /v1/cache/stats` showed whichever replica the proxy picked: about half of a
tenant's lookups, a different half on every call. The exported Prometheus series are exact
(summed over `replica` by the backend); this is the page a tenant reads without one.

Off the request path: `add` only adds to this process's pending deltas; a background thread
flushes them every `FLUSH_INTERVAL_S` into one hash: one round trip per flush (a server that has
not seen the flush script yet costs two more, once).

Each batch is applied once, even when Redis is slow rather than dead: a flush whose reply is lost
to the client's timeout may still have run on the server. So a batch is taken out of the pending
deltas under an id of its own and sent as one Lua script that applies its HINCRBYs only if it can
`SET` the batch's marker key `NX` (the marker and the counts share a hash tag: one slot on a
cluster, all of a batch or none of it). Until a flush of that batch is answered, every later
flush sends the same batch under the same id again (a copy that already ran finds the marker and
adds nothing); lookups counted meanwhile wait as the next batch. When Redis is down the deltas
stay here and go with a later flush, so nothing is lost. What can still count a batch twice
(never more): it ran, its reply was lost, and its marker is gone before a copy is answered (Redis
unreachable for longer than `APPLIED_MARKER_TTL_S`, or the marker evicted).

A `snapshot` is the Redis totals plus this replica's deltas not yet in Redis (a batch whose
marker is there already counts once): other replicas' last `FLUSH_INTERVAL_S` is not in it yet.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import threading
from collections import Counter

import redis
from redis.crc import key_slot

from caches.redis_client import REDIS_ERRORS

log = logging.getLogger("tierserve.lookups")

# Outside every cache namespace ("res.", "sem:", "emb.", ...): no purge by prefix reaches it.
LOOKUPS_KEY = "tierserve:stats:lookups"
# How stale another replica's counts may be on a stats page, against one Redis round trip per
# replica this often (never one per request).
FLUSH_INTERVAL_S = 1.0
# How long a batch's marker says "applied". A copy of the batch that runs within it adds nothing:
# this replica sends the batch again every flush until one is answered, and each copy that runs
# renews the marker, so only a Redis unreachable for this long right after a lost reply counts a
# batch twice. The cost: one small key per non-empty flush per replica lives this long (600 at
# one flush a second).
APPLIED_MARKER_TTL_S = 600
# Random bytes of a batch id: unique across replicas and restarts without any coordination.
BATCH_ID_BYTES = 8

# KEYS[1]: the counts hash; KEYS[2]: the batch's marker (same slot). ARGV[1]: the marker's TTL
# (seconds); then field, delta pairs. 1: applied now; 0: a copy of this batch ran before.
_FLUSH_SCRIPT = """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then
  for i = 2, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  return 1
end
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 0
"""

Field = tuple[str, str, str]  # (layer, tenant, outcome)
ByTenant = dict[str, dict[str, dict[str, float]]]  # {layer: {tenant: {outcome: count}}}


def _field(layer: str, tenant: str, outcome: str) -> str:
    # JSON, not a separator: tenant names are operator-chosen strings and may hold any character.
    return json.dumps([layer, tenant, outcome], separators=(",", ":"))


def _parse(raw: bytes | str) -> Field | None:
    try:
        layer, tenant, outcome = json.loads(raw)
    except (ValueError, TypeError):
        return None  # not ours (someone wrote the hash by hand): skipped, never a failed page
    return str(layer), str(tenant), str(outcome)


def nest(counts: Counter[Field] | dict[Field, float]) -> ByTenant:
    out: ByTenant = {}
    for (layer, tenant, outcome), n in counts.items():
        by_outcome = out.setdefault(layer, {}).setdefault(tenant, {})
        by_outcome[outcome] = by_outcome.get(outcome, 0.0) + float(n)
    return out


def _hash_tag(key: str) -> str | None:
    """What a cluster hashes `key` by when not the whole key: its first "{" to the next "}",
    when not empty (Redis's rule)."""
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    return key[start + 1:end] if end > start + 1 else None


def marker_prefix(key: str) -> str:
    """A prefix for keys in `key`'s cluster slot: `key` itself when it has a hash tag (a suffix
    keeps it), else `key` as the tag ("{key}" hashes as "key")."""
    prefix = key if _hash_tag(key) is not None else f"{{{key}}}"
    if _hash_tag(prefix) is None or key_slot(prefix.encode()) != key_slot(key.encode()):
        raise ValueError(f"no hash tag puts keys in the slot of {key!r}: name the counts hash without braces")
    return prefix


@dataclasses.dataclass(frozen=True)
class _Batch:
    """Deltas taken out of the pending ones, sent under `id` until a flush of them is answered."""

    id: str
    deltas: Counter[Field]


class SharedLookupCounts:
    """One replica's writer and reader of the shared counts (see the module note)."""

    def __init__(self, client: redis.Redis, key: str = LOOKUPS_KEY,
                 flush_interval_s: float | None = FLUSH_INTERVAL_S) -> None:
        """`flush_interval_s=None`: no background thread; the caller flushes (tests)."""
        self.client, self.key = client, key
        self._markers = f"{marker_prefix(key)}:flushed:"
        self._apply = client.register_script(_FLUSH_SCRIPT)
        self._pending: Counter[Field] = Counter()  # added since the batch below was taken
        self._unacked: _Batch | None = None  # sent (maybe applied), no answer yet
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one flush at a time: batches go in order, one id each
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if flush_interval_s is not None:
            self._thread = threading.Thread(target=self._run, args=(flush_interval_s,), name="tierserve-lookups",
                                            daemon=True)
            self._thread.start()

    def add(self, layer: str, tenant: str, outcome: str, n: int = 1) -> None:
        with self._lock:
            self._pending[(layer, tenant, outcome)] += n

    def pending(self) -> Counter[Field]:
        """This replica's deltas not known to be in Redis: the unanswered batch and those since."""
        with self._lock:
            out = Counter(self._pending)
            if self._unacked is not None:
                out.update(self._unacked.deltas)
            return out

    def marker(self, batch_id: str) -> str:
        return self._markers + batch_id

    def flush(self) -> bool:
        """One round trip: the unanswered batch again if there is one, else the deltas added
        since the last flush as a new batch. False (and the batch kept, under its id) when Redis
        did not answer; the deltas added meanwhile go with the flush after the one answered."""
        with self._flushing:
            with self._lock:
                if self._unacked is None and self._pending:
                    self._unacked = _Batch(secrets.token_hex(BATCH_ID_BYTES), self._pending)
                    self._pending = Counter()
                batch = self._unacked
            if batch is None:
                return True
            args: list[str | int] = [APPLIED_MARKER_TTL_S]
            for (layer, tenant, outcome), n in batch.deltas.items():
                args += [_field(layer, tenant, outcome), n]
            try:
                self._apply(keys=[self.key, self.marker(batch.id)], args=args)
            except REDIS_ERRORS as exc:
                log.debug("lookup counts not flushed (sent again under the same id): %s", exc)
                return False
            self._acknowledged(batch)
            return True

    def snapshot(self) -> ByTenant:
        """Every replica's flushed counts plus this one's deltas not yet in Redis. Raises a Redis
        error when Redis is unreachable (the caller says so rather than show one replica's share)."""
        with self._flushing:  # not while a batch is between here and Redis (it would be missing)
            batch = self._unacked
            if batch is None:
                raw = self.client.hgetall(self.key)
            else:
                # Its reply lost, the batch may be in the totals already: its marker says (same
                # slot, one round trip), and then it is answered for good: never sent again.
                pipe = self.client.pipeline(transaction=False)
                pipe.hgetall(self.key)
                pipe.exists(self.marker(batch.id))
                raw, landed = pipe.execute()
                if landed:
                    self._acknowledged(batch)
            pending = self.pending()
        total: Counter[Field] = Counter()
        for name, value in raw.items():
            field = _parse(name)
            if field is not None:
                total[field] += int(value)
        total.update(pending)
        return nest(total)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.flush():  # an unanswered batch goes first: the deltas since need a flush of their own
            self.flush()

    def _acknowledged(self, batch: _Batch) -> None:
        with self._lock:
            if self._unacked is batch:
                self._unacked = None

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - counting must never stop for good over one bad batch
                log.exception("lookup count flush failed")
