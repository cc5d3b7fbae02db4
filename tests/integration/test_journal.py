"""The replica's event journal (feature_store/journal.py) on real SQLite files: durable order,
retries that keep order, and a dead replica's queue adopted, never dropped."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from pathlib import Path

from caches.tiered import claim_dir, reclaim_dead_dirs
from feature_store.events import Activity
from feature_store.journal import RETRY_FIRST_S, EventJournal


def rating(user: int, item: int, value: float = 4.0, ts: int = 1_700_000_000) -> Activity:
    return Activity(user, item, "rating", value, ts)


def test_entries_come_back_in_order_and_survive_a_reopen(tmp_path: Path) -> None:
    journal = EventJournal(tmp_path / "j")
    ids = [journal.append(rating(1, 10), "t"), journal.append(Activity(2, 20, "view"), "t"), journal.append(rating(1, 11), "t")]
    assert journal.holds_user(1) and journal.holds_user(2) and not journal.holds_user(3)
    assert journal.items_of(1) == {10, 11} and journal.items_of(2) == set()  # a view rates nothing
    journal.close()

    reopened = EventJournal(tmp_path / "j")  # what a replica finds after a crash: all of it
    due = reopened.due()
    assert [e.id for e in due] == ids
    assert due[0].activity == rating(1, 10) and due[1].activity == Activity(2, 20, "view", None, due[1].activity.ts)
    reopened.done(due[0])
    assert [e.id for e in reopened.due()] == ids[1:] and reopened.count() == 2
    assert reopened.items_of(1) == {11}
    reopened.done(due[2])
    assert not reopened.holds_user(1) and reopened.holds_user(2)


def test_a_failed_try_holds_back_everything_behind_it_until_its_retry(tmp_path: Path) -> None:
    journal = EventJournal(tmp_path / "j")
    first, second = journal.append(rating(1, 10), "t"), journal.append(rating(2, 20), "t")
    head = journal.due()[0]
    now = 1_000.0
    delay = journal.retry_later(head, now=now)
    assert delay == RETRY_FIRST_S
    assert journal.due(now=now) == []  # the second entry waits too: order is kept
    due = journal.due(now=now + delay + 0.01)
    assert [e.id for e in due] == [first, second] and due[0].attempts == 1
    assert journal.retry_later(due[0], now=now) == 2 * RETRY_FIRST_S  # backs off


def _own_and_die(directory: str, users: list[int]) -> None:
    claim_dir(directory)  # the owner lock lives as long as this process
    journal = EventJournal(directory)
    for u in users:
        journal.append(rating(u, 100 + u), "t")


def test_a_dead_replicas_queue_is_adopted_before_its_directory_goes(tmp_path: Path) -> None:
    parent = tmp_path / "journal"
    dead = parent / "recommender-dead"
    proc = multiprocessing.get_context("spawn").Process(target=_own_and_die, args=(str(dead), [7, 8]))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0

    mine = parent / "recommender-alive"
    owner = claim_dir(mine)
    journal = EventJournal(mine)
    journal.append(rating(1, 10), "t")
    gone = reclaim_dead_dirs(parent, prefix="recommender-", keep=mine, salvage=journal.adopt)
    assert gone == [dead] and not dead.exists()
    assert [(e.activity.user_id, e.activity.item_id) for e in journal.due()] == [(1, 10), (7, 107), (8, 108)]
    assert journal.holds_user(7) and journal.items_of(8) == {108}
    owner.close()


def test_a_directory_whose_salvage_fails_is_kept_for_the_next_start(tmp_path: Path) -> None:
    parent = tmp_path / "journal"
    dead = parent / "recommender-dead"
    EventJournal(dead).append(rating(3, 30), "t")  # never claimed: no live owner

    def broken(_: Path) -> int:
        raise OSError("disk full")

    assert reclaim_dead_dirs(parent, prefix="recommender-", salvage=broken) == []
    assert (dead / "events.sqlite3").exists()


def test_two_replicas_starting_together_adopt_a_dead_queue_once(tmp_path: Path) -> None:
    """Each queued event applied once: while one replica salvages a dead directory (it holds the
    directory's owner lock for that), another starting at the same moment leaves it alone."""
    parent = tmp_path / "journal"
    dead = parent / "recommender-dead"
    proc = multiprocessing.get_context("spawn").Process(target=_own_and_die, args=(str(dead), [7, 8, 9]))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    journals = {name: EventJournal(parent / f"recommender-{name}") for name in ("a", "b")}
    owners = [claim_dir(parent / f"recommender-{name}") for name in journals]
    adopted: dict[str, int] = {}

    def salvage_as(name: str, inner: str | None = None) -> Callable[[Path], int]:
        def salvage(path: Path) -> int:
            adopted[name] = journals[name].adopt(path)
            if inner is not None:  # the other replica's start, while this one is mid-salvage
                reclaim_dead_dirs(parent, prefix="recommender-", keep=parent / f"recommender-{inner}",
                                  salvage=salvage_as(inner))
            return adopted[name]
        return salvage

    gone = reclaim_dead_dirs(parent, prefix="recommender-", keep=parent / "recommender-a", salvage=salvage_as("a", "b"))
    assert gone == [dead] and not dead.exists()
    assert adopted == {"a": 3}  # b found the directory taken and adopted nothing
    assert journals["a"].count() == 3 and journals["b"].count() == 0
    for owner in owners:
        owner.close()


def test_an_events_id_survives_the_queue_a_reopen_and_an_adoption(tmp_path: Path) -> None:
    """The id is what keeps a replayed event from being applied twice (feature_store/events.py)."""
    dead = EventJournal(tmp_path / "dead")
    dead.append(Activity(1, 10, "view", ts=5, event_id="a1b2c3d4e5f6"), "t")
    dead.close()
    assert EventJournal(tmp_path / "dead").due()[0].activity.event_id == "a1b2c3d4e5f6"
    ours = EventJournal(tmp_path / "ours")
    assert ours.adopt(tmp_path / "dead") == 1
    assert ours.due()[0].activity == Activity(1, 10, "view", ts=5, event_id="a1b2c3d4e5f6")
    # an entry queued by a release before ids: read back without one (applied as before)
    ours._db.execute("INSERT INTO events (user_id, body, tenant, accepted_at) VALUES (2, ?, 't', 0)",
                     ('{"user_id": 2, "item_id": 20, "type": "view", "value": null, "ts": 6}',))
    assert ours.due()[1].activity == Activity(2, 20, "view", ts=6)
