"""Per-tenant budgets over HTTP: a tenant that floods the exact cache evicts only its own answers.

A side Ingress (the session app's Encoder, SemanticCache, LLM and Recommender) with two tenants and
an exact-cache budget per tenant of a few answers, so the flood reaches it in a few dozen requests.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from caches.budget import usage
from deployments.config import AppSettings
from tests.e2e.conftest import deploy_side_ingress, local_app_config

APP_NAME = "tierserve-budgets"
PREFIX = "/budgets"
KEYS = {"key-flood": "flooder", "key-quiet": "quiet"}
TENANT_BYTES = 12_000  # a handful of short answers


@pytest.fixture(scope="module")
def budget_url(app_url: str) -> Iterator[str]:
    from ray import serve

    settings = AppSettings.from_args(local_app_config().get("args"))
    settings.api_keys = KEYS
    settings.cache.result_tenant_max_bytes = TENANT_BYTES
    deploy_side_ingress(APP_NAME, PREFIX, settings)
    yield f"{app_url}{PREFIX}"
    serve.delete(APP_NAME)


def chat(url: str, key: str, system: str, question: str) -> httpx.Response:
    model = httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=60).json()["data"][0]["id"]
    return httpx.post(f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=120, json={
        "model": model, "temperature": 0, "max_tokens": 4,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]})


def test_a_flooding_tenant_evicts_only_its_own_exact_answers(budget_url: str, redis_url: str) -> None:
    run = uuid.uuid4().hex[:8]
    quiet = [(f"quiet {run} {i}", "What is the capital of France?") for i in range(2)]
    for system, question in quiet:
        assert chat(budget_url, "key-quiet", system, question).headers["x-cache"] == "miss"
    client = redis.Redis.from_url(redis_url)
    # every flood request is a new scope and a new exact key: all misses, all stored
    for i in range(40):
        resp = chat(budget_url, "key-flood", f"flood {run} {i}", "What is the capital of France?")
        assert resp.status_code == 200
        assert usage(client, "res.__meta", "flooder")["bytes"] <= TENANT_BYTES
    assert usage(client, "res.__meta", "flooder")["entries"] < 40  # the flooder's oldest went
    for system, question in quiet:  # the quiet tenant's answers are all still there
        assert chat(budget_url, "key-quiet", system, question).headers["x-cache"] == "exact"
    first = chat(budget_url, "key-flood", f"flood {run} 0", "What is the capital of France?")
    assert first.headers["x-cache"] != "exact"  # evicted by its own tenant's flood
