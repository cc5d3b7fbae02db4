"""User events against a real Feast repo, real Redis and real RocksDB (feature_store/events.py).

One small repository is built per module from a slice of the MovieLens sample (about 10-30 s,
most of it `import feast`). Two FeatureCaches on the same Redis with their own RocksDB folders
stand in for two Recommender replicas. The Recommender's own Redis operations (the request path's
read of a user's state, an event's writes, the pending replay) run through the real `RecsModel`
and `EventRecorder` the deployment wires, on one server and on the 3-master cluster
(deployments/recommender_keys.py says where each key lives on a cluster).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from caches.features import FeatureCache
from caches.redis_client import is_cluster, make_client
from caches.versions import Leased
from deployments import recommender_events
from deployments.config import RecommenderSettings
from deployments.recommender_events import EventRecorder
from deployments.recommender_keys import audited_keys, event_lock_key, read_user, remember_unknown
from deployments.recommender_model import RecsModel
from feature_store import names
from feature_store.events import (
    APPLIED_EVENTS_KEPT,
    EVENT_ID_CHARS,
    Activity,
    EventRejected,
    FeatureStoreUnavailable,
    UserActivityWriter,
    already_applied,
    client_event_id,
    fold_in_embedding,
    new_event_id,
    updated_user_row,
)
from feature_store.journal import EventJournal
from feature_store.pipeline import RepoInfo
from tests.slow_redis import node_of, stalled
from tests.support import item_features, user_cache

# Longer than the recorder's Redis timeout (caches/redis_client.py SOCKET_TIMEOUT_S): the lock's
# SET NX sent during it runs on the server after the recorder gave up on the reply.
LOCK_STALL_S = 2.0


@pytest.fixture
def redis_url(both_redis_urls: str) -> str:
    """Every test here that uses Redis runs on the single server and on the 3-master cluster."""
    return both_redis_urls


@pytest.fixture
def replicas(repo: RepoInfo, redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[list[FeatureCache]]:
    caches = [user_cache(repo, redis_url, tmp_path / f"replica-{i}") for i in range(2)]
    yield caches
    for c in caches:
        c.close()


def test_activity_parse_rejects_bad_events() -> None:
    with pytest.raises(EventRejected) as err:
        Activity.parse({"user_id": 1, "item_id": 2, "type": "rating"})
    assert err.value.status == 422 and "value" in err.value.message
    with pytest.raises(EventRejected):
        Activity.parse({"user_id": 1, "item_id": 2, "type": "purchase"})
    assert Activity.parse({"user_id": 1, "item_id": 2, "type": "view"}, now=5).ts == 5


def test_updated_row_is_the_running_mean() -> None:
    genres = ["Action", "Comedy", "Drama"]
    current = {"n_ratings": 3, "mean_rating": 3.0, "last_ts": 100, "genre_affinity": [1.0, 0.0, 1 / 3],
               "embedding": [0.6, 0.8, 0.0]}
    item = {"genres": ["Comedy", "Unknown"], "embedding": [0.0, 0.6, 0.8]}
    row = updated_user_row(current, Activity(7, 9, "rating", 5.0, ts=200), item, genres)
    assert row[names.USER_KEY] == 7 and row["n_ratings"] == 4 and row["last_ts"] == 200
    assert row["mean_rating"] == pytest.approx((3 * 3.0 + 5.0) / 4)
    assert row["genre_affinity"] == pytest.approx([0.75, 0.25, 0.25])
    assert row["embedding"] == current["embedding"]  # only the pipeline re-learns embeddings
    assert row["rated_since_build"] == [9]  # the durable half of the "already rated" filter
    again = updated_user_row({**current, "rated_since_build": [4, 9]}, Activity(7, 9, "rating", 5.0, ts=201), item, genres)
    assert again["rated_since_build"] == [4, 9]  # a replayed event adds nothing twice
    view = updated_user_row(current, Activity(7, 9, "view", ts=50), item, genres)
    assert (view["n_ratings"], view["mean_rating"], view["last_ts"]) == (3, 3.0, 100)
    assert view["rated_since_build"] == []  # a view is not a rating
    # A never-seen user: folded in at the item, in the user half of the space (last coordinate 0).
    new = updated_user_row(None, Activity(8, 9, "rating", 4.0, ts=300), item, genres)
    assert new["n_ratings"] == 1 and new["mean_rating"] == 4.0 and new["genre_affinity"] == [0.0, 1.0, 0.0]
    assert new["rated_since_build"] == [9]
    assert new["embedding"] == pytest.approx([0.0, 1.0, 0.0])
    assert fold_in_embedding([0.0, 0.0, 1.0]) == [0.0, 0.0, 0.0]


def test_a_row_remembers_its_latest_event_ids_and_knows_a_replay() -> None:
    genres = ["Action"]
    item = {"genres": ["Action"], "embedding": [1.0, 0.0]}
    row: dict | None = None
    for i in range(APPLIED_EVENTS_KEPT + 3):
        row = updated_user_row(row, Activity(7, 9, "view", ts=i, event_id=f"e{i}"), item, genres)
    assert row is not None
    assert row["applied_events"] == [f"e{i}" for i in range(3, APPLIED_EVENTS_KEPT + 3)]  # the latest, bounded
    assert already_applied(row, Activity(7, 9, "view", event_id=f"e{APPLIED_EVENTS_KEPT + 2}"))
    assert not already_applied(row, Activity(7, 9, "view", event_id="e0"))  # fell out of the window
    assert not already_applied(row, Activity(7, 9, "view"))  # no id (queued before ids existed)
    assert not already_applied(None, Activity(7, 9, "view", event_id="e3"))
    assert updated_user_row(row, Activity(7, 9, "view"), item, genres)["applied_events"] == row["applied_events"]
    assert len(new_event_id()) == EVENT_ID_CHARS and new_event_id() != new_event_id()


def test_rating_push_updates_the_online_store(repo: RepoInfo, writer: UserActivityWriter) -> None:
    user = repo.user_ids_sample[0]
    before = writer.current_row(user)
    assert before is not None
    item_id = repo.popular_items[0]
    row, new_user = writer.record(Activity(user, item_id, "rating", 5.0), item_features(writer, item_id), repo.genres)
    assert not new_user
    after = writer.current_row(user)
    assert after is not None
    assert after["n_ratings"] == before["n_ratings"] + 1 == row["n_ratings"]
    n = before["n_ratings"]
    assert after["mean_rating"] == pytest.approx((before["mean_rating"] * n + 5.0) / (n + 1), rel=1e-5)
    assert after["last_ts"] >= int(time.time()) - 60
    assert np.allclose(after["embedding"], before["embedding"])
    # Built empty, then the rated item, read back from Feast: it survives any cache Redis.
    assert list(before["rated_since_build"] or []) == []
    assert list(after["rated_since_build"]) == [item_id]


def test_never_seen_user_gets_a_folded_in_row(repo: RepoInfo, writer: UserActivityWriter) -> None:
    user = 10**9 + 7
    assert writer.current_row(user) is None
    item_id = repo.popular_items[1]
    item = item_features(writer, item_id)
    _, new_user = writer.record(Activity(user, item_id, "click"), item, repo.genres)
    assert new_user
    row = writer.current_row(user)
    assert row is not None and row["n_ratings"] == 0
    emb = np.asarray(row["embedding"])
    assert emb[-1] == 0.0 and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
    assert float(emb @ np.asarray(item["embedding"])) > 0.5  # next to the item it clicked


def test_event_invalidates_every_replicas_tiers(
    repo: RepoInfo, writer: UserActivityWriter, replicas: list[FeatureCache]
) -> None:
    a, b = replicas
    user = repo.user_ids_sample[1]
    key = b.key(user)
    # Both "replicas" hold the user: B read it from Feast (RAM + its SSD), A from RAM or Feast.
    first = b.get([user])
    assert first.sources[user] == "feast"
    a.get([user])
    assert key in b.tiered.ssd.get_many([key])
    old_n = first.features[user]["n_ratings"]

    item_id = repo.popular_items[2]
    writer.record(Activity(user, item_id, "rating", 1.0), item_features(writer, item_id), repo.genres)
    a.invalidate([user])  # what the Recommender does after the push

    # B drops its SSD copy when the stream reaches it (its consumer thread), without being asked.
    deadline = time.monotonic() + 10
    while key in b.tiered.ssd.get_many([key]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert key not in b.tiered.ssd.get_many([key]), "replica B kept its stale SSD copy"
    fresh = b.get([user])
    assert fresh.sources[user] == "feast"
    assert fresh.features[user]["n_ratings"] == old_n + 1
    assert a.get([user]).features[user]["n_ratings"] == old_n + 1


def test_unreachable_online_store_is_reported_and_recovers(repo: RepoInfo, tmp_path: Path) -> None:
    writer = UserActivityWriter(repo.repo_dir)
    user = repo.user_ids_sample[2]
    assert writer.current_row(user) is not None
    db = repo.repo_dir / names.ONLINE_DB
    backup = tmp_path / "online_store.db"
    shutil.copyfile(db, backup)
    # The file is emptied in place: a live sqlite connection notices (a rename would not: it
    # keeps reading the old inode), the way a lost volume remounted empty would look.
    with open(db, "r+b") as f:
        f.truncate(0)
    try:
        with pytest.raises(FeatureStoreUnavailable, match="read"):
            writer.current_row(user)
        with pytest.raises(FeatureStoreUnavailable):
            writer.push({names.USER_KEY: user, "n_ratings": 1, "mean_rating": 1.0, "last_ts": 1,
                         "genre_affinity": [0.0] * len(repo.genres), "embedding": [0.0] * repo.embedding_dim})
    finally:
        shutil.copyfile(backup, db)
    assert writer.current_row(user) is not None  # reopened on the next call


# ---- the Recommender's own Redis operations (RecsModel + EventRecorder) -------------------------
def open_model(repo: RepoInfo, redis_url: str, root: Path, tiers: str = "all") -> RecsModel:
    settings = RecommenderSettings(feast_repo=str(repo.repo_dir), tiers=tiers)  # type: ignore[arg-type]
    return RecsModel(settings, repo, version=repo.model_version, slot=1, redis_url=redis_url, rocksdb_root=root)


@pytest.fixture
def wired(repo: RepoInfo, writer: UserActivityWriter, redis_client: redis.Redis, redis_url: str,
          tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[RecsModel, EventRecorder]]:
    """One replica's model version and event recorder, as RecommenderDeployment wires them."""
    tiers = getattr(request, "param", "all")
    model = open_model(repo, redis_url, tmp_path / "rocksdb", tiers)
    client = make_client(redis_url)
    recorder = EventRecorder(client, writer, EventJournal(tmp_path / "journal"), Leased(model, lambda m: m.close()),
                             "replica-a")
    yield model, recorder
    model.close()
    client.close()


