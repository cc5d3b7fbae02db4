"""No valid recommendation or event request ever gets a 5xx, over HTTP against the running app.

Two kinds of evidence:
- exhaustive where the space is small: every user of the data set, with the largest `k` (100),
  which asks the feature tiers for the biggest batches there are (this found the placement
  script's `too many results to unpack` 500 for heavy users: Redis caps Lua's `unpack`);
- property-based where it is not: Hypothesis strategies of our own over the recommendation and
  event schemas (known and unknown users, catalogue and unknown items, every event type), each
  answer checked for "not a 5xx".
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pandas as pd
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from deployments.config import REPO_ROOT
from feature_store import names
from feature_store.pipeline import RepoInfo
from tests.e2e.conftest import ADMIN

MAX_K = 100  # RecommendationRequest.k's upper bound
ID_MAX = 2**62  # the schemas' id bound
# Parallel requests: enough to finish 700 heavy requests in about a minute on 2 cores, few enough
# not to queue past the Recommender's max_ongoing_requests.
CONCURRENCY = 8
EXAMPLES = 60
PHASES = (Phase.explicit, Phase.generate)  # no shrinking (each step is an HTTP call), no database


@pytest.fixture(scope="module")
def repo() -> RepoInfo:
    return RepoInfo.load(REPO_ROOT / "feature_store")


@pytest.fixture(scope="module")
def user_ids(repo: RepoInfo) -> list[int]:
    frame = pd.read_parquet(repo.files["user_features"], columns=[names.USER_KEY])
    return sorted({int(u) for u in frame[names.USER_KEY]})


@pytest.fixture(scope="module")
def item_ids(repo: RepoInfo) -> list[int]:
    frame = pd.read_parquet(repo.files["item_features"], columns=[names.ITEM_KEY])
    return sorted({int(i) for i in frame[names.ITEM_KEY]})


def test_every_user_with_the_largest_k_gets_200(client: httpx.Client, user_ids: list[int]) -> None:
    assert len(user_ids) > 500  # the whole data set, not a sample

    def ask(user: int) -> tuple[int, int, str]:
        resp = client.post("/v1/recommendations", json={"user_id": user, "k": MAX_K})
        return user, resp.status_code, resp.text[:300]

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        answers = list(pool.map(ask, user_ids))
    failed = [(u, s, text) for u, s, text in answers if s != 200]
    assert not failed, f"{len(failed)} of {len(user_ids)} users not answered 200, e.g. {failed[:5]}"


def test_valid_recommendation_requests_never_get_a_5xx(client: httpx.Client, user_ids: list[int]) -> None:
    users = st.one_of(st.sampled_from(user_ids), st.integers(0, ID_MAX))
    failures: list[str] = []

    @given(user=users, k=st.integers(1, MAX_K))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=PHASES,
              suppress_health_check=list(HealthCheck))
    def run(user: int, k: int) -> None:
        resp = client.post("/v1/recommendations", json={"user_id": user, "k": k})
        if resp.status_code >= 500:
            failures.append(f"user_id={user} k={k}: {resp.status_code} {resp.text[:200]}")

    run()
    assert not failures, "\n".join(failures)


def test_valid_events_never_get_a_5xx_other_than_a_retry_later(
    client: httpx.Client, user_ids: list[int], item_ids: list[int]
) -> None:
    users = st.one_of(st.sampled_from(user_ids), st.integers(0, ID_MAX))
    items = st.one_of(st.sampled_from(item_ids), st.integers(0, ID_MAX))
    kinds = st.sampled_from(["view", "click", "rating"])
    values = st.one_of(st.none(), st.floats(0.0, 5.0, allow_nan=False))
    failures: list[str] = []

    @given(user=users, item=items, kind=kinds, value=values)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=PHASES,
              suppress_health_check=list(HealthCheck))
    def run(user: int, item: int, kind: str, value: float | None) -> None:
        body = {"user_id": user, "item_id": item, "type": kind, "value": value}
        resp = client.post("/v1/events", json=body)
        # 503 with a message is the documented "retry later" (a dependency down); anything else
        # 5xx, or a 503 without a reason, is a bug.
        if resp.status_code >= 500 and not (resp.status_code == 503 and "retry" in resp.text):
            failures.append(f"{body}: {resp.status_code} {resp.text[:200]}")

    run()
    assert not failures, "\n".join(failures)


def _feast_user_misses(client: httpx.Client) -> int:
    stats = client.get("/v1/cache/stats", headers=ADMIN).json()["recommender"]["user_features"]["tiers"]
    return int(stats["feast"]["misses"])


def test_an_unknown_user_reaches_feast_once_not_on_every_request(client: httpx.Client) -> None:
    user = 10**12 + 3  # no such user in the data set
    before = _feast_user_misses(client)
    for k in range(1, 11):  # distinct k: the result cache cannot be what answers
        resp = client.post("/v1/recommendations", json={"user_id": user, "k": k})
        assert resp.status_code == 200 and resp.json()["cold_start"] is True, resp.text
    # The session app runs one Recommender replica, so its stats saw every one of these reads.
    assert _feast_user_misses(client) - before == 1
