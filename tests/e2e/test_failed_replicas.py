"""A replica that fails its call is a gap or a 503 on the operations and model routes, never a 500.
(And the admin bump route takes a served model name with '/', which this side app serves.)

A second Ingress, with its own Redis, is deployed beside the session app over deployments whose
every call fails (`FailingReplica`: a real Serve replica raising, as one does while it dies or
after its init broke). The routes that ask other deployments for their part must say what is
missing: `/v1/cache/stats` shows the part as unavailable, `/v1/models` is a 503 with a reason,
and a `recs` version bump that is stored answers 200 with a warning (every Recommender replica
follows the version in Redis on its own; the reload call only hurries one).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from caches.redis_server import EmbeddedRedis
from deployments.config import AppSettings
from tests.e2e.conftest import ADMIN, local_app_config, wait_running

APP_NAME = "tierserve-failing"
PREFIX = "/failing"
SERVED_NAME = "tierserve-e2e/SmolLM2"  # a hub-style name, with '/'


class FailingReplica:
    """Every method the Ingress calls on its other deployments raises."""

    def _fail(self, *_: Any, **__: Any) -> Any:
        raise RuntimeError("this replica fails every call")

    info = stats = reload = metrics_text = purge_model = _fail


@pytest.fixture(scope="module")
def failing(app_url: str) -> Iterator[tuple[str, EmbeddedRedis]]:
    from ray import serve

    from deployments.ingress import Ingress

    server = EmbeddedRedis().start()
    settings = AppSettings.from_args(local_app_config().get("args"))
    settings.redis_url = server.url  # the bumps below must not reach the session app's Recommender
    settings.llm.served_model_name = SERVED_NAME
    broken = serve.deployment(name="FailingReplica", ray_actor_options={"num_cpus": 0})(FailingReplica).bind()
    serve.run(Ingress.bind(settings.model_dump(), broken, broken, broken, broken), name=APP_NAME,
              route_prefix=PREFIX, blocking=False)
    wait_running(APP_NAME)
    yield f"{app_url}{PREFIX}", server
    serve.delete(APP_NAME)
    server.stop()


def test_cache_stats_show_a_failed_replicas_part_as_unavailable(failing: tuple[str, EmbeddedRedis]) -> None:
    url, _ = failing
    admin = httpx.get(f"{url}/v1/cache/stats", headers=ADMIN, timeout=60)
    assert admin.status_code == 200, admin.text
    body = admin.json()
    assert body["semantic"] == {"status": "unavailable"}
    assert body["recommender"] == {"status": "unavailable"}
    assert "by_tenant" in body["exact"]  # the Ingress's own part (its Redis is up) is still there
    tenant = httpx.get(f"{url}/v1/cache/stats", timeout=60)
    assert tenant.status_code == 200, tenant.text
    assert tenant.json()["semantic"]["available"] is False
    assert tenant.json()["recommendations"]["available"] is False


def test_model_cards_are_a_503_that_says_why_when_a_model_replica_fails(failing: tuple[str, EmbeddedRedis]) -> None:
    url, _ = failing
    for path in ("/v1/models", "/v1/models/SmolLM2-135M-Instruct"):
        resp = httpx.get(f"{url}{path}", timeout=60)
        assert resp.status_code == 503, (path, resp.status_code, resp.text)
        assert "failed to answer" in resp.json()["error"]["message"]
        assert resp.headers["retry-after"]


def test_a_stored_recs_bump_is_a_200_with_a_warning_when_the_reload_call_fails(
        failing: tuple[str, EmbeddedRedis]) -> None:
    url, server = failing
    resp = httpx.post(f"{url}/admin/models/recs/version", headers=ADMIN, json={"version": "v-failing-reload"}, timeout=60)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["version"] == "v-failing-reload"
    assert "loads it on its own" in body["warning"]
    import redis

    from caches.versions import ModelVersions

    stored = ModelVersions(redis.Redis.from_url(server.url), {"recs": "unused-default"}).current("recs")
    assert stored == "v-failing-reload"  # what the replicas follow


@pytest.mark.parametrize("sent_as", [SERVED_NAME, SERVED_NAME.replace("/", "%2F")])
def test_a_served_name_with_a_slash_can_be_bumped(failing: tuple[str, EmbeddedRedis], sent_as: str) -> None:
    """`tierserve bump` sends the name %2F-encoded; curl users send it as it is. Both reach the
    route (before, neither did: a bare 404 "Not Found")."""
    url, _ = failing
    version = f"v-{len(sent_as)}"
    resp = httpx.post(f"{url}/admin/models/{sent_as}/version", headers=ADMIN, json={"version": version}, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == SERVED_NAME and resp.json()["version"] == version