def unrated_item(repo: RepoInfo, model: RecsModel, user: int) -> int:
    return next(i for i in repo.popular_items if i not in model.rated.get(user, set()) and i in model.index.ids)


def test_an_event_moves_the_counter_the_request_path_reads_and_is_audited(
    repo: RepoInfo, wired: tuple[RecsModel, EventRecorder]
) -> None:
    m, recorder = wired
    client = recorder.redis
    user = repo.user_ids_sample[3]
    before = read_user(client, m.keys, m.version, user)
    row = m.users.get([user], {user: before.generation})  # warm: the row is filled into the tiers
    n_before = row.features[user]["n_ratings"]
    item = unrated_item(repo, m, user)

    out = recorder.record(m, Activity(user, item, "rating", 4.0), "acme")
    assert out["status"] == 202 and out["recorded"] == "applied", out
    assert out["invalidation"] == "published" and recorder.pending.count() == 0

    after = read_user(client, m.keys, m.version, user)
    assert after.generation == before.generation + 1 and str(item).encode() in after.rated_since
    # The counter the request path reads is the one the tier's checked writes compare (on a
    # cluster its name carries the tier group's tag): results keyed on it move with every event.
    assert m.users.tiered.generations is not None
    assert m.users.tiered.generations.read([m.users.key(user)]) == {m.users.key(user): after.generation}
    fresh = m.users.get([user], {user: after.generation})
    assert fresh.sources[user] == "feast" and fresh.features[user]["n_ratings"] == n_before + 1
    # Cached again under the new generation (the checked write compared the same counter).
    assert m.users.get([user], {user: after.generation}).sources[user] in ("redis", "rocksdb")

    ((_, fields),) = client.xrange(m.keys.audit, out["audit_id"], out["audit_id"])
    assert {k.decode(): v.decode() for k, v in fields.items()}["tenant"] == "acme"
    if is_cluster(client):  # one slot per multi-key command
        assert client.keyslot(m.keys.pending) == client.keyslot(m.keys.audit)
        assert client.keyslot(m.keys.generation(user)) == client.keyslot(m.keys.unknown(m.version, user))


