"""`POST /v1/recommendations` answered by the Recommender itself, one hop from Serve's proxy.

configs/local.yaml deploys the `recs` application at `/v1/recommendations`
(deployments/recommender_http.py); the session app is deployed as that file says. These tests
check that the one-hop route is the route clients reach, that it answers as the Ingress's route
does (same answers, same error bodies), and that API keys hold on it as on the Ingress.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from deployments.config import AppSettings
from tests.e2e.conftest import ADMIN, deploy_side_ingress, local_app_config, session_handle, wait_running

VIA_INGRESS = "/via-ingress"
KEYS_PREFIX = "/recs-keys"
KEYS = {"key-acme": "acme", "key-globex": "globex"}


@pytest.fixture(scope="module")
def via_ingress(app_url: str) -> Iterator[str]:
    """The two-hop route over the session's Recommender replica: an Ingress that serves it."""
    from ray import serve

    deploy_side_ingress("tierserve-via-ingress", VIA_INGRESS, AppSettings.from_args(local_app_config().get("args")))
    yield f"{app_url}{VIA_INGRESS}"
    serve.delete("tierserve-via-ingress")


@pytest.fixture(scope="module")
def keyed_recs(app_url: str) -> Iterator[str]:
    """A second `recs` application with API keys, deployed as the configs deploy theirs."""
    from ray import serve

    from deployments.app import RECS_ROUTE_PREFIX, build_recs_app

    args = {**(local_app_config().get("args") or {}), "api_keys": KEYS}
    serve.run(build_recs_app(args), name="recs-keys", route_prefix=f"{KEYS_PREFIX}{RECS_ROUTE_PREFIX}", blocking=False)
    wait_running("recs-keys")
    yield f"{app_url}{KEYS_PREFIX}"
    serve.delete("recs-keys")


def test_the_recs_application_takes_the_route(client: httpx.Client) -> None:
    routes = client.get("/-/routes").json()
    assert routes.get("/v1/recommendations") == "recs", routes
    assert routes.get("/") == "tierserve", routes
    # the path with a trailing slash is the same route, not a redirect (a client would POST twice)
    for path in ("/v1/recommendations", "/v1/recommendations/"):
        resp = client.post(path, json={"user_id": 1, "k": 3}, follow_redirects=False)
        assert resp.status_code == 200, (path, resp.status_code, resp.text)
        assert len(resp.json()["items"]) == 3


BODIES: list[tuple[str, dict[str, str] | None, bytes]] = [
    ("valid", None, b'{"user_id": 7, "k": 4}'),
    ("k too small", None, b'{"user_id": 7, "k": 0}'),
    ("k too large", None, b'{"user_id": 7, "k": 100000}'),
    ("unknown field", None, b'{"user_id": 7, "k": 4, "kk": 1}'),
    ("invalid JSON", None, b'{"user_id": 7'),
    ("a JSON array", None, b"[1, 2]"),
    ("empty", None, b""),
    ("a form body", {"content-type": "application/x-www-form-urlencoded"}, b"user_id=7&k=4"),
    ("over the body limit", None, b'{"user_id": 7, "pad": "' + b"x" * (300 * 1024) + b'"}'),
]


@pytest.mark.parametrize(("case", "headers", "body"), BODIES, ids=[b[0] for b in BODIES])
def test_one_hop_answers_as_the_ingress_route_does(client: httpx.Client, via_ingress: str, case: str,
                                                    headers: dict[str, str] | None, body: bytes) -> None:
    sent = {"content-type": "application/json", **(headers or {})}
    direct = client.post("/v1/recommendations", content=body, headers=sent)
    through = httpx.post(f"{via_ingress}/v1/recommendations", content=body, headers=sent, timeout=120)
    assert direct.status_code == through.status_code, (case, direct.text, through.text)
    if direct.status_code == 200:
        mine, theirs = direct.json(), through.json()
        assert [i["item_id"] for i in mine["items"]] == [i["item_id"] for i in theirs["items"]], case
        assert mine["model_version"] == theirs["model_version"]
    else:
        assert direct.json() == through.json(), case  # the same message, type, param and code


def test_api_keys_hold_on_the_one_hop_route(keyed_recs: str) -> None:
    url = f"{keyed_recs}/v1/recommendations"
    missing = httpx.post(url, json={"user_id": 1, "k": 3}, timeout=60)
    assert missing.status_code == 401, missing.text
    assert "Authorization" in missing.json()["error"]["message"]
    wrong = httpx.post(url, json={"user_id": 1, "k": 3}, headers={"authorization": "Bearer not-a-key"}, timeout=60)
    assert wrong.status_code == 401, wrong.text
    ok = httpx.post(url, json={"user_id": 1, "k": 3}, headers={"authorization": "Bearer key-acme"}, timeout=60)
    assert ok.status_code == 200, ok.text
    # which tier held the user's row is shared by every tenant: not told to a keyed tenant
    assert "sources" not in ok.json()


def test_a_keyless_one_hop_route_keeps_sources_for_debugging(client: httpx.Client) -> None:
    resp = client.post("/v1/recommendations", json={"user_id": 2, "k": 3})
    assert resp.status_code == 200 and "sources" in resp.json(), resp.text


@pytest.fixture(scope="module")
def ingress_before_recs(app_url: str) -> Iterator[str]:
    """An Ingress whose `recommendations_app` is not deployed (yet): what a fresh cluster can see
    for a moment, since Serve deploys a config's applications in no set order."""
    from ray import serve

    from deployments.ingress import Ingress

    settings = AppSettings.from_args(local_app_config().get("args"))
    settings.recommendations_app = "recs-not-deployed"
    handles = [session_handle(n) for n in ("Encoder", "SemanticCache", "LLM")]
    serve.run(Ingress.bind(settings.model_dump(), *handles), name="tierserve-before-recs", route_prefix="/before-recs",
              blocking=False)
    wait_running("tierserve-before-recs")
    yield f"{app_url}/before-recs"
    serve.delete("tierserve-before-recs")


def test_an_ingress_starts_before_its_recs_application_and_answers_without_a_5xx(ingress_before_recs: str) -> None:
    with httpx.Client(base_url=ingress_before_recs, timeout=120, headers=ADMIN) as c:
        assert c.get("/healthz").status_code == 200
        stats = c.get("/v1/cache/stats")
        assert stats.status_code == 200 and stats.json()["recommender"] == {"status": "unavailable"}, stats.text
        recs = c.post("/v1/recommendations", json={"user_id": 1, "k": 3})
        assert recs.status_code == 503 and "retry" in recs.json()["error"]["message"], recs.text
        event = c.post("/v1/events", json={"user_id": 1, "item_id": 1, "type": "rating", "value": 4})
        assert event.status_code == 503 and "nothing was sent" in event.json()["error"]["message"], event.text
        assert c.get("/metrics").status_code == 200
