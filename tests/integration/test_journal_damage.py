"""A dead replica's event journal that SQLite finds damaged (feature_store/journal.py, `adopt`):
the entries still readable are adopted in order, the loss is logged, and the directory is kept
aside (`damaged-<name>`), never deleted and never adopted twice. A journal that never got its
table is still empty and reclaimed as before."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import sqlite3
from pathlib import Path

import pytest

from caches.tiered import claim_dir, reclaim_dead_dirs
from feature_store.events import Activity
from feature_store.journal import DAMAGED_PREFIX, FILE_NAME, EventJournal

PAGE = 4096  # SQLite's default page size, the journal's
EVENTS = 200


def _dead_journal(directory: Path) -> list[str]:
    """A dead replica's journal of EVENTS queued events, all in the main file; their event ids."""
    journal = EventJournal(directory)
    ids = [f"ev{i:04d}" for i in range(EVENTS)]
    for i, event_id in enumerate(ids):
        journal.append(Activity(7 + i % 3, 100 + i, "rating", 4.0, 1_700_000_000 + i, event_id), "acme")
    journal._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    journal.close()
    return ids


def _dead(tmp_path: Path) -> tuple[Path, Path, list[str], bytearray]:
    """A dead replica's journal under tmp_path: (the parent, its directory, its event ids, its file)."""
    parent = tmp_path / "journal"
    dead = parent / "recommender-dead"
    ids = _dead_journal(dead)
    return parent, dead, ids, bytearray((dead / FILE_NAME).read_bytes())


def _adopt_all(parent: Path) -> tuple[EventJournal, list[Path], object]:
    mine = parent / "recommender-alive"
    owner = claim_dir(mine)
    journal = EventJournal(mine)
    gone = reclaim_dead_dirs(parent, prefix="recommender-", keep=mine, salvage=journal.adopt)
    return journal, gone, owner


def _adopted_ids(journal: EventJournal) -> list[str]:
    return [str(e.activity.event_id) for e in journal.due(limit=10_000)]


def _damage_errors(caplog: pytest.LogCaptureFixture, dead: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and str(dead) in r.getMessage()]


