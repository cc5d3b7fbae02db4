"""Invalidation events over a Redis Stream, read by every replica.

Why a stream (not pub/sub): a replica that is busy or briefly disconnected catches up from its
last seen id instead of silently missing an event; `MAXLEN ~` bounds the stream. Each replica
reads from "now" when it starts (its SSD tier is either fresh or was closed cleanly, and older
events were already applied to the shared RAM tier by their publisher).

Events: `keys` (drop these keys from every tier copy), `prefix` (drop every key under a prefix:
a model version bump purge). The consumer is a daemon thread with its own connection that
survives Redis outages (it sleeps and resumes from its last id); `poll()` runs one read
synchronously for tests and for processes that do not want a thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from caches.redis_client import REDIS_ERRORS, make_client

log = logging.getLogger(__name__)

DEFAULT_STREAM = "tierserve:invalidations"
STREAM_MAXLEN = 100_000  # approximate: trimming is lazy and cheap
BLOCK_MS = 1000  # how long one XREAD waits; bounds how quickly close() returns
READ_COUNT = 500
RECONNECT_SLEEP_S = 0.5
# Slightly above the client's socket timeout would kill blocking reads: give XREAD its own.
STREAM_SOCKET_TIMEOUT_S = BLOCK_MS / 1000 + 2.0


@dataclass
class InvalidationEvent:
    kind: str  # "keys" | "prefix"
    keys: list[str] = field(default_factory=list)
    prefix: str = ""
    origin: str = ""  # publisher id, so a replica can skip what it already applied itself
    id: str = ""


class InvalidationBus:
    def __init__(self, url: str, *, stream: str = DEFAULT_STREAM, origin: str = "") -> None:
        self.url = url
        self.stream = stream
        self.origin = origin or f"replica-{id(self):x}-{time.monotonic_ns()}"
        self.client = make_client(url)
        self._reader = make_client(url, socket_timeout_s=STREAM_SOCKET_TIMEOUT_S)
        self._last_id = "$"
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.applied = 0

    # -- publish ------------------------------------------------------------------------------
    def publish_keys(self, keys: list[str]) -> str | None:
        return self._publish({"kind": "keys", "keys": json.dumps(keys)}) if keys else None

    def publish_prefix(self, prefix: str) -> str | None:
        return self._publish({"kind": "prefix", "prefix": prefix})

    def _publish(self, fields: dict[str, str]) -> str | None:
        fields["origin"] = self.origin
        try:
            raw = self.client.xadd(self.stream, fields, maxlen=STREAM_MAXLEN, approximate=True)
        except REDIS_ERRORS as exc:
            # Any Redis error, not only a dead connection (OOM refuses XADD too). The caller
            # learns it from the None and keeps its durable pending record for a retry.
            log.warning("invalidation not published (redis failed): %s", exc)
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    # -- consume ------------------------------------------------------------------------------
    def start_from_now(self) -> None:
        """Pin the read position to the stream's current end (so `poll` sees only later events)."""
        try:
            info = self._reader.xinfo_stream(self.stream)
            last = info.get("last-generated-id") or info.get(b"last-generated-id")
            self._last_id = last.decode() if isinstance(last, bytes) else str(last)
        except redis.ResponseError as exc:
            # no stream yet: read from the start; any other error: from "now" on the next try
            self._last_id = "0-0" if "no such key" in str(exc).lower() else "$"
        except REDIS_ERRORS:
            self._last_id = "$"

    def poll(self, handler: Callable[[InvalidationEvent], None], block_ms: int | None = None) -> int:
        """Read and apply what is new; returns how many events were applied."""
        if self._last_id == "$":
            self.start_from_now()
        resp = self._reader.xread({self.stream: self._last_id}, count=READ_COUNT, block=block_ms)
        n = 0
        for _stream, entries in resp or []:
            for raw_id, raw in entries:
                event_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
                self._last_id = event_id
                fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                          for k, v in raw.items()}
                event = InvalidationEvent(
                    kind=fields.get("kind", ""),
                    keys=json.loads(fields["keys"]) if "keys" in fields else [],
                    prefix=fields.get("prefix", ""),
                    origin=fields.get("origin", ""),
                    id=event_id,
                )
                try:
                    handler(event)
                except Exception:  # one bad event must not stop the consumer
                    log.exception("invalidation handler failed on %s", event_id)
                n += 1
        self.applied += n
        return n

    def subscribe(self, handler: Callable[[InvalidationEvent], None]) -> None:
        """Apply every later event in a daemon thread until `close()`."""
        if self._thread is not None:
            return
        self.start_from_now()

        def run() -> None:
            while not self._stop.is_set():
                try:
                    self.poll(handler, block_ms=BLOCK_MS)
                except REDIS_ERRORS:
                    self._stop.wait(RECONNECT_SLEEP_S)

        self._thread = threading.Thread(target=run, name="tierserve-invalidation", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=BLOCK_MS / 1000 + 3)
            self._thread = None
        self.client.close()
        self._reader.close()


