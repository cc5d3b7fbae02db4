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
that matters (docs/operations.md). A dead replica's file that SQLite finds damaged (a bad page, a
broken header) is salvaged, not taken for empty: the entries that can still be read are adopted,
an error names the directory and what was lost, and the directory is renamed `damaged-<name>`:
kept for a manual recovery (`sqlite3 events.sqlite3 .recover`), never adopted again.

Ordering: per replica, entries are applied oldest first, and an event of a user with entries
still queued here joins the queue behind them. Across replicas there is no order (a queued
rating can land after a later one sent elsewhere); the features it changes are running means,
so the row comes out the same, except `last_ts`, which takes the maximum.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from feature_store.events import Activity

log = logging.getLogger("tierserve.journal")

FILE_NAME = "events.sqlite3"
# A dead replica's journal directory found damaged is renamed with this prefix: kept for a manual
# recovery, and out of the reach of `reclaim_dead_dirs` (it matches the replicas' own prefix only).
DAMAGED_PREFIX = "damaged-"
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
        """Move a dead replica's queued entries behind ours (their order kept); returns how many.

        A file without the events table (the replica died before its first write) holds nothing.
        A damaged one (SQLite: malformed, not a database) is salvaged: the entries still readable
        are adopted, in order, an error names what was lost, and the directory is renamed
        `damaged-<name>` (see `DAMAGED_PREFIX`), so the caller's reclaim finds nothing left to
        delete and no later start adopts the same entries again. Any other failure (the disk, a
        lock) raises: the caller keeps the directory for the next start.

        Each entry is adopted once: the caller holds the dead directory's owner lock (see
        `reclaim_dead_dirs`). Only a crash between our commit and the directory's removal (or
        renaming) adopts entries twice; their event ids make the second application a no-op
        (feature_store/events.py), as before."""
        directory = Path(other_dir)
        other = directory / FILE_NAME
        if not other.exists():
            return 0
        damage: str | None = None
        lost: int | None = 0
        try:
            # Read a copy: the dead replica's files stay exactly as found (SQLite would otherwise
            # checkpoint its WAL into a damaged file on close, and the header repair writes).
            with tempfile.TemporaryDirectory(prefix=".adopt-", dir=self.directory) as tmp:
                copy = _copy_journal(other, Path(tmp))
                try:
                    rows = _read_all(copy)
                except sqlite3.DatabaseError as exc:
                    if _no_events_table(exc) and _pages(copy) <= 1:
                        return 0  # never written: nothing was queued in it
                    # "no such table" from a file with data pages is a damaged schema page
                    if not (_no_events_table(exc) or _is_damage(exc)):
                        raise
                    damage = f"{type(exc).__name__}: {exc}"
                    rows, lost = _salvage(copy)
        except Exception as exc:
            log.error("could not read the event journal of a dead replica at %s (%s): its queued events "
                      "stay there for the next start", directory, exc)
            raise
        usable = [r for r in rows if _usable(r)]
        if len(usable) < len(rows):
            damage = damage or "entries that do not decode"
            lost = None if lost is None else lost + len(rows) - len(usable)
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT INTO events (user_id, body, tenant, accepted_at) VALUES (?, ?, ?, ?)",
                                     [r[1:] for r in usable])
                self._db.execute("COMMIT")
            except sqlite3.Error:
                # a full or failing disk: leave no transaction open, or this replica's own later
                # appends would never be committed (the caller keeps the dead directory)
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            self._users.update(int(r[1]) for r in usable)
        if damage is not None:
            aside = _aside_name(directory)
            log.error("the event journal of a dead replica at %s is damaged (%s): adopted the %d queued events "
                      "still readable, %s lost; the directory is kept as %s for a manual recovery",
                      directory, damage, len(usable),
                      "an unknown number" if lost is None else f"up to {lost}" if lost else "none",
                      aside)
            try:
                os.rename(directory, aside)
            except OSError:
                log.error("could not rename %s to %s: the next start adopts its readable events again "
                          "(their event ids keep them from being applied twice)", directory, aside)
                raise
        return len(usable)

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --- reading a dead replica's journal ----------------------------------------------------------

_ROWS = "SELECT id, user_id, body, tenant, accepted_at FROM events"
_SQLITE_MAGIC = b"SQLite format 3\x00"
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_MAX_ID = 2**63 - 1


def _copy_journal(path: Path, into: Path) -> Path:
    """The database file and its WAL (the committed entries not checkpointed yet), copied; the
    shared-memory index is rebuilt from the WAL when the copy is opened."""
    copy = into / path.name
    shutil.copyfile(path, copy)
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        shutil.copyfile(wal, into / wal.name)
    return copy


def _read_all(path: Path) -> list[tuple]:
    src = sqlite3.connect(path)
    try:
        return src.execute(_ROWS + " ORDER BY id").fetchall()
    finally:
        src.close()


