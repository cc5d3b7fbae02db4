"""Counters add up over replicas: two Ingress replicas, N requests, the node's metrics summed = N,
and the lookups on /v1/cache/stats = N whichever replica answers the page.

A side application runs the real Ingress with `num_replicas=2` on top of the session app's other
deployments. Each replica records its own series through Ray Serve's metrics API; the test reads
them where Prometheus would, on the node's Ray metrics export port, and sums over `replica`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from caches.lookup_counts import FLUSH_INTERVAL_S
from deployments.config import AppSettings
from tests.e2e.conftest import ADMIN, local_app_config, session_handle, wait_running
from tests.e2e.node_metrics import node_metrics_urls, poll, samples

APP = "metrics-2x"
PREFIX = "/metrics-2x"
N = 24
COUNTER = "ray_tierserve_requests_total"


@pytest.fixture(scope="module")
def two_ingress_replicas(app_url: str) -> Iterator[str]:
    from ray import serve

    from deployments.ingress import Ingress

    settings = AppSettings.from_args(local_app_config().get("args"))
    handles = [session_handle(n) for n in ("Encoder", "SemanticCache", "LLM", "Recommender")]
    serve.run(Ingress.options(num_replicas=2).bind(settings.model_dump(), *handles), name=APP,
              route_prefix=PREFIX, blocking=False)
    wait_running(APP)
    yield f"{app_url}{PREFIX}"
    serve.delete(APP)


def test_request_counters_summed_over_replicas_equal_requests_sent(two_ingress_replicas: str) -> None:
    with httpx.Client(base_url=two_ingress_replicas, timeout=60) as client:
        for i in range(N):
            resp = client.post("/v1/recommendations", json={"user_id": 1 + i % 4, "k": 5})
            assert resp.status_code == 200, resp.text
    urls = node_metrics_urls()
    assert urls, "no Ray node exports metrics"

    def counted(page: str) -> float:
        return sum(s.value for s in samples(page, COUNTER, application=APP, route="recommendations"))

    page = poll(urls, lambda p: counted(p) >= N, timeout_s=45)
    series = samples(page, COUNTER, application=APP, route="recommendations")
    assert counted(page) == N, [(s.labels.get("replica"), s.labels.get("cache"), s.value) for s in series]
    # Every series belongs to one replica of the Ingress, and both replicas answered some: a
    # single scrape of one replica would have shown only part of the N.
    assert {s.labels["deployment"] for s in series} == {"Ingress"}
    assert len({s.labels["replica"] for s in series}) == 2, [(s.labels["replica"], s.value) for s in series]


def _exact_lookups(client: httpx.Client) -> tuple[float, str]:
    """The `default` tenant's exact-layer lookups on the admin stats page, and the page's scope."""
    body = client.get("/v1/cache/stats", headers=ADMIN).json()
    return sum(body["lookups_by_tenant"].get("exact", {}).get("default", {}).values()), body["lookups_scope"]


def test_cache_stats_count_every_replicas_lookups(two_ingress_replicas: str, model_name: str) -> None:
    """/v1/cache/stats answered by either replica counts the lookups both answered (they used to
    show only their own share: about half, a different half per call)."""
    with httpx.Client(base_url=two_ingress_replicas, timeout=120) as client:
        before, _ = _exact_lookups(client)
        for _ in range(N):  # one miss, then exact hits: cheap, and each is one exact lookup
            resp = client.post("/v1/completions", json={"model": model_name, "prompt": "Lookup counts over replicas:",
                                                        "max_tokens": 2, "temperature": 0})
            assert resp.status_code == 200, resp.text
        deadline = time.monotonic() + 15  # the replicas flush every FLUSH_INTERVAL_S
        while _exact_lookups(client)[0] - before < N and time.monotonic() < deadline:
            time.sleep(0.2)
        # A page shows its own replica's unflushed lookups but not the other's, for up to one
        # flush interval (caches/lookup_counts.py): past it, every page must show all N.
        time.sleep(2 * FLUSH_INTERVAL_S)
        pages = [_exact_lookups(client) for _ in range(8)]  # the proxy spreads these over both
    assert all(scope == "all replicas" for _, scope in pages), pages
    assert [n - before for n, _ in pages] == [N] * len(pages), pages
