"""Redis down: chat is answered by the LLM with `x-cache: bypass`, no error; caching resumes by
itself when Redis is back. A second Ingress with its own Redis is deployed beside the session app
(reusing its Encoder, SemanticCache, LLM and Recommender), so stopping that Redis is a real outage
of the exact cache without disturbing the other tests."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from caches.redis_server import EmbeddedRedis
from deployments.config import AppSettings
from tests.e2e.conftest import deploy_side_ingress, local_app_config

APP_NAME = "tierserve-outage"
PREFIX = "/outage"


@pytest.fixture(scope="module")
def outage(app_url: str) -> Iterator[tuple[str, EmbeddedRedis]]:
    from ray import serve

    server = EmbeddedRedis().start()
    settings = AppSettings.from_args(local_app_config().get("args"))
    settings.redis_url = server.url
    deploy_side_ingress(APP_NAME, PREFIX, settings)
    yield f"{app_url}{PREFIX}", server
    serve.delete(APP_NAME)
    server.stop()


def ask(url: str, question: str) -> httpx.Response:
    model = httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]
    return httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "temperature": 0, "max_tokens": 12, "messages": [{"role": "user", "content": question}]})


def test_redis_down_means_bypass_then_caching_resumes(outage: tuple[str, EmbeddedRedis]) -> None:
    url, server = outage
    question = f"Name a planet. ({uuid.uuid4().hex[:6]})"
    assert ask(url, question).headers["x-cache"] == "miss"
    assert ask(url, question).headers["x-cache"] == "exact"

    server.stop()
    try:
        down = ask(url, f"Name an ocean. ({uuid.uuid4().hex[:6]})")
        assert down.status_code == 200, down.text
        assert down.headers["x-cache"] == "bypass"
        assert down.json()["choices"][0]["message"]["content"]
        assert httpx.get(f"{url}/healthz", timeout=30).json()["redis"] == "down"
    finally:
        server.start()  # same port: the app's clients must reconnect by themselves

    fresh = f"Name a continent. ({uuid.uuid4().hex[:6]})"
    deadline = time.monotonic() + 30
    while ask(url, fresh).headers["x-cache"] != "exact":  # miss (stored), then exact
        assert time.monotonic() < deadline, "caching did not resume after Redis came back"
        time.sleep(1)