# Remove a pending record only if nobody re-armed it since it was read (same score): a newer
# event of the same entity keeps its own record. KEYS: zset; ARGV: member, score pairs.
_SETTLE = """
local n = 0
for i = 1, #ARGV, 2 do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i]); n = n + 1
  end
end
return n
"""
# Pending records settled per script call (bounds the script's run time and argument count).
SETTLE_BATCH = 256


class PendingInvalidations:
    """Durable "this entity's cached copies must still be dropped" records, in a Redis ZSET.

    Why: an invalidation that fails after its source-of-truth write (the cache Redis failed right
    after a Feast push) used to be lost; the old row then lived on in RAM and other replicas' SSD.
    The writer `arm`s a record *before* the write (score = when the retry is due), and the record
    is removed only after an invalidation that reached everyone. Every replica `sweep`s due
    records: drops the copies, publishes, and settles. Replaying an invalidation is harmless
    (idempotent), so two replicas sweeping the same record is only wasted work.
    The writer settles its own record once its invalidation reached everyone; the due time
    only matters when it did not (Redis failed, the writer died). Reads that straddle the write
    need no second drop: the cache's generation checks (caches/generations.py) refuse them.
    """

    def __init__(self, client: redis.Redis, key: str) -> None:
        self.client = client
        self.key = key
        self._settle = client.register_script(_SETTLE)

    def arm(self, member: str, due_in_s: float, *, pipe: redis.client.Pipeline | None = None) -> float:
        """Record before the write (raises a Redis error when the record cannot be made); with
        `pipe`, queued in the caller's pipeline (atomic with its other records). Returns the
        record's score, which `settle` needs."""
        score = time.time() + due_in_s
        (pipe if pipe is not None else self.client).zadd(self.key, {member: score})
        return score

    def due(self, limit: int = SETTLE_BATCH) -> list[tuple[str, float]]:
        raw = self.client.zrangebyscore(self.key, "-inf", time.time(), start=0, num=limit, withscores=True)
        return [(m.decode() if isinstance(m, bytes) else str(m), float(s)) for m, s in raw]

    def settle(self, records: list[tuple[str, float]]) -> int:
        n = 0
        for i in range(0, len(records), SETTLE_BATCH):
            args: list[object] = []
            for member, score in records[i : i + SETTLE_BATCH]:
                args += [member, repr(score)]
            n += int(self._settle(keys=[self.key], args=args))
        return n

    def count(self) -> int:
        return int(self.client.zcard(self.key))

    def sweep(self, apply: Callable[[list[str]], bool]) -> int:
        """Apply every due record; settle those `apply` confirms reached everyone. Raises Redis
        errors (the caller's loop retries on its next tick)."""
        records = self.due()
        if not records or not apply([m for m, _ in records]):
            return 0
        return self.settle(records)
