"""Errors FastAPI raises before a route runs (a body it cannot parse, an unknown route or method)
answer in the OpenAI error shape `{"error": {...}}` like every other error of the API, not
FastAPI's `{"detail": ...}` (pure: a small FastAPI app with the Ingress's exception handlers)."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from deployments import ingress
from deployments.schemas import ChatRequest


def make_client() -> TestClient:
    app = FastAPI(exception_handlers=dict(ingress.app.exception_handlers))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> dict[str, str]:
        return {"model": body.model}

    return TestClient(app)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]'


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "messages": [{"role": "user", "content": "caf\xe9"}]}',  # Latin-1, not UTF-8
        CHAT + b', "seed": ' + b"7" * 4301 + b"}",  # past Python's int digits limit
        CHAT + b', "x": ' + nested(1000).encode() + b"}",  # past the JSON reader's recursion limit
    ],
    ids=["not-utf8", "huge-int", "deep"],
)
def test_an_unparsable_body_is_an_openai_error(body: bytes) -> None:
    resp = make_client().post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == 400, error
    assert error["message"].startswith("There was an error parsing the body: send a JSON object encoded as UTF-8"), error


def test_deep_but_parsable_nesting_is_a_400_from_the_schema() -> None:
    body = CHAT + b', "x": ' + nested(950).encode() + b"}"
    resp = make_client().post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert "x is nested more than 64 levels deep" in resp.json()["error"]["message"]


def test_unknown_routes_and_methods_keep_status_and_headers() -> None:
    client = make_client()
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "Not Found"
    wrong = client.get("/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"] == {"message": "Method Not Allowed", "type": "invalid_request_error",
                                     "param": None, "code": 405}


def test_the_handler_is_registered_for_both_http_exceptions() -> None:
    handler = ingress.app.exception_handlers[StarletteHTTPException]
    request = Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []})
    resp = asyncio.run(handler(request, HTTPException(503, "busy", headers={"retry-after": "5"})))
    assert resp.status_code == 503 and resp.headers["retry-after"] == "5"
    assert json.loads(resp.body)["error"] == {"message": "busy", "type": "server_error", "param": None, "code": 503}


def test_a_request_refused_before_its_route_ran_is_counted_on_that_route() -> None:
    """A bad body never reaches the route's own `metrics.observe`: the dashboards' error rate must
    still see it (it once counted only answered requests: 20 refused recommendations, none shown)."""
    from prometheus_client import REGISTRY

    from deployments.schemas import RecommendationRequest

    app = FastAPI(exception_handlers=dict(ingress.app.exception_handlers))

    @app.post("/v1/recommendations")
    async def recommend(body: RecommendationRequest) -> dict[str, int]:
        return {"user_id": body.user_id}

    labels = {"route": "recommendations", "cache": "none", "status": "422"}
    before = REGISTRY.get_sample_value("tierserve_requests_total", labels) or 0
    resp = TestClient(app).post("/v1/recommendations", json={"user_id": "x", "k": 3})
    assert resp.status_code == 422
    assert REGISTRY.get_sample_value("tierserve_requests_total", labels) == before + 1
    # a path outside the API is not a label (a client could mint any number of them)
    TestClient(app).post("/v1/nope", json={})
    assert REGISTRY.get_sample_value("tierserve_requests_total", {**labels, "route": "/v1/nope"}) is None