def test_the_unknown_user_memo_holds_until_the_users_generation_moves(
    wired: tuple[RecsModel, EventRecorder]
) -> None:
    m, recorder = wired
    client, user = recorder.redis, 10**9 + 11
    state = read_user(client, m.keys, m.version, user)
    # a new counter starts at the server clock in microseconds, never at 0 (caches/generations.py)
    assert state.generation > 10**15 and (state.unknown, state.rated_since) == (False, set())
    remember_unknown(client, m.keys, m.version, user, state.generation, 30.0)
    assert read_user(client, m.keys, m.version, user).unknown
    assert m.users.invalidate([user], bump=True)
    moved = read_user(client, m.keys, m.version, user)
    assert moved.generation == state.generation + 1 and not moved.unknown


def test_a_read_of_an_id_nobody_uses_leaves_no_key_for_good(wired: tuple[RecsModel, EventRecorder]) -> None:
    """Reading a user's state starts their generation counter: with a TTL (the rows' own), given
    again by each read and bump, so a flood of ids nobody uses cannot fill Redis with keys that
    `volatile-lru` never evicts. A counter that expires starts again above every copy it tagged."""
    m, recorder = wired
    client, user = recorder.redis, 10**9 + 12
    counter = m.keys.generation(user)
    first = read_user(client, m.keys, m.version, user, counter_ttl_s=60.0).generation
    assert 0 < client.pttl(counter) <= 60_000
    client.pexpire(counter, 1_000)
    read_user(client, m.keys, m.version, user, counter_ttl_s=60.0)  # read again: its TTL again
    assert client.pttl(counter) > 1_000
    client.delete(counter)  # expired (or evicted)
    assert read_user(client, m.keys, m.version, user, counter_ttl_s=60.0).generation > first


