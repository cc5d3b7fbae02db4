"""Recommendations, health, metrics and embeddings over HTTP against the running app."""

from __future__ import annotations

import httpx
import pandas as pd
import pytest

from feature_store import names
from feature_store.pipeline import RepoInfo

REPO = RepoInfo.load(__import__("deployments.config", fromlist=["REPO_ROOT"]).REPO_ROOT / "feature_store")


def rated_by(user_id: int) -> set[int]:
    frame = pd.read_parquet(REPO.files["rated"])
    row = frame[frame[names.USER_KEY] == user_id]
    return set(map(int, row["item_ids"].iloc[0])) if len(row) else set()


def test_healthz(client: httpx.Client) -> None:
    body = client.get("/healthz").json()
    assert body["status"] == "ok" and body["redis"] == "up"


def test_known_user_gets_k_unrated_items(client: httpx.Client) -> None:
    user = REPO.user_ids_sample[0]
    resp = client.post("/v1/recommendations", json={"user_id": user, "k": 10})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["user_id"] == user and body["model_version"] == REPO.model_version
    items = [i["item_id"] for i in body["items"]]
    assert len(items) == 10 and len(set(items)) == 10
    assert not set(items) & rated_by(user)
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert body["cold_start"] is False
    again = client.post("/v1/recommendations", json={"user_id": user, "k": 10}).json()
    assert again["cached"] is True and again["items"] == body["items"]


def test_unknown_user_gets_cold_start_list(client: httpx.Client) -> None:
    resp = client.post("/v1/recommendations", json={"user_id": 10**9, "k": 5})
    assert resp.status_code == 200
    body = resp.json()
    assert body["cold_start"] is True
    assert [i["item_id"] for i in body["items"]] == REPO.popular_items[:5]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"user_id": 1, "k": 0}, "k"),
        ({"user_id": 1, "k": 101}, "k"),
        ({"user_id": "abc", "k": 5}, "user_id"),
        ({"user_id": -3, "k": 5}, "user_id"),
        ({"user_id": True, "k": 5}, "not a boolean"),  # not user 1
        ({"k": 5}, "user_id"),
        ({"user_id": 1, "k": 5, "bogus": True}, "bogus"),
    ],
)
def test_bad_recommendation_requests_get_422(client: httpx.Client, body: dict, fragment: str) -> None:
    resp = client.post("/v1/recommendations", json=body)
    assert resp.status_code == 422, resp.text
    assert fragment in resp.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "content", "content_type", "status", "fragment"),
    [
        # not JSON at all: a 400 on every route, with the parser's reason and where
        ("/v1/recommendations", b'{"user_id": 1,}', "application/json", 400,
         "the body is not valid JSON: Expecting property name enclosed in double quotes at character 14"),
        ("/v1/embeddings", b"{not json", "application/json", 400, "the body is not valid JSON"),
        # no body, or not a JSON object (curl -d sends a form): say what to send
        ("/v1/recommendations", b"", "application/json", 422, "needs a JSON object body"),
        ("/v1/recommendations", b'{"user_id": 1}', "application/x-www-form-urlencoded", 422,
         "Content-Type: application/json"),
        ("/v1/recommendations", b"[1, 2]", "application/json", 422, "must be a JSON object"),
        ("/v1/events", b'{"user_id": 1}', "text/plain", 422, "must be a JSON object"),
    ],
)
def test_a_body_that_is_not_a_json_object_gets_a_message_that_says_what_to_send(
        client: httpx.Client, path: str, content: bytes, content_type: str, status: int, fragment: str) -> None:
    resp = client.post(path, content=content, headers={"content-type": content_type})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert fragment in error["message"]
    assert error["param"] is None  # the body as a whole: no field to point at (not a character offset)


def test_event_changes_next_answer(client: httpx.Client) -> None:
    user = REPO.user_ids_sample[1]
    first = client.post("/v1/recommendations", json={"user_id": user, "k": 5}).json()
    top = first["items"][0]["item_id"]
    resp = client.post("/v1/events", json={"user_id": user, "item_id": top, "type": "rating", "value": 4.0})
    assert resp.status_code == 202
    after = client.post("/v1/recommendations", json={"user_id": user, "k": 5}).json()
    assert after["cached"] is False
    assert top not in [i["item_id"] for i in after["items"]]


def test_metrics_page_is_prometheus_text(client: httpx.Client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    client.post("/v1/chat/completions", json={"model": client.get("/v1/models").json()["data"][0]["id"],
                                              "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 4,
                                              "temperature": 0})
    resp = client.get("/metrics")
    assert resp.status_code == 200
    families = {f.name for f in text_string_to_metric_families(resp.text)}
    assert "tierserve_requests" in families
    # the LLM layer's own numbers: prefix-cache hit rate, time to first token, tokens per second
    for name in ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries", "vllm:time_to_first_token_seconds",
                 "vllm:generation_tokens", "tierserve_cache_lookups"):
        assert name in families, (name, sorted(f for f in families if f.startswith(("vllm", "tierserve"))))


def test_embeddings_route(client: httpx.Client) -> None:
    resp = client.post("/v1/embeddings", json={"input": ["hello world", "cache me"]})
    assert resp.status_code == 200
    data = resp.json()["data"]
    assert len(data) == 2 and len(data[0]["embedding"]) == 384
    bad = client.post("/v1/embeddings", json={"input": []})
    assert bad.status_code == 400