def _pages(path: Path) -> int:
    """Pages in a journal file (a never-written one has at most its first); unreadable: a lot."""
    try:
        src = sqlite3.connect(path)
        try:
            return int(src.execute("PRAGMA page_count").fetchone()[0])
        finally:
            src.close()
    except sqlite3.DatabaseError:
        return 2**31


def _no_events_table(exc: sqlite3.DatabaseError) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and str(exc) == "no such table: events"


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    """SQLite's own verdict that the file is damaged, as opposed to a failure of the disk or a lock."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc)
    return text in ("database disk image is malformed", "file is not a database") or text.startswith(
        "malformed database schema")


def _repair_header(path: Path) -> None:
    """Put back the header fields whose value is fixed for this journal (the magic string, the
    default page size, the WAL format, the payload fractions) where they are not valid: a header
    whose first bytes were overwritten otherwise makes every page unreadable."""
    with open(path, "r+b") as f:
        head = bytearray(f.read(100))
        if len(head) < 100:
            return
        fixed = bytearray(head)
        fixed[:16] = _SQLITE_MAGIC
        size = int.from_bytes(head[16:18], "big")
        if not (size == 1 or (512 <= size <= 32768 and size & (size - 1) == 0)):
            fixed[16:18] = (4096).to_bytes(2, "big")  # SQLite's default: the one this journal uses
        for at in (18, 19):
            if fixed[at] not in (1, 2):
                fixed[at] = 2  # WAL
        fixed[21:24] = bytes((64, 32, 32))
        if fixed != head:
            f.seek(0)
            f.write(fixed)


def _salvage(path: Path) -> tuple[list[tuple], int | None]:
    """The entries of a damaged file that can still be read, in id order, and how many ids were
    skipped over unreadable pages (an upper bound on the entries lost: ids are given in order and
    entries leave from the head), None when unknown.

    A damaged table leaf fails every read that reaches it, whether stepping into it or seeking to a
    key in its range; a seek past its range reads on from the next leaf. So: read in batches; at a
    failure, read one entry at a time up to the damage (a failed batch returns none of its rows),
    then find an id from which a read succeeds again (a doubling probe, then a bisection), and
    read on from there. It is the smallest such id unless a probe jumped over a short readable run
    between two damaged leaves: those entries then count as lost (the bound stays true)."""
    _repair_header(path)
    src = sqlite3.connect(path)

    def read_from(first: int, limit: int) -> list[tuple]:
        # LIMIT 1 stops on the row: it never steps into the damage behind it
        return src.execute(_ROWS + " WHERE id >= ? ORDER BY id LIMIT ?", (first, limit)).fetchall()

    def readable_from(first: int) -> bool:
        try:
            read_from(first, 1)
        except sqlite3.DatabaseError:
            return False
        return True

    def resume_point(bad: int) -> int | None:
        step = 1
        while True:
            probe = min(_MAX_ID, bad + step)
            if readable_from(probe):
                break
            if probe == _MAX_ID:
                return None
            bad, step = probe, step * 2
        good = probe
        while good - bad > 1:
            mid = (bad + good) // 2
            if readable_from(mid):
                good = mid
            else:
                bad = mid
        return good

    def last_id() -> int | None:
        found = []
        for query in ("SELECT seq FROM sqlite_sequence WHERE name = 'events'", "SELECT max(id) FROM events"):
            try:
                row = src.execute(query).fetchone()
            except sqlite3.DatabaseError:
                continue
            if row is not None and row[0] is not None:
                found.append(int(row[0]))
        return max(found) if found else None

    rows: list[tuple] = []
    at, skipped = 1, 0  # the lowest id not read yet (AUTOINCREMENT ids start at 1)
    try:
        while True:
            try:
                batch = read_from(at, 256)
            except sqlite3.DatabaseError:
                try:
                    while batch := read_from(at, 1):
                        rows.append(batch[0])
                        at = int(batch[0][0]) + 1
                except sqlite3.DatabaseError:
                    pass
                else:
                    return rows, skipped
                resume = resume_point(at)
                if resume is None:
                    last = last_id()
                    return rows, None if last is None else skipped + max(0, last - at + 1)
                skipped += resume - at
                at = resume
                continue
            if not batch:
                return rows, skipped
            rows.extend(batch)
            at = int(batch[-1][0]) + 1
    finally:
        src.close()


def _usable(row: tuple) -> bool:
    """Whether an entry read back decodes (an undetected bad byte must not stop the queue)."""
    _, user_id, body, tenant, accepted_at = row
    try:
        return (isinstance(tenant, str) and isinstance(accepted_at, (int, float))
                and _decode(body).user_id == int(user_id))
    except (TypeError, ValueError, KeyError, AttributeError):
        return False


def _aside_name(directory: Path) -> Path:
    target = directory.with_name(f"{DAMAGED_PREFIX}{directory.name}")
    n = 1
    while target.exists():
        target = directory.with_name(f"{DAMAGED_PREFIX}{directory.name}.{n}")
        n += 1
    return target
