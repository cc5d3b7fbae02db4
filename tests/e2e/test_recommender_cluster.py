"""The recommendation path over HTTP with Redis Cluster: a second application whose Ingress and two
Recommender replicas use the 3-master cluster of tests/conftest.py (`REDIS_URL=redis+cluster://`)
on a copy of the Feast repo. Only the recommender path: the chat deployments are the session
app's handles and nothing here calls them. One module, one app start (~1 min on top of the
session app), so the suite pays little for it.

What only the whole app shows on a cluster: the request path's one-slot MGET and the result cache,
an event's MULTI and its generation move reaching both replicas (stream and checked tiers), the
audit entry under its tagged name, the unknown-user memo, and the restart check's per-primary
run ids running in the watcher without breaking anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from feature_store.pipeline import RepoInfo
from tests.e2e.conftest import ADMIN
from tests.e2e.recs_app import copy_repo, recommend, serve_recs

APP_NAME = "tierserve-recs-cluster"
PREFIX = "/recs-cluster"


@pytest.fixture(scope="module")
def cluster_repo(tmp_path_factory: pytest.TempPathFactory) -> RepoInfo:
    return copy_repo(tmp_path_factory.mktemp("feast_cluster_copy"))


@pytest.fixture(scope="module")
def recs(app_url: str, cluster_redis_url: str, cluster_repo: RepoInfo,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with serve_recs(app_url, redis_url=cluster_redis_url, repo=cluster_repo,
                    state_dir=tmp_path_factory.mktemp("recs_cluster_state"), name=APP_NAME, prefix=PREFIX) as client:
        yield client


def test_recommendations_and_an_event_on_a_redis_cluster(
    recs: httpx.Client, cluster_repo: RepoInfo, cluster_redis_url: str
) -> None:
    from caches.redis_client import make_client
    from deployments.recommender_keys import audit_key

    user = cluster_repo.user_ids_sample[3]
    # Both replicas compute this user (distinct k: the result cache does not answer), so both
    # hold its row in their tiers before the event.
    answers: list[dict[str, Any]] = []
    for k in range(5, 45):
        answers.append(recommend(recs, user, k))
        if len({a["replica"] for a in answers}) == 2:
            break
    assert len({a["replica"] for a in answers}) == 2, "one replica answered every request"
    first = answers[0]
    assert first["degraded"] is False and first["cold_start"] is False and len(first["items"]) == 5
    assert recommend(recs, user, 5)["cached"] is True  # the result cache, on the cluster
    n_before = first["user_activity"]["n_ratings"]
    target = first["items"][0]["item_id"]

    resp = recs.post("/v1/events", json={"user_id": user, "item_id": target, "type": "rating", "value": 5})
    assert resp.status_code == 202, resp.text
    event = resp.json()
    assert event["recorded"] == "applied" and event["invalidation"] == "published", event
    assert event["n_ratings"] == n_before + 1

    # The generation moved (the counter the tiers check, read in the request's one-slot MGET):
    # the cached answer is unreachable and every replica serves the pushed row without the item.
    fresh = [recommend(recs, user, 5)]
    assert fresh[0]["cached"] is False
    for k in range(45, 85):
        if len({a["replica"] for a in fresh}) == 2:
            break
        fresh.append(recommend(recs, user, k))
    assert len({a["replica"] for a in fresh}) == 2
    for answer in fresh:
        assert answer["user_activity"]["n_ratings"] == n_before + 1, answer
        assert target not in [i["item_id"] for i in answer["items"]]

    client = make_client(cluster_redis_url)
    try:
        ((_, fields),) = client.xrange(audit_key(True), event["audit_id"], event["audit_id"])
    finally:
        client.close()
    assert {k.decode(): v.decode() for k, v in fields.items()}["tenant"] == "default"
    stats = recs.get("/v1/cache/stats", headers=ADMIN).json()["recommender"]
    assert stats["pending_invalidations"] == 0  # the event's own invalidation settled its record

    unknown = 10**9 + 3  # cold start, then the same from the memo (same generation: no event)
    assert recommend(recs, unknown, 4)["cold_start"] is True
    assert recommend(recs, unknown, 4)["items"] == recommend(recs, unknown, 4)["items"]
    assert recs.get("/healthz").json()["redis"] == "up"
