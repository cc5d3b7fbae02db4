"""Cache lookup counts by layer, tenant and outcome, shared by every Ingress replica in Redis.

Why Redis: each Ingress replica used to count only the lookups it answered itself, so with two
replicas `GET /v1/cache/stats` showed whichever replica the proxy picked: about half of a
tenant's lookups, a different half on every call. The exported Prometheus series are exact
(summed over `replica` by the backend); this is the page a tenant reads without one.

Off the request path: `add` only adds to this process's pending deltas; a background thread
flushes them every `FLUSH_INTERVAL_S` as one MULTI/EXEC of HINCRBYs on one hash (one slot on a
cluster: all of a batch or none of it). When Redis is down the deltas stay here and go with a
later flush, so nothing is lost; a reply lost after EXEC ran would count that batch twice, which a
statistics page can bear. A `snapshot` is the Redis totals plus this replica's unflushed deltas:
other replicas' last `FLUSH_INTERVAL_S` is not in it yet.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter

import redis

from caches.redis_client import REDIS_ERRORS

log = logging.getLogger("tierserve.lookups")

# Outside every cache namespace ("res.", "sem:", "emb.", ...): no purge by prefix reaches it.
LOOKUPS_KEY = "tierserve:stats:lookups"
# How stale another replica's counts may be on a stats page, against one Redis round trip per
# replica this often (never one per request).
FLUSH_INTERVAL_S = 1.0

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


class SharedLookupCounts:
    """One replica's writer and reader of the shared counts (see the module note)."""

    def __init__(self, client: redis.Redis, key: str = LOOKUPS_KEY,
                 flush_interval_s: float | None = FLUSH_INTERVAL_S) -> None:
        """`flush_interval_s=None`: no background thread; the caller flushes (tests)."""
        self.client, self.key = client, key
        self._pending: Counter[Field] = Counter()
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one flush at a time: a batch is never sent twice
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
        with self._lock:
            return Counter(self._pending)

    def flush(self) -> bool:
        """Send the pending deltas; False (and the deltas kept) when Redis refused them."""
        with self._flushing:
            with self._lock:
                batch, self._pending = self._pending, Counter()
            if not batch:
                return True
            try:
                pipe = self.client.pipeline(transaction=True)
                for (layer, tenant, outcome), n in batch.items():
                    pipe.hincrby(self.key, _field(layer, tenant, outcome), n)
                pipe.execute()
            except REDIS_ERRORS as exc:
                with self._lock:
                    self._pending.update(batch)  # back in front of anything added meanwhile
                log.debug("lookup counts not flushed (kept for the next try): %s", exc)
                return False
            return True

    def snapshot(self) -> ByTenant:
        """Every replica's flushed counts plus this one's pending deltas. Raises a Redis error
        when Redis is unreachable (the caller says so rather than show one replica's share)."""
        with self._flushing:  # not while a batch is between here and Redis (it would be missing)
            raw = self.client.hgetall(self.key)
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
        self.flush()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - counting must never stop for good over one bad batch
                log.exception("lookup count flush failed")
