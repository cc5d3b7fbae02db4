"""A replica's durable queue of events it accepted but could not apply yet.

Why: an event arrives while the cache Redis (the per-user lock, the pending-invalidation record)
or Feast (the row to update) is down or too slow. Refusing it (503) pushes the outage onto every
client, which must hold the event and retry; accepting it without writing it anywhere loses it.
So the event goes to a local SQLite file first (WAL, `synchronous=FULL`: on disk before the 202),
and the replica's watcher applies it through the normal path, in arrival order, once the
dependencies answer again. The 202 says `"recorded": "queued"`: the event is kept, not yet in
the user's recommendations (read-your-writes starts when it is applied).

Durability is the disk's: a replica that dies leaves its file behind, and the next replica to
start on that disk adopts its entries (`adopt`) before the directory is reclaimed. A pod whose
disk goes with it (an `emptyDir`) loses what it had queued: mount a volume at `state_dir` where
that matters (docs/operations.md).

Ordering: per replica, entries are applied oldest first, and an event of a user with entries
still queued here joins the queue behind them. Across replicas there is no order (a queued
rating can land after a later one sent elsewhere); the features it changes are running means,
so the row comes out the same, except `last_ts`, which takes the maximum.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from feature_store.events import Activity

FILE_NAME = "events.sqlite3"
# A failed replay is tried again after this long (doubling, up to the cap): an outage costs one
# attempt per interval, not one per watcher tick.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL,
    body TEXT NOT NULL,
    tenant TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_user ON events (user_id);
"""


@dataclass(frozen=True)
class QueuedEvent:
    id: int
    activity: Activity
    tenant: str
    accepted_at: float
    attempts: int


def _encode(activity: Activity) -> str:
    return json.dumps({"user_id": activity.user_id, "item_id": activity.item_id, "type": activity.type,
                       "value": activity.value, "ts": activity.ts, "event_id": activity.event_id})


def _decode(body: str) -> Activity:
    raw = json.loads(body)
    event_id = raw.get("event_id")  # absent in entries queued before ids existed
    return Activity(int(raw["user_id"]), int(raw["item_id"]), str(raw["type"]),
                    None if raw["value"] is None else float(raw["value"]), int(raw["ts"]),
                    None if event_id is None else str(event_id))


class EventJournal:
    """One SQLite file; safe to share between the replica's request threads and its watcher."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / FILE_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # the 202 promises the event is on disk
        self._db.executescript(_SCHEMA)
        # Users with queued entries, in memory: the hot path asks "anything queued for this
        # user?" on every answer, and almost always the answer is no.
        self._users: Counter[int] = Counter(
            int(u) for (u,) in self._db.execute("SELECT user_id FROM events").fetchall())

    def append(self, activity: Activity, tenant: str) -> int:
        """Write the event (durable when this returns); its id in this journal."""
        with self._lock:
            cur = self._db.execute("INSERT INTO events (user_id, body, tenant, accepted_at) VALUES (?, ?, ?, ?)",
                                   (activity.user_id, _encode(activity), tenant, time.time()))
            self._users[activity.user_id] += 1
            return int(cur.lastrowid or 0)

    def holds_user(self, user_id: int) -> bool:
        """Whether events of this user are still queued here (a new one must queue behind them)."""
        return self._users[user_id] > 0

    def items_of(self, user_id: int) -> set[int]:
        """Items of this user's queued ratings (answers leave them out, as they would once applied)."""
        if not self.holds_user(user_id):
            return set()
        with self._lock:
            rows = self._db.execute("SELECT body FROM events WHERE user_id = ?", (user_id,)).fetchall()
        return {a.item_id for a in (_decode(r[0]) for r in rows) if a.type == "rating"}

    def due(self, limit: int = 64, now: float | None = None) -> list[QueuedEvent]:
        """The oldest entries, in order, if the oldest is due for a try (an entry waiting for its
        retry holds back those behind it: order is kept)."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute("SELECT id, body, tenant, accepted_at, attempts, next_try FROM events "
                                    "ORDER BY id LIMIT ?", (limit,)).fetchall()
        if not rows or rows[0][5] > now:
            return []
        return [QueuedEvent(int(r[0]), _decode(r[1]), str(r[2]), float(r[3]), int(r[4])) for r in rows]

    def done(self, entry: QueuedEvent) -> None:
        with self._lock:
            if self._db.execute("DELETE FROM events WHERE id = ?", (entry.id,)).rowcount:
                user = entry.activity.user_id
                self._users[user] -= 1
                if self._users[user] <= 0:
                    del self._users[user]  # a long-lived replica must not keep every user it ever queued

    def retry_later(self, entry: QueuedEvent, now: float | None = None) -> float:
        """Count a failed try; returns the delay before the next one."""
        delay = min(RETRY_MAX_S, RETRY_FIRST_S * (2 ** entry.attempts))
        with self._lock:
            self._db.execute("UPDATE events SET attempts = attempts + 1, next_try = ? WHERE id = ?",
                             ((time.time() if now is None else now) + delay, entry.id))
        return delay

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def adopt(self, other_dir: Path | str) -> int:
        """Move a dead replica's queued entries behind ours (their order kept); returns how many."""
        other = Path(other_dir) / FILE_NAME
        if not other.exists():
            return 0
        src = sqlite3.connect(other)
        try:
            rows = src.execute("SELECT user_id, body, tenant, accepted_at FROM events ORDER BY id").fetchall()
        except sqlite3.DatabaseError:
            rows = []  # a file that never got its table: nothing was queued in it
        finally:
            src.close()
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO events (user_id, body, tenant, accepted_at) VALUES (?, ?, ?, ?)", rows)
            self._db.execute("COMMIT")
            self._users.update(int(r[0]) for r in rows)
        return len(rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()