def test_an_invalidation_that_did_not_reach_everyone_stays_pending_until_a_sweep_settles_it(
    repo: RepoInfo, wired: tuple[RecsModel, EventRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    m, recorder = wired
    client, user = recorder.redis, repo.user_ids_sample[4]
    before = read_user(client, m.keys, m.version, user).generation
    monkeypatch.setattr(recommender_events, "PENDING_REPLAY_S", 0.0)  # due at once
    # The fault after the push: the invalidation reports it did not reach everyone (the
    # deployment's own path when Redis fails right then; tests/e2e/test_recommender.py makes
    # Redis refuse it for real on one server).
    monkeypatch.setattr(recorder, "invalidate_users", lambda _m, _users: False)
    out = recorder.record(m, Activity(user, unrated_item(repo, m, user), "view"), "acme")
    assert out["invalidation"] == "pending" and "retried" in out["warning"]
    assert recorder.pending.count() == 1 and read_user(client, m.keys, m.version, user).generation == before
    monkeypatch.undo()
    assert recorder.pending.sweep(recorder.invalidate_users_of) == 1  # what every replica's watcher runs
    assert recorder.pending.count() == 0 and read_user(client, m.keys, m.version, user).generation == before + 1


@pytest.mark.parametrize("wired", ["feast-only"], indirect=True)
def test_without_tiers_the_recorder_moves_the_counter_the_request_path_reads(
    repo: RepoInfo, wired: tuple[RecsModel, EventRecorder]
) -> None:
    m, recorder = wired
    client, user = recorder.redis, repo.user_ids_sample[5]
    assert m.users.tiered.ram is None
    before = read_user(client, m.keys, m.version, user).generation
    out = recorder.record(m, Activity(user, unrated_item(repo, m, user), "click"), "acme")
    assert out["invalidation"] == "published", out
    assert read_user(client, m.keys, m.version, user).generation == before + 1


def test_a_build_served_under_a_sticky_label_keys_its_rows_apart(repo: RepoInfo, redis_url: str, tmp_path: Path) -> None:
    """After an admin bump the label ("v2") stays in Redis while the pipeline may rebuild the repo
    under it (new embeddings, new catalogue): the new build must not read the old build's rows."""
    settings = RecommenderSettings(feast_repo=str(repo.repo_dir))
    old = RecsModel(settings, repo, version="v2", slot=1, redis_url=redis_url, rocksdb_root=tmp_path / "a")
    rebuilt = RecsModel(settings, dataclasses.replace(repo, model_version="rebuilt"), version="v2", slot=2,
                        redis_url=redis_url, rocksdb_root=tmp_path / "b")
    try:
        user = repo.user_ids_sample[0]
        assert old.users.get([user]).sources[user] == "feast"
        assert old.users.get([user]).sources[user] in ("redis", "rocksdb")  # cached for the old build
        assert old.version == rebuilt.version == "v2"  # what answers report: the label
        assert rebuilt.users.get([user]).sources[user] == "feast"  # not the old build's row
        # the label alone when it names the build itself (the default, before any bump)
        assert open_model(repo, redis_url, tmp_path / "c").key_version == repo.model_version
    finally:
        old.close()
        rebuilt.close()


def test_an_event_whose_lock_expired_during_a_slow_feast_read_is_queued_not_pushed(
    repo: RepoInfo, wired: tuple[RecsModel, EventRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow (not dead) Feast: the user's row read outlives the event lock, so another replica may
    already have pushed its own update of that row. Pushing ours would overwrite it (a lost
    rating): the event is queued and its read-modify-write done again later."""
    m, recorder = wired
    user = repo.user_ids_sample[5]
    item = unrated_item(repo, m, user)
    n_before = recorder.writer.current_row(user)["n_ratings"]
    monkeypatch.setattr(recommender_events, "EVENT_LOCK_TIMEOUT_S", 0.5)
    read = recorder.writer.current_row

    def slow_read(user_id: int) -> dict | None:
        time.sleep(1.0)  # past the lock's timeout
        return read(user_id)

    monkeypatch.setattr(recorder.writer, "current_row", slow_read)
    out = recorder.record(m, Activity(user, item, "rating", 4.0), "acme")
    assert out["status"] == 202 and out["recorded"] == "queued" and "lock expired" in out["warning"], out
    assert read(user)["n_ratings"] == n_before  # nothing pushed
    monkeypatch.setattr(recorder.writer, "current_row", read)
    monkeypatch.setattr(recommender_events, "EVENT_LOCK_TIMEOUT_S", 10.0)
    recorder.replay_queued()  # the watcher's next tick: applied once, from a fresh read
    assert read(user)["n_ratings"] == n_before + 1 and recorder.journal.count() == 0


def _wait_until_no_attempt_runs(recorder: EventRecorder, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while recorder._running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not recorder._running, "the event's attempt never ended"


def test_an_event_slower_than_its_deadline_is_queued_at_once_and_applied_once(
    repo: RepoInfo, wired: tuple[RecsModel, EventRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow (not dead) Feast: the client is answered "queued" at the deadline instead of waiting
    the read out; the attempt still running lands, and the queued copy then finds it applied."""
    m, recorder = wired
    user = repo.user_ids_sample[9]
    item = unrated_item(repo, m, user)
    read = recorder.writer.current_row
    n_before = read(user)["n_ratings"]

    def slow_read(user_id: int) -> dict | None:
        time.sleep(2.0)
        return read(user_id)

    monkeypatch.setattr(recorder.writer, "current_row", slow_read)
    recorder.within_s = 0.3
    started = time.monotonic()
    out = recorder.record(m, Activity(user, item, "rating", 4.0), "acme")
    assert time.monotonic() - started < 1.5, "the answer waited for the slow read"
    assert out["recorded"] == "queued" and "not applied within 0.3s" in out["warning"], out
    assert recorder.journal.count() == 1 and item in recorder.journal.items_of(user)  # answers leave it out now
    started = time.monotonic()
    recorder.replay_queued()  # a watcher tick while the attempt runs: leaves the entry, waits for nothing
    assert recorder.journal.count() == 1 and time.monotonic() - started < 1.0
    _wait_until_no_attempt_runs(recorder)
    monkeypatch.setattr(recorder.writer, "current_row", read)
    assert read(user)["n_ratings"] == n_before + 1  # the late attempt landed
    recorder.replay_queued()
    assert read(user)["n_ratings"] == n_before + 1 and recorder.journal.count() == 0  # once, and off the queue


def test_a_late_attempt_that_then_fails_leaves_one_queued_copy(
    repo: RepoInfo, wired: tuple[RecsModel, EventRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline queued the event; the attempt still running then fails on Feast: it must not
    queue a second copy (one event, one entry), and the one entry applies it once."""
    m, recorder = wired
    user = repo.user_ids_sample[10]
    item = unrated_item(repo, m, user)
    read = recorder.writer.current_row
    n_before = read(user)["n_ratings"]

    def slow_then_down(_user_id: int) -> dict | None:
        time.sleep(1.0)
        raise FeatureStoreUnavailable("feature store read failed: OperationalError")

    monkeypatch.setattr(recorder.writer, "current_row", slow_then_down)
    recorder.within_s = 0.2
    assert recorder.record(m, Activity(user, item, "rating", 2.0), "acme")["recorded"] == "queued"
    _wait_until_no_attempt_runs(recorder)
    assert recorder.journal.count() == 1 and read(user)["n_ratings"] == n_before
    monkeypatch.setattr(recorder.writer, "current_row", read)
    recorder.replay_queued()
    assert read(user)["n_ratings"] == n_before + 1 and recorder.journal.count() == 0


def test_an_event_within_its_deadline_is_answered_by_its_attempt(
    repo: RepoInfo, wired: tuple[RecsModel, EventRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Down (not slow) within the deadline: the attempt itself queues it, once."""
    m, recorder = wired
    user = repo.user_ids_sample[11]
    item = unrated_item(repo, m, user)

    def down(_user_id: int) -> dict | None:
        raise FeatureStoreUnavailable("feature store read failed: OperationalError")

    monkeypatch.setattr(recorder.writer, "current_row", down)
    out = recorder.record(m, Activity(user, item, "view"), "acme")
    assert out["recorded"] == "queued" and "unreachable" in out["warning"] and recorder.journal.count() == 1
    _wait_until_no_attempt_runs(recorder)
    assert recorder.journal.count() == 1


def test_an_event_lock_whose_acquire_reply_was_lost_is_released_not_left_held(
    repo: RepoInfo, wired: tuple[RecsModel, EventRecorder], redis_client: redis.Redis, redis_url: str
) -> None:
    """Redis slow, not dead: the lock's SET NX runs but its reply is lost, so the event is queued.
    The lock must not stay held with nobody to release it: the user's next event (here the queued
    one, replayed) takes it at once instead of waiting EVENT_LOCK_WAIT_S and being queued again."""
    m, recorder = wired
    user = repo.user_ids_sample[13]
    item = unrated_item(repo, m, user)
    n_before = recorder.writer.current_row(user)["n_ratings"]
    lock_key = event_lock_key(user)
    recorder.redis.exists(lock_key)  # a warm pooled connection: the SET NX is sent, then its reply lost
    with stalled(*node_of(redis_client, redis_url, lock_key), LOCK_STALL_S):
        out = recorder.record(m, Activity(user, item, "rating", 4.0), "acme")
    assert out["recorded"] == "queued", out
    _wait_until_no_attempt_runs(recorder)
    assert not redis_client.exists(lock_key), f"left held for {redis_client.pttl(lock_key)} ms more"
    recorder.replay_queued()  # the watcher's next tick
    assert recorder.journal.count() == 0 and recorder.writer.current_row(user)["n_ratings"] == n_before + 1


def test_a_push_that_timed_out_but_landed_is_replayed_without_applying_it_twice(
    repo: RepoInfo, wired: tuple[RecsModel, EventRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Feast wrote the row, but its answer never came (a timeout): the event is queued, as it
    must be (the recorder cannot know the write landed), and the replay finds its id in the row."""
    m, recorder = wired
    user = repo.user_ids_sample[6]
    item = unrated_item(repo, m, user)
    n_before = recorder.writer.current_row(user)["n_ratings"]
    push = recorder.writer.push

    def push_then_time_out(row: dict) -> None:
        push(row)
        raise FeatureStoreUnavailable("feature store write failed: TimeoutError")

    monkeypatch.setattr(recorder.writer, "push", push_then_time_out)
    generation = read_user(recorder.redis, m.keys, m.key_version, user).generation
    out = recorder.record(m, Activity(user, item, "rating", 4.0), "acme")
    assert out["recorded"] == "queued" and out["event_id"], out
    assert recorder.writer.current_row(user)["n_ratings"] == n_before + 1  # it did land
    monkeypatch.undo()
    recorder.replay_queued()
    # the landed try never invalidated: the replay did, at once (not a pending sweep 10 s later)
    assert read_user(recorder.redis, m.keys, m.key_version, user).generation != generation
    row = recorder.writer.current_row(user)
    assert row["n_ratings"] == n_before + 1 and recorder.journal.count() == 0  # once, and off the queue
    assert list(row["applied_events"])[-1] == out["event_id"]
    audited = [f for _, f in recorder.redis.xrange(m.keys.audit) if f[b"event_id"] == out["event_id"].encode()]
    assert len(audited) == 1  # the replay that found it applied wrote no second entry


def _audited(recorder: EventRecorder, m: RecsModel, event_id: str) -> list[bytes]:
    """Ids of the audit entries that name `event_id`."""
    return [i for i, f in recorder.redis.xrange(m.keys.audit) if f[b"event_id"] == event_id.encode()]


def test_an_event_tried_again_gets_its_first_audit_entry_and_appends_none(
    repo: RepoInfo, wired: tuple[RecsModel, EventRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first try wrote the pending record and the audit entry, then its push failed (Feast
    down): the event is tried again (the queue's replay, a client's retry), and audited once, its
    answer naming the first try's entry. An event with no id (queued before ids existed) has
    nothing to be known by: audited at every try, as before."""
    m, recorder = wired
    user = repo.user_ids_sample[14]
    event = Activity(user, unrated_item(repo, m, user), "view", event_id=new_event_id())
    push = recorder.writer.push

    def down(_row: dict) -> None:
        raise FeatureStoreUnavailable("feature store write failed: OperationalError")

    monkeypatch.setattr(recorder.writer, "push", down)
    with pytest.raises(recommender_events.NotNow):
        recorder._record(m, event, "acme")
    (first,) = _audited(recorder, m, event.event_id or "")
    monkeypatch.setattr(recorder.writer, "push", push)
    out = recorder._record(m, event, "acme")  # tried again: applied now
    assert out["recorded"] == "applied", out
    assert _audited(recorder, m, event.event_id or "") == [first], "audited again"
    assert out["audit_id"] == first.decode()
    anonymous = Activity(user, unrated_item(repo, m, user), "click")
    assert recorder._record(m, anonymous, "acme")["recorded"] == "applied"
    assert len(_audited(recorder, m, "")) == 1


def test_an_event_whose_transaction_reply_was_lost_is_audited_once_when_replayed(
    repo: RepoInfo, wired: tuple[RecsModel, EventRecorder], redis_client: redis.Redis, redis_url: str,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis slow, not dead: the MULTI of the pending record and the audit entry runs after the
    recorder gave up on its reply, so the event is queued; the watcher's replay then writes that
    MULTI again, and must not append a second audit entry for the event."""
    m, recorder = wired
    user = repo.user_ids_sample[15]
    assert recorder.record(m, Activity(user, unrated_item(repo, m, user), "view"), "acme")["recorded"] == "applied"
    # ^ a healthy event first: the lock's scripts loaded, and the connections to both nodes warm
    # (the stalled MULTI is sent, then its reply lost; the lock's release runs after the stall)
    event = Activity(user, unrated_item(repo, m, user), "view", event_id=new_event_id())
    arm = recorder.pending.arm
    stall = contextlib.ExitStack()

    def arm_then_stall(*args: Any, **kwargs: Any) -> float:
        stall.enter_context(stalled(*node_of(redis_client, redis_url, m.keys.audit), LOCK_STALL_S))
        return arm(*args, **kwargs)  # queued in the MULTI, sent right after this

    monkeypatch.setattr(recorder.pending, "arm", arm_then_stall)
    with stall:
        out = recorder.record(m, event, "acme")
    assert out["recorded"] == "queued" and "Redis is unreachable" in out["warning"], out
    _wait_until_no_attempt_runs(recorder)
    monkeypatch.setattr(recorder.pending, "arm", arm)
    assert len(_audited(recorder, m, event.event_id or "")) == 1  # the MULTI did run
    recorder.replay_queued()  # the watcher's next tick
    assert recorder.journal.count() == 0
    assert event.event_id in recorder.writer.current_row(user)["applied_events"]
    assert len(_audited(recorder, m, event.event_id or "")) == 1, "audited again by the replay"


def test_the_index_of_audited_events_keeps_the_streams_window_and_no_more(
    repo: RepoInfo, wired: tuple[RecsModel, EventRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index that makes an event audited once is bounded like the stream: it keeps the newest
    AUDIT_MAXLEN events (a Redis that grew a row per event for good would run out of room), and a
    try again of one it still holds appends nothing."""
    m, recorder = wired
    monkeypatch.setattr(recommender_events, "AUDIT_MAXLEN", 3)
    user = repo.user_ids_sample[16]
    events = [Activity(user, unrated_item(repo, m, user), "view", event_id=new_event_id()) for _ in range(5)]
    for event in events:
        assert recorder._record(m, event, "acme")["recorded"] == "applied"
    index, order = audited_keys(is_cluster(recorder.redis))
    kept = [e.event_id.encode() for e in events[-3:] if e.event_id]
    assert sorted(recorder.redis.hkeys(index)) == sorted(kept)
    assert recorder.redis.lrange(order, 0, -1) == kept  # oldest first: the next one out
    (first,) = _audited(recorder, m, events[-1].event_id or "")
    again = dataclasses.replace(events[-1], ts=events[-1].ts + 1)
    assert recorder._record(m, again, "acme")["recorded"] == "already applied"
    assert _audited(recorder, m, events[-1].event_id or "") == [first]


def test_a_queued_event_applied_by_a_replica_that_died_before_removing_it_is_not_applied_again(
    repo: RepoInfo, wired: tuple[RecsModel, EventRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    m, recorder = wired
    user = repo.user_ids_sample[7]
    item = unrated_item(repo, m, user)
    n_before = recorder.writer.current_row(user)["n_ratings"]
    recorder.queue(Activity(user, item, "rating", 3.0, event_id=new_event_id()), "acme", "Feast was down")

    class Died(BaseException):
        pass

    def die(_entry: object) -> None:
        raise Died  # the process ends after the push, before the entry leaves the queue

    monkeypatch.setattr(recorder.journal, "done", die)
    with pytest.raises(Died):
        recorder.replay_queued()
    monkeypatch.undo()
    assert recorder.writer.current_row(user)["n_ratings"] == n_before + 1 and recorder.journal.count() == 1
    recorder.replay_queued()  # the adopting replica's tick (its queue is the same file)
    assert recorder.writer.current_row(user)["n_ratings"] == n_before + 1 and recorder.journal.count() == 0


def test_a_client_key_makes_a_retry_the_same_event_even_when_the_first_try_was_queued(
    repo: RepoInfo, wired: tuple[RecsModel, EventRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    m, recorder = wired
    user = repo.user_ids_sample[8]
    item = unrated_item(repo, m, user)
    n_before = recorder.writer.current_row(user)["n_ratings"]
    key = f"k-{uuid.uuid4()}"  # the Feast repo outlives a run on one backend: a key of its own
    event = Activity(user, item, "rating", 5.0)
    event = dataclasses.replace(event, event_id=client_event_id("acme", key, event))
    read = recorder.writer.current_row

    def down(_user_id: int) -> dict | None:
        raise FeatureStoreUnavailable("feature store read failed: OperationalError")

    monkeypatch.setattr(recorder.writer, "current_row", down)
    assert recorder.record(m, event, "acme")["recorded"] == "queued"  # the client saw a timeout
    monkeypatch.undo()
    assert recorder.record(m, event, "acme")["recorded"] == "queued"  # its retry: behind the first
    recorder.replay_queued()
    assert read(user)["n_ratings"] == n_before + 1 and recorder.journal.count() == 0
    # a retry after it was applied; and the same key from another sender is another event
    assert recorder.record(m, event, "acme")["recorded"] == "already applied"
    other = Activity(user, item, "view")
    other = dataclasses.replace(other, event_id=client_event_id("globex", key, other))
    assert recorder.record(m, other, "globex")["recorded"] == "applied"


def test_a_key_reused_for_another_event_is_refused_not_answered_already_applied(
    repo: RepoInfo, wired: tuple[RecsModel, EventRecorder]
) -> None:
    """The same key with another body is not a retry: answering "already applied" would tell the
    client an event happened that never did (and its item would leave the user's answers)."""
    m, recorder = wired
    user = repo.user_ids_sample[12]
    first_item, second_item = [i for i in repo.popular_items if i not in m.rated.get(user, set())][:2]
    key = f"k-{uuid.uuid4()}"
    read = recorder.writer.current_row

    def sent(item: int, kind: str, value: float | None) -> Activity:
        activity = Activity(user, item, kind, value)
        return dataclasses.replace(activity, event_id=client_event_id("acme", key, activity))

    assert recorder.record(m, sent(first_item, "view", None), "acme")["recorded"] == "applied"
    n_before = read(user)["n_ratings"]
    for other in (sent(second_item, "rating", 1.0), sent(first_item, "rating", 4.0)):
        out = recorder.record(m, other, "acme")
        assert out["status"] == 422 and "already used for another event" in out["message"], out
    assert read(user)["n_ratings"] == n_before  # nothing applied
    assert recorder.record(m, sent(first_item, "view", None), "acme")["recorded"] == "already applied"  # a retry


def test_an_idempotency_key_must_be_visible_ascii() -> None:
    event = Activity(1, 2, "rating", 4.0)
    assert client_event_id("acme", None, event) is None
    assert client_event_id("acme", "k", event) == client_event_id("acme", "k", event) != client_event_id("acme", "k2", event)
    # a retry may carry a new `ts`: the same event; another value is another body
    assert client_event_id("acme", "k", dataclasses.replace(event, ts=1)) == client_event_id("acme", "k", event)
    with_value_5 = client_event_id("acme", "k", dataclasses.replace(event, value=5.0)) or ""
    assert with_value_5.split(".")[0] == (client_event_id("acme", "k", event) or "").split(".")[0]
    assert with_value_5 != client_event_id("acme", "k", event)
    assert len((client_event_id("acme", "x" * 255, event) or "").split(".")[0]) == EVENT_ID_CHARS
    for bad in ("", "has space", "tab\t", "ünïcode", "x" * 256):
        with pytest.raises(EventRejected) as err:
            client_event_id("acme", bad, event)
        assert err.value.status == 400 and "Idempotency-Key" in err.value.message
