"""API keys, tenant isolation and model-version bumps over HTTP.

A second Ingress (its own route prefix, API keys configured) is deployed beside the session app
and reuses its Encoder, SemanticCache, LLM and Recommender replicas: the same Redis, the same
caches, so isolation is tested where it could actually leak.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deployments.config import AppSettings
from tests.e2e.conftest import deploy_side_ingress, local_app_config

APP_NAME = "tierserve-auth"
PREFIX = "/auth"
KEYS = {"key-acme": "acme", "key-globex": "globex"}
ADMIN_KEY = "admin-key-for-tests"


@pytest.fixture(scope="module")
def auth_url(app_url: str) -> Iterator[str]:
    from ray import serve

    settings = AppSettings.from_args(local_app_config().get("args"))
    settings.api_keys = KEYS
    settings.admin_keys = [ADMIN_KEY]
    settings.recommender.event_tenants = ["globex"]  # globex may send events, acme may not
    deploy_side_ingress(APP_NAME, PREFIX, settings)
    yield f"{app_url}{PREFIX}"
    serve.delete(APP_NAME)


def chat(url: str, key: str | None, question: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    models = httpx.get(f"{url}/v1/models", headers=headers, timeout=60)
    model = models.json()["data"][0]["id"] if models.status_code == 200 else "x"
    return httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=120, json={
        "model": model, "temperature": 0, "max_tokens": 12, "messages": [{"role": "user", "content": question}]})


def test_missing_or_wrong_key_is_a_401_with_a_reason(auth_url: str) -> None:
    missing = chat(auth_url, None, "hello")
    assert missing.status_code == 401 and "Authorization" in missing.json()["error"]["message"]
    wrong = chat(auth_url, "not-a-key", "hello")
    assert wrong.status_code == 401
    recs = httpx.post(f"{auth_url}/v1/recommendations", json={"user_id": 1, "k": 3}, timeout=60)
    assert recs.status_code == 401
    # the model list too ("any tenant" means a tenant: docs/api.md)
    for path in ("/v1/models", "/v1/models/x"):
        for headers in ({}, {"authorization": "Bearer not-a-key"}):
            resp = httpx.get(f"{auth_url}{path}", headers=headers, timeout=60)
            assert resp.status_code == 401, (path, headers, resp.text)


def test_the_metrics_page_needs_the_admin_key_where_tenants_have_keys(auth_url: str) -> None:
    """Its totals (every tenant's lookups; with tenant labels, their names) are what the stats
    page keeps from tenants, so a tenant key (or none) may not read it; the admin key may."""
    for headers in ({}, {"authorization": "Bearer key-acme"}):
        resp = httpx.get(f"{auth_url}/metrics", headers=headers, timeout=60)
        assert resp.status_code == 403 and "admin key" in resp.json()["error"]["message"], (headers, resp.text)
    admin = httpx.get(f"{auth_url}/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    assert admin.status_code == 200 and "tierserve_requests_total" in admin.text


def test_a_tenant_is_not_told_which_tier_held_a_shared_user_row(auth_url: str) -> None:
    """The user's feature row is shared by every tenant (user ids are the deployment's): its tier
    ("redis" = read lately) would tell globex that acme just asked about the user."""
    user = 42
    first = httpx.post(f"{auth_url}/v1/recommendations", json={"user_id": user, "k": 3}, timeout=60,
                       headers={"authorization": "Bearer key-acme"})
    other = httpx.post(f"{auth_url}/v1/recommendations", json={"user_id": user, "k": 3}, timeout=60,
                       headers={"authorization": "Bearer key-globex"})
    for resp in (first, other):
        assert resp.status_code == 200, resp.text
        assert "sources" not in resp.json() and resp.json()["items"]


def test_tenants_never_see_each_others_cached_answers(auth_url: str) -> None:
    question = f"What is the capital of Italy? ({uuid.uuid4().hex[:6]})"
    first = chat(auth_url, "key-acme", question)
    assert first.status_code == 200 and first.headers["x-cache"] == "miss"
    assert chat(auth_url, "key-acme", question).headers["x-cache"] == "exact"
    other = chat(auth_url, "key-globex", question)
    assert other.status_code == 200 and other.headers["x-cache"] == "miss"
    # and globex's own KV blocks: vLLM got a different cache_salt, so nothing of acme's was reused
    assert other.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_version_bump_makes_old_answers_unreachable_at_once(auth_url: str) -> None:
    headers = {"authorization": "Bearer key-acme"}
    model = httpx.get(f"{auth_url}/v1/models", headers=headers, timeout=60).json()["data"][0]["id"]
    question = f"Name a primary colour. ({uuid.uuid4().hex[:6]})"
    chat(auth_url, "key-acme", question)
    assert chat(auth_url, "key-acme", question).headers["x-cache"] == "exact"
    new_version = f"v-{uuid.uuid4().hex[:6]}"
    # a tenant's key has no admin rights: it cannot wipe every tenant's caches
    refused = httpx.post(f"{auth_url}/admin/models/{model}/version", headers=headers, json={"version": new_version},
                         timeout=60)
    assert refused.status_code == 403 and "admin key" in refused.json()["error"]["message"]
    assert chat(auth_url, "key-acme", question).headers["x-cache"] == "exact"  # nothing was bumped
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    bumped = httpx.post(f"{auth_url}/admin/models/{model}/version", headers=headers, json={"version": new_version}, timeout=60)
    assert bumped.status_code == 200 and bumped.json()["version"] == new_version
    time.sleep(1.0)  # versions are re-read at most every 0.5 s per replica
    after = chat(auth_url, "key-acme", question)
    assert after.headers["x-cache"] == "miss"
    bad = httpx.post(f"{auth_url}/admin/models/{model}/version", headers=headers, json={"version": "no spaces!"}, timeout=60)
    assert bad.status_code == 422
    unknown = httpx.post(f"{auth_url}/admin/models/nope/version", headers=headers, json={"version": "v9"}, timeout=60)
    assert unknown.status_code == 404


def test_cache_stats_report_layers_and_tenants(auth_url: str) -> None:
    chat(auth_url, "key-acme", f"What is a cache? ({uuid.uuid4().hex[:6]})")
    stats = httpx.get(f"{auth_url}/v1/cache/stats", headers={"authorization": "Bearer key-globex"}, timeout=60)
    assert stats.status_code == 200
    body = stats.json()
    # a tenant sees its own numbers only: no other tenant's counters, scopes or totals
    assert body["tenant"] == "globex" and "acme" not in stats.text and "by_tenant" not in body
    assert all(s.startswith("sem.{globex}:") for s in body["semantic"]["scopes"])  # the tenant is the hash tag
    admin = httpx.get(f"{auth_url}/v1/cache/stats", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=60).json()
    assert {"exact", "semantic", "recommender", "lookups_by_tenant"} <= set(admin)
    assert "acme" in admin["exact"]["by_tenant"]


def test_admin_routes_need_an_admin_key_even_on_loopback(client: httpx.Client, model_name: str) -> None:
    # the session app runs with auth off (no API keys): that opens the tenant routes to loopback
    # callers, never the admin routes
    for headers in ({}, {"authorization": "Bearer not-the-admin-key"}):
        resp = client.post(f"/admin/models/{model_name}/version", json={"version": "v-never"}, headers=headers)
        assert resp.status_code == 403 and "admin key" in resp.json()["error"]["message"]
    assert client.get("/v1/models").json()["data"][0]["version"] != "v-never"
    stats = client.get("/v1/cache/stats").json()
    assert stats["tenant"] == "default" and "recommender" not in stats  # a tenant's view, not the admin's


def test_exported_metrics_carry_no_tenant_names_unless_opted_in(auth_url: str) -> None:
    from tests.e2e.node_metrics import node_metrics_urls, poll, samples

    chat(auth_url, "key-acme", f"Name a fruit. ({uuid.uuid4().hex[:6]})")
    urls = node_metrics_urls()
    page = poll(urls, lambda p: bool(samples(p, "ray_tierserve_cache_lookups_total", tenant="all")))
    lookups = samples(page, "ray_tierserve_cache_lookups_total")
    assert lookups and {s.labels["tenant"] for s in lookups} == {"all"}
    assert 'tenant="acme"' not in page and 'tenant="globex"' not in page


def test_events_need_the_admin_key_or_a_tenant_listed_for_them(auth_url: str, redis_url: str) -> None:
    import redis

    from feature_store.pipeline import RepoInfo

    repo = RepoInfo.load(Path(os.environ["TIERSERVE_FEAST_REPO"]))  # the session app's own copy
    event = {"user_id": repo.user_ids_sample[-1], "item_id": repo.popular_items[0], "type": "view"}
    url = f"{auth_url}/v1/events"
    assert httpx.post(url, json=event, timeout=60).status_code == 401
    refused = httpx.post(url, json=event, headers={"authorization": "Bearer key-acme"}, timeout=60)
    assert refused.status_code == 403, refused.text
    message = refused.json()["error"]["message"]
    # says why (users are shared by every tenant) and how to get the right
    assert "acme" in message and "admin key" in message and "recommender.event_tenants" in message
    listed = httpx.post(url, json=event, headers={"authorization": "Bearer key-globex"}, timeout=60)
    assert listed.status_code == 202, listed.text
    assert listed.json()["tenant"] == "globex"
    admin = httpx.post(url, json=event, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    assert admin.status_code == 202, admin.text
    assert admin.json()["tenant"] == "(admin)"
    client = redis.Redis.from_url(redis_url)
    try:
        audit = [{k.decode(): v.decode() for k, v in f.items()} for _, f in client.xrange("tierserve:recs:events")]
    finally:
        client.close()
    senders = [e["tenant"] for e in audit if e["user_id"] == str(event["user_id"])]
    assert "globex" in senders and "(admin)" in senders and "acme" not in senders  # the refused one left no trace
    unknown = httpx.post(url, json={**event, "user_id": 10**9 + 11}, headers={"authorization": "Bearer key-globex"},
                         timeout=60)
    assert unknown.status_code == 404 and "not in the feature store" in unknown.json()["error"]["message"]