def test_a_damaged_leaf_page_loses_only_its_entries_and_the_directory_is_kept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    parent, dead, ids, data = _dead(tmp_path)
    # a leaf page of the events table from the middle of the queue: its page header overwritten
    leaf = next(p for p in range(1, len(data) // PAGE)
                if data[p * PAGE] == 0x0D and b'"ev0100"' in data[p * PAGE:(p + 1) * PAGE])
    on_leaf = set(re.findall(rb'"(ev\d{4})"', bytes(data[leaf * PAGE:(leaf + 1) * PAGE])))
    data[leaf * PAGE:leaf * PAGE + 16] = b"\x5a" * 16
    (dead / FILE_NAME).write_bytes(bytes(data))
    damaged = bytes(data)
    with pytest.raises(sqlite3.DatabaseError):  # what the dead replica left: SQLite refuses a full read
        sqlite3.connect(dead / FILE_NAME).execute("SELECT body FROM events ORDER BY id").fetchall()

    with caplog.at_level(logging.ERROR, logger="tierserve.journal"):
        journal, _, owner = _adopt_all(parent)
    lost = {i.decode() for i in on_leaf}
    assert 0 < len(lost) < 50
    assert _adopted_ids(journal) == [i for i in ids if i not in lost]  # every other entry, in order
    assert journal.holds_user(7) and 100 in journal.items_of(7)
    aside = parent / f"{DAMAGED_PREFIX}recommender-dead"
    assert not dead.exists() and (aside / FILE_NAME).read_bytes() == damaged  # kept as found
    errors = _damage_errors(caplog, dead)
    assert len(errors) == 1, caplog.text
    assert f"adopted the {EVENTS - len(lost)} queued events" in errors[0]
    assert f"up to {len(lost)} lost" in errors[0] and str(aside) in errors[0]

    # the next start finds nothing more to adopt: no entry comes twice, the damaged copy stays
    assert reclaim_dead_dirs(parent, prefix="recommender-", keep=journal.directory,
                             salvage=journal.adopt) == []
    assert journal.count() == EVENTS - len(lost) and aside.is_dir()
    owner.close()


def test_a_damaged_header_is_repaired_in_a_copy_and_every_entry_adopted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    parent, dead, ids, data = _dead(tmp_path)
    data[:24] = b"\x5a" * 24  # the magic string, the page size, the format bytes
    (dead / FILE_NAME).write_bytes(bytes(data))
    with pytest.raises(sqlite3.DatabaseError, match="not a database"):
        sqlite3.connect(dead / FILE_NAME).execute("SELECT body FROM events").fetchall()

    with caplog.at_level(logging.ERROR, logger="tierserve.journal"):
        journal, _, owner = _adopt_all(parent)
    assert _adopted_ids(journal) == ids
    aside = parent / f"{DAMAGED_PREFIX}recommender-dead"
    assert not dead.exists() and (aside / FILE_NAME).read_bytes() == bytes(data)
    errors = _damage_errors(caplog, dead)
    assert len(errors) == 1 and f"adopted the {EVENTS} queued events" in errors[0], caplog.text
    owner.close()


def test_an_unreadable_file_loses_loudly_and_is_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    parent = tmp_path / "journal"
    dead = parent / "recommender-dead"
    _dead_journal(dead)
    garbage = bytes((i * 131 + 7) % 251 for i in range((dead / FILE_NAME).stat().st_size))
    (dead / FILE_NAME).write_bytes(garbage)

    with caplog.at_level(logging.ERROR, logger="tierserve.journal"):
        journal, _, owner = _adopt_all(parent)
    assert journal.count() == 0
    aside = parent / f"{DAMAGED_PREFIX}recommender-dead"
    assert not dead.exists() and (aside / FILE_NAME).read_bytes() == garbage
    errors = _damage_errors(caplog, dead)
    assert len(errors) == 1 and "an unknown number lost" in errors[0], caplog.text
    owner.close()


def test_a_damaged_schema_page_is_not_taken_for_a_journal_never_written(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Page 1 holds the schema: with its cell count zeroed SQLite says "no such table: events",
    what a never-written journal says too. A file with data pages behind it is damaged, not empty."""
    parent, dead, _, data = _dead(tmp_path)
    data[103:105] = b"\x00\x00"  # page 1's b-tree header (after the 100-byte file header): cell count
    (dead / FILE_NAME).write_bytes(bytes(data))
    with pytest.raises(sqlite3.OperationalError, match="no such table: events"):
        sqlite3.connect(dead / FILE_NAME).execute("SELECT body FROM events").fetchall()

    with caplog.at_level(logging.ERROR, logger="tierserve.journal"):
        journal, _, owner = _adopt_all(parent)
    aside = parent / f"{DAMAGED_PREFIX}recommender-dead"
    assert not dead.exists() and (aside / FILE_NAME).read_bytes() == bytes(data)  # kept, not deleted
    errors = _damage_errors(caplog, dead)
    assert len(errors) == 1 and "lost" in errors[0], caplog.text
    owner.close()


@pytest.mark.parametrize("state", ["empty file", "no table yet"])
def test_a_journal_that_was_never_written_is_reclaimed_quietly(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, state: str) -> None:
    parent = tmp_path / "journal"
    dead = parent / "recommender-dead"
    dead.mkdir(parents=True)
    if state == "empty file":
        (dead / FILE_NAME).write_bytes(b"")
    else:  # the replica died between opening its file and creating the table
        db = sqlite3.connect(dead / FILE_NAME)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA user_version = 1")
        db.close()
        assert (dead / FILE_NAME).stat().st_size > 0
    with caplog.at_level(logging.ERROR, logger="tierserve.journal"):
        journal, gone, owner = _adopt_all(parent)
    assert gone == [dead] and not dead.exists() and journal.count() == 0
    assert [p.name for p in parent.iterdir() if p.is_dir()] == ["recommender-alive"]
    assert _damage_errors(caplog, dead) == []
    owner.close()


def _queue_and_crash(directory: str, count: int) -> None:
    claim_dir(directory)
    journal = EventJournal(directory)
    for i in range(count):
        journal.append(Activity(5, 200 + i, "rating", 3.0, 1_700_000_000, f"wal{i:03d}"), "acme")
    os._exit(0)  # no close, no checkpoint: the entries are in the WAL only


def test_entries_only_in_a_crashed_replicas_wal_are_adopted_from_the_copy(tmp_path: Path) -> None:
    """adopt reads a copy of the file and its WAL: what a replica that crashed had not
    checkpointed is adopted too, and the dead files are not touched before they are removed."""
    parent = tmp_path / "journal"
    dead = parent / "recommender-dead"
    proc = multiprocessing.get_context("spawn").Process(target=_queue_and_crash, args=(str(dead), 50))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert (dead / f"{FILE_NAME}-wal").stat().st_size > 0
    journal, gone, owner = _adopt_all(parent)
    assert gone == [dead] and not dead.exists()
    assert _adopted_ids(journal) == [f"wal{i:03d}" for i in range(50)]
    assert [p.name for p in parent.iterdir() if p.is_dir()] == ["recommender-alive"]
    owner.close()
