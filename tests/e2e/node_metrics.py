"""Reading what Prometheus would scrape: every Ray node's metrics export port (not a test module).

Ray's metrics agent on each node serves the series that the node's processes recorded through
`ray.util.metrics` / `ray.serve.metrics` (Ray prefixes their names with `ray_`). The agent
publishes them on its report interval, so a reader polls until what it waits for is there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


def node_metrics_urls() -> list[str]:
    """`http://host:port/metrics` of every alive node of the cluster this process is connected to."""
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]


def scrape(urls: list[str]) -> str:
    """The pages of all nodes, one after the other (each node exports only its own processes)."""
    return "\n".join(httpx.get(u, timeout=10).text for u in urls)


def total(page: str, sample: str, **labels: str) -> float:
    """Sum of the samples named ``sample`` whose labels include ``labels``, over all replicas."""
    found = 0.0
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                found += s.value
    return found


def samples(page: str, sample: str, **labels: str) -> list[Any]:
    return [s for f in text_string_to_metric_families(page) for s in f.samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]


def poll(urls: list[str], done: Callable[[str], bool], timeout_s: float = 45.0) -> str:
    """Scrape until ``done(page)``; the last page either way (the caller asserts on it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        page = scrape(urls)
        if done(page) or time.monotonic() > deadline:
            return page
        time.sleep(1)
