"""The one-hop recommendation route's path handling (deployments/recommender_http.py).

Serve's proxy hands a request to the `recs` application with its prefix as `root_path` and the
full path unchanged; Starlette routes on the path past `root_path`, so `/v1/recommendations`
itself arrives as "" (TestClient's `root_path` does the same).
"""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from deployments.recommender_http import RECS_ROUTE_PREFIX, PrefixIsTheRoute


def _app(with_middleware: bool) -> FastAPI:
    app = FastAPI()
    if with_middleware:
        app.add_middleware(PrefixIsTheRoute)

    @app.post("/")
    async def answer() -> dict[str, bool]:
        return {"ok": True}

    return app


@pytest.mark.parametrize("path", [RECS_ROUTE_PREFIX, f"{RECS_ROUTE_PREFIX}/"])
def test_the_prefix_with_or_without_a_slash_is_the_route(path: str) -> None:
    client = TestClient(_app(with_middleware=True), root_path=RECS_ROUTE_PREFIX)
    resp = client.post(path, follow_redirects=False)
    assert resp.status_code == 200 and resp.json() == {"ok": True}, (path, resp.status_code)


def test_without_it_the_bare_prefix_is_a_redirect() -> None:
    """Why the middleware exists: a 307 would make a client send its POST twice."""
    client = TestClient(_app(with_middleware=False), root_path=RECS_ROUTE_PREFIX)
    assert client.post(RECS_ROUTE_PREFIX, follow_redirects=False).status_code == 307


def test_other_paths_under_the_prefix_are_not_the_route() -> None:
    client = TestClient(_app(with_middleware=True), root_path=RECS_ROUTE_PREFIX)
    assert client.post(f"{RECS_ROUTE_PREFIX}/other", follow_redirects=False).status_code == 404


def test_a_request_refused_on_the_bare_prefix_is_counted_on_the_route() -> None:
    """The middleware turns `/v1/recommendations` into `/v1/recommendations/`: a body refused
    there still counts on the `recommendations` route (the dashboards' error rate)."""
    from prometheus_client import REGISTRY

    from deployments import http_guards
    from deployments.schemas import RecommendationRequest

    app = FastAPI()
    http_guards.install(app)
    app.add_middleware(PrefixIsTheRoute)

    @app.post("/")
    async def answer(body: RecommendationRequest) -> dict[str, int]:
        return {"user_id": body.user_id}

    labels = {"route": "recommendations", "cache": "none", "status": "422"}
    before = REGISTRY.get_sample_value("tierserve_requests_total", labels) or 0
    resp = TestClient(app, root_path=RECS_ROUTE_PREFIX).post(RECS_ROUTE_PREFIX, json={"user_id": "x", "k": 3})
    assert resp.status_code == 422, resp.text
    assert REGISTRY.get_sample_value("tierserve_requests_total", labels) == before + 1


def test_a_recs_application_needs_recommendations_app_to_name_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """With `recommendations_app: null` the Ingress binds a Recommender of its own: a `recs`
    application beside it would be a second fleet, which events sent through the Ingress miss."""
    from deployments.app import build_recs_app

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(ValueError, match="recommendations_app"):
        build_recs_app({"recommendations_app": None})
    assert build_recs_app({"recommendations_app": "recs"}) is not None
