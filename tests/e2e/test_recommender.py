"""Recommendations and events over HTTP, on a second application with two Recommender replicas.

The session app (conftest) serves one Recommender on the project's own Feast repo. This module
deploys a second application into the same Serve instance, at route prefix /recs: its own
Ingress and a Recommender with `num_replicas=2`, on a *copy* of the Feast repo and its own
Redis, so that pushed events and the online-store outage below touch nothing else. The chat
deployments (Encoder, SemanticCache, LLM) are the session app's, passed in as handles.

Replica ids come back in every answer (`replica`), so a test can tell which replica answered.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from caches.redis_server import EmbeddedRedis
from feature_store import names
from feature_store.pipeline import RepoInfo
from tests.e2e.conftest import ADMIN
from tests.e2e.recs_app import copy_repo, recommend, serve_recs

APP_NAME = "tierserve-recs"
PREFIX = "/recs"
OWN_REDIS: dict[str, Any] = {}  # the module app's own Redis (url, server), for tests that act on it
# The module app answers an event within this (applied, else queued): shorter than the default, so
# a test can keep Feast slow past it without reaching SQLite's own 5 s wait for a lock; far above
# what an event takes here (well under 0.5 s).
EVENT_WITHIN_S = 3.0
FEAST_SLOW_FOR_S = 4.5


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> RepoInfo:
    return copy_repo(tmp_path_factory.mktemp("feast_copy"))


@pytest.fixture(scope="module")
def recs(app_url: str, repo_copy: RepoInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with EmbeddedRedis() as own_redis:
        OWN_REDIS["url"], OWN_REDIS["server"] = own_redis.url, own_redis
        with serve_recs(app_url, redis_url=own_redis.url, repo=repo_copy, state_dir=tmp_path_factory.mktemp("recs_state"),
                        name=APP_NAME, prefix=PREFIX, event_within_s=EVENT_WITHIN_S) as client:
            yield client


def rated_by(repo: RepoInfo, user_id: int) -> set[int]:
    frame = pd.read_parquet(repo.files["rated"])
    row = frame[frame[names.USER_KEY] == user_id]
    return set(map(int, row["item_ids"].iloc[0])) if len(row) else set()


def until_replicas(client: httpx.Client, user: int, ks: range, want: int = 2) -> list[dict[str, Any]]:
    """Fresh (distinct k: not result-cached) answers for `user` until `want` replicas computed one."""
    answers: list[dict[str, Any]] = []
    for k in ks:
        answers.append(recommend(client, user, k))
        if len({a["replica"] for a in answers if not a["cached"]}) >= want:
            return answers
    pytest.fail(f"only replicas {sorted({a['replica'] for a in answers})} answered {len(answers)} requests")


def test_known_user_gets_k_unrated_items(recs: httpx.Client, repo_copy: RepoInfo) -> None:
    user = repo_copy.user_ids_sample[3]
    body = recommend(recs, user, 10)
    items = [i["item_id"] for i in body["items"]]
    assert len(items) == 10 == len(set(items))
    assert not set(items) & rated_by(repo_copy, user)
    assert body["cold_start"] is False and body["degraded"] is False
    assert body["sources"]["user"] in ("redis", "rocksdb", "feast")
    assert sum(body["sources"]["items"].values()) >= 10
    assert body["replica"]


def test_unknown_user_gets_the_cold_start_list(recs: httpx.Client, repo_copy: RepoInfo) -> None:
    body = recommend(recs, 10**9 + 1, 7)
    assert body["cold_start"] is True
    assert [i["item_id"] for i in body["items"]] == repo_copy.popular_items[:7]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [({"user_id": 1, "k": 0}, "k"), ({"user_id": 1, "k": 101}, "k"), ({"user_id": "x", "k": 3}, "user_id"),
     ({"user_id": -1}, "user_id")],
)
def test_invalid_user_or_k_is_422(recs: httpx.Client, body: dict, fragment: str) -> None:
    resp = recs.post("/v1/recommendations", json=body)
    assert resp.status_code == 422 and fragment in resp.json()["error"]["message"]


@pytest.mark.parametrize(
    ("event", "status", "fragment"),
    [
        ({"user_id": 1, "item_id": 987_654_321, "type": "rating", "value": 4}, 404, "not in the catalogue"),
        ({"user_id": 1, "item_id": 1, "type": "rating"}, 422, "needs a value"),
        ({"user_id": 1, "item_id": 1, "type": "purchase"}, 422, "type"),
        ({"user_id": 1, "item_id": 1, "type": "rating", "value": 9}, 422, "value"),
    ],
)
def test_bad_events_are_refused_with_a_message(recs: httpx.Client, event: dict, status: int, fragment: str) -> None:
    resp = recs.post("/v1/events", json=event)
    assert resp.status_code == status, resp.text
    assert fragment in resp.json()["error"]["message"]


def test_event_invalidates_and_changes_the_answer_on_the_other_replica(
    recs: httpx.Client, repo_copy: RepoInfo
) -> None:
    user = repo_copy.user_ids_sample[4]
    # Both replicas compute this user (distinct k per request: the result cache does not answer).
    warm = until_replicas(recs, user, range(5, 40))
    n_before = warm[0]["user_activity"]["n_ratings"]
    target = warm[-1]["items"][0]["item_id"]

    resp = recs.post("/v1/events", json={"user_id": user, "item_id": target, "type": "rating", "value": 5})
    assert resp.status_code == 202, resp.text
    event = resp.json()
    assert event["n_ratings"] == n_before + 1 and event["new_user"] is False

    # Same k as before: the generation moved, so the old cached results are unreachable.
    again = recommend(recs, user, 5)
    assert again["cached"] is False
    after = [again]
    for k in range(40, 80):
        after.append(recommend(recs, user, k))
        if any(a["replica"] != event["replica"] and not a["cached"] for a in after):
            break
    other = [a for a in after if a["replica"] != event["replica"] and not a["cached"]]
    assert other, f"no fresh answer from a replica other than {event['replica']}"
    for answer in after:
        assert target not in [i["item_id"] for i in answer["items"]]
        # The pushed row, not a stale tier copy: read through this replica's tiers after the event.
        assert answer["user_activity"]["n_ratings"] == n_before + 1, answer


def test_event_of_a_user_the_feature_store_does_not_know_is_a_404_that_leaves_nothing_behind(
    recs: httpx.Client, repo_copy: RepoInfo
) -> None:
    import redis

    user = 10**9 + 2
    assert recommend(recs, user, 5)["cold_start"] is True
    item = repo_copy.popular_items[0]
    resp = recs.post("/v1/events", json={"user_id": user, "item_id": item, "type": "rating", "value": 5})
    assert resp.status_code == 404, resp.text
    assert "not in the feature store" in resp.json()["error"]["message"]
    assert "pipeline" in resp.json()["error"]["message"]  # says where new users come from
    client = redis.Redis.from_url(OWN_REDIS["url"])
    try:  # no permanent keys minted for an id nobody knows: the generation counter a read starts
        # expires (-2: none, else its ms left; -1 would be for good), the rated set is never written
        assert client.pttl(f"tierserve:recs:gen:{user}") != -1
        assert client.exists(f"tierserve:recs:rated:{user}") == 0
    finally:
        client.close()
    body = recommend(recs, user, 5)
    assert body["cold_start"] is True  # still a cold-start user: Feast was not written


def test_feast_unreachable_serves_from_the_tiers_or_a_fallback_and_queues_events_then_recovers(
    recs: httpx.Client, repo_copy: RepoInfo, tmp_path: Path
) -> None:
    warm_user, cold_user = repo_copy.user_ids_sample[5], repo_copy.user_ids_sample[6]
    until_replicas(recs, warm_user, range(10, 40))  # both replicas hold the user's row
    n_before = recommend(recs, warm_user, 7)["user_activity"]["n_ratings"]
    rated_item = next(i for i in repo_copy.popular_items[:50] if i not in rated_by(repo_copy, warm_user))
    db = repo_copy.repo_dir / names.ONLINE_DB
    backup = tmp_path / "online_store.db"
    shutil.copyfile(db, backup)
    # The online store's file emptied in place, as a lost volume remounted empty would leave it:
    # the replicas' open sqlite connections see it (a rename would not reach an open file).
    with open(db, "r+b") as f:
        f.truncate(0)
    try:
        for _ in range(4):  # several requests, so both replicas meet the outage
            resp = recs.post("/v1/recommendations", json={"user_id": warm_user, "k": 100})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            # The user's row is in the tiers and item features come with the model version (no
            # Feast read at all): a warm user does not notice the outage.
            assert body["degraded"] is False and len(body["items"]) == 100
            assert sum(body["sources"]["items"].values()) >= 100 and body["sources"]["user"] != "feast"
            assert not {i["item_id"] for i in body["items"]} & rated_by(repo_copy, warm_user)
        for _ in range(3):
            # No tier holds this user: not a 503 but the fallback list, saying so.
            resp = recs.post("/v1/recommendations", json={"user_id": cold_user, "k": 10})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["degraded"] is True and body["fallback"]["kind"] == "popular"
            assert "feature store is unreachable" in body["fallback"]["reason"]
            assert len(body["items"]) == 10 and not {i["item_id"] for i in body["items"]} & rated_by(repo_copy, cold_user)
        # An event now cannot be applied (its row is in Feast): it is queued on disk, not refused.
        resp = recs.post("/v1/events", json={"user_id": warm_user, "item_id": rated_item, "type": "rating",
                                             "value": 4})
        assert resp.status_code == 202, resp.text
        queued = resp.json()
        assert queued["recorded"] == "queued" and "feature store" in queued["warning"]
        assert recs.get("/healthz").status_code == 200
    finally:
        shutil.copyfile(backup, db)
    for _ in range(4):
        body = recommend(recs, cold_user, 10)
        assert body["degraded"] is False and len(body["items"]) == 10
    # The queued event is applied by its replica's watcher once Feast answers: the row moves on
    # every replica, and the rated item leaves the answers.
    deadline = time.monotonic() + 60
    while True:
        body = recommend(recs, warm_user, 99)
        if body["user_activity"]["n_ratings"] == n_before + 1:
            break
        assert time.monotonic() < deadline, f"queued event not applied: {body['user_activity']}"
        time.sleep(0.5)
    assert body["degraded"] is False and rated_item not in [i["item_id"] for i in body["items"]]


def test_events_say_their_invalidation_was_published_and_are_audited_with_their_tenant(
    recs: httpx.Client, repo_copy: RepoInfo
) -> None:
    import redis

    user = repo_copy.user_ids_sample[7]
    resp = recs.post("/v1/events", json={"user_id": user, "item_id": repo_copy.popular_items[5], "type": "view"})
    assert resp.status_code == 202, resp.text
    event = resp.json()
    assert event["invalidation"] == "published"
    assert event["tenant"] == "default"  # no API keys here: the loopback `default` tenant may send events
    assert _pending(recs) == 0  # the event's own invalidation settled its record: nothing to replay
    client = redis.Redis.from_url(OWN_REDIS["url"])
    try:
        ((_, fields),) = client.xrange("tierserve:recs:events", event["audit_id"], event["audit_id"])
    finally:
        client.close()
    got = {k.decode(): v.decode() for k, v in fields.items()}
    want = {"tenant": "default", "user_id": str(user), "item_id": str(repo_copy.popular_items[5]), "type": "view"}
    assert want.items() <= got.items(), got


def test_a_client_retry_with_the_same_idempotency_key_is_applied_once(recs: httpx.Client, repo_copy: RepoInfo) -> None:
    """The client timed out (or hung up) and sends the event again: the key makes it the same event."""
    user, items = repo_copy.user_ids_sample[8], repo_copy.popular_items[10:12]
    event = {"user_id": user, "item_id": items[0], "type": "rating", "value": 4}
    key = f"rating-{uuid.uuid4()}"
    first = recs.post("/v1/events", json=event, headers={"idempotency-key": key})
    assert first.status_code == 202 and first.json()["recorded"] == "applied", first.text
    again = recs.post("/v1/events", json=event, headers={"idempotency-key": key})
    assert again.status_code == 202 and again.json()["recorded"] == "already applied", again.text
    assert again.json()["event_id"] == first.json()["event_id"]
    other = recs.post("/v1/events", json={**event, "item_id": items[1]}, headers={"idempotency-key": f"{key}-2"})
    assert other.json()["recorded"] == "applied"
    assert other.json()["n_ratings"] == first.json()["n_ratings"] + 1  # the retry counted nothing
    bad = recs.post("/v1/events", json=event, headers={"idempotency-key": "has spaces"})
    assert bad.status_code == 400 and "Idempotency-Key" in bad.json()["error"]["message"], bad.text


def _pending(client: httpx.Client) -> int:
    return int(client.get("/v1/cache/stats", headers=ADMIN).json()["recommender"].get("pending_invalidations", -1))


def test_an_invalidation_redis_refused_after_the_push_is_published_later_not_lost(
    recs: httpx.Client, repo_copy: RepoInfo
) -> None:
    import redis

    user = repo_copy.user_ids_sample[9]
    warm = until_replicas(recs, user, range(5, 60))  # both replicas hold the user's row (RAM/SSD)
    n_before = warm[0]["user_activity"]["n_ratings"]
    item = next(i["item_id"] for i in warm[-1]["items"])
    admin = redis.Redis.from_url(OWN_REDIS["url"])
    # The fault, right after the Feast push: Redis refuses the generation move and the stream
    # publish (ACL: the app's user loses the generation counters' and the invalidation streams'
    # keys) while the lock, the pending record, the audit entry, the feature tiers and the push
    # before them still work. Deterministic, unlike killing Redis at the right instant.
    # (Keys, not commands: the audit entry is an XADD before the push, with its index of audited
    # events, and Redis 6.2 did not refuse INCR for `-incr`.)
    allowed = ["tierserve:recs:eventlock:*", "tierserve:recs:pending-invalidations", "tierserve:recs:rated:*",
               "tierserve:recs:events", "tierserve:recs:audited*", "features:*", "tierserve:tier:*", "tierserve:placement:*", "models.__versions"]
    admin.execute_command("ACL", "SETUSER", "default", "resetkeys", *(f"~{k}" for k in allowed))
    try:
        resp = recs.post("/v1/events", json={"user_id": user, "item_id": item, "type": "rating", "value": 5})
        assert resp.status_code == 202, resp.text
        event = resp.json()
        assert event["invalidation"] == "pending" and "retried" in event["warning"]
        assert _pending(recs) >= 1  # durable: in Redis, not in a timer of the replica that answered
    finally:
        admin.execute_command("ACL", "SETUSER", "default", "resetkeys", "~*")
        admin.close()
    # Redis is healthy again: some replica's watcher replays the record until it is published.
    deadline = time.monotonic() + 60
    while _pending(recs) != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _pending(recs) == 0
    fresh = [a for a in until_replicas(recs, user, range(60, 100)) if not a["cached"]]
    for answer in fresh:  # every replica now reads the pushed row, none its old SSD copy
        assert answer["user_activity"]["n_ratings"] == n_before + 1, answer
        assert item not in [i["item_id"] for i in answer["items"]]


def test_a_redis_restart_drops_user_rows_whose_invalidation_it_may_have_lost(
    recs: httpx.Client, repo_copy: RepoInfo
) -> None:
    from feature_store.events import UserActivityWriter

    user = repo_copy.user_ids_sample[10]
    warm = until_replicas(recs, user, range(5, 60))  # both replicas hold the user's row on SSD
    n_before = warm[0]["user_activity"]["n_ratings"]
    server = OWN_REDIS["server"]
    server.stop()
    try:
        # An event whose push reached Feast but whose pending record died with Redis (it restarts
        # empty: persistence is off): the new row is written here straight into the online store.
        writer = UserActivityWriter(repo_copy.repo_dir)
        row = writer.current_row(user)
        assert row is not None
        writer.push({**row, names.USER_KEY: user, "n_ratings": n_before + 1})
    finally:
        server.start()
    fresh: dict[str, int] = {}
    for k in range(60, 101):  # distinct k: fresh computations, not cached answers
        body = recommend(recs, user, k)
        if not body["cached"] and not body["degraded"]:
            fresh[body["replica"]] = body["user_activity"]["n_ratings"]
        if len(fresh) >= 2 and set(fresh.values()) == {n_before + 1}:
            break
        time.sleep(0.25)  # the replicas notice the new server on their next watch tick
    assert len(fresh) >= 2 and set(fresh.values()) == {n_before + 1}, fresh


def test_an_event_while_redis_is_down_is_queued_then_applied_when_it_is_back(
    recs: httpx.Client, repo_copy: RepoInfo
) -> None:
    user = repo_copy.user_ids_sample[11]
    n_before = recommend(recs, user, 9)["user_activity"]["n_ratings"]
    item = next(i for i in repo_copy.popular_items[:50] if i not in rated_by(repo_copy, user))
    server = OWN_REDIS["server"]
    server.stop()
    try:
        # No per-user lock and no durable pending record without Redis: queued on disk, not refused.
        resp = recs.post("/v1/events", json={"user_id": user, "item_id": item, "type": "rating", "value": 5})
        assert resp.status_code == 202, resp.text
        assert resp.json()["recorded"] == "queued" and "Redis" in resp.json()["warning"]
        for k in (11, 12, 13):  # answers go on (from Feast and the SSD tier), never a 5xx
            resp = recs.post("/v1/recommendations", json={"user_id": user, "k": k})
            assert resp.status_code == 200, resp.text
    finally:
        server.start()
    deadline = time.monotonic() + 60
    while True:  # applied by the replica that queued it, then read by every replica
        body = recommend(recs, user, 20)
        if body["user_activity"]["n_ratings"] == n_before + 1 and not body["degraded"]:
            break
        assert time.monotonic() < deadline, f"queued event not applied: {body}"
        time.sleep(0.5)
    assert item not in [i["item_id"] for i in body["items"]]


def test_an_item_rated_by_an_event_stays_filtered_after_redis_restarts_empty(
    recs: httpx.Client, repo_copy: RepoInfo
) -> None:
    user = repo_copy.user_ids_sample[13]
    top = recommend(recs, user, 10)["items"][0]["item_id"]  # what the user is offered first
    resp = recs.post("/v1/events", json={"user_id": user, "item_id": top, "type": "rating", "value": 5})
    assert resp.status_code == 202 and resp.json()["recorded"] == "applied", resp.text
    server = OWN_REDIS["server"]
    server.stop()
    server.start()  # back empty (no persistence): the Redis set of the user's rated items is gone
    fresh: set[str] = set()
    for k in range(60, 101):  # distinct k: fresh computations; long lists, where `top` would be
        body = recommend(recs, user, k)
        if not body["cached"] and not body["degraded"]:
            assert top not in [i["item_id"] for i in body["items"]], body  # Feast's row still says so
            fresh.add(body["replica"])
        if len(fresh) >= 2:
            break
        time.sleep(0.25)
    assert len(fresh) >= 2, fresh


def test_an_event_under_a_slow_feature_store_is_answered_at_its_deadline_and_applied_once(
    recs: httpx.Client, repo_copy: RepoInfo
) -> None:
    """Feast slow, not down: its online store's file is locked, so the event's read of the user's
    row waits. The client is answered 202 "queued" at the replica's deadline instead of waiting it
    out; the attempt still running and the queued copy together apply the rating once."""
    import sqlite3

    user = repo_copy.user_ids_sample[12]
    n_before = recommend(recs, user, 5)["user_activity"]["n_ratings"]
    item = next(i for i in repo_copy.popular_items[:50] if i not in rated_by(repo_copy, user))
    event = {"user_id": user, "item_id": item, "type": "rating", "value": 4}
    key = {"Idempotency-Key": f"slow-{uuid.uuid4()}"}
    # An exclusive lock on the rollback-journal file: readers wait (SQLite's busy wait, 5 s in
    # Feast's connection) until it is released.
    hold = sqlite3.connect(repo_copy.repo_dir / names.ONLINE_DB, timeout=10, isolation_level=None)
    hold.execute("BEGIN EXCLUSIVE")
    started = time.monotonic()
    try:
        resp = recs.post("/v1/events", json=event, headers=key)
        elapsed = time.monotonic() - started
        assert resp.status_code == 202, resp.text
        assert resp.json()["recorded"] == "queued" and f"not applied within {EVENT_WITHIN_S:g}s" in resp.json()["warning"]
        assert elapsed < FEAST_SLOW_FOR_S, f"the answer waited {elapsed:.1f}s for the slow read"
        time.sleep(max(0.0, FEAST_SLOW_FOR_S - (time.monotonic() - started)))
    finally:
        hold.execute("ROLLBACK")
        hold.close()
    deadline = time.monotonic() + 60
    while (body := recommend(recs, user, 99))["user_activity"]["n_ratings"] != n_before + 1:
        assert time.monotonic() < deadline, f"the event was never applied: {body['user_activity']}"
        time.sleep(0.5)
    time.sleep(3.0)  # the queued copy's replay (watcher ticks of 0.5 s) has had its turn
    assert recommend(recs, user, 98)["user_activity"]["n_ratings"] == n_before + 1  # once, not twice
    again = recs.post("/v1/events", json=event, headers=key)  # the client's retry, to be sure
    assert again.status_code == 202 and again.json()["recorded"] == "already applied", again.text


# Last in the module: it moves the module app to another model version.
def test_every_replica_follows_a_version_bump_written_only_to_redis(recs: httpx.Client, repo_copy: RepoInfo) -> None:
    import redis

    from caches.versions import VERSIONS_KEY

    user = repo_copy.user_ids_sample[8]
    until_replicas(recs, user, range(1, 30))
    # No `reload` call reaches any replica: only the version in Redis changes, as another
    # Ingress (or the CLI) would leave it. Every replica must notice on its own.
    client = redis.Redis.from_url(OWN_REDIS["url"])
    try:
        client.hset(VERSIONS_KEY, "recs", "followed-v2")
    finally:
        client.close()
    seen: dict[str, str] = {}
    for k in range(30, 101):
        body = recommend(recs, user, k)
        seen[body["replica"]] = body["model_version"]
        if len(seen) >= 2 and set(seen.values()) == {"followed-v2"}:
            break
    assert len(seen) >= 2 and set(seen.values()) == {"followed-v2"}, seen
    assert body["degraded"] is False and len(body["items"]) == k  # the new version's caches serve
