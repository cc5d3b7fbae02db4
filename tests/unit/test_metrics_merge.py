from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from caches import metrics as cache_metrics
from caches.metrics import Kind
from deployments import metrics
from deployments.metrics import merge_expositions


def _exposition(value: float) -> bytes:
    reg = CollectorRegistry()
    Counter("demo_hits", "hits", ["tier"], registry=reg).labels("redis").inc(value)
    Histogram("demo_seconds", "lat", registry=reg).observe(0.01)
    return generate_latest(reg)


def test_same_metric_from_two_processes_stays_two_valid_series() -> None:
    page = merge_expositions({"A": ("a1", _exposition(2)), "B": ("b7", _exposition(5))})
    families = {f.name: f for f in text_string_to_metric_families(page)}
    hits = {(s.labels["deployment"], s.labels["replica"]): s.value
            for s in families["demo_hits"].samples if s.name == "demo_hits_total"}
    assert hits == {("A", "a1"): 2.0, ("B", "b7"): 5.0}
    assert page.count("# TYPE demo_hits_total counter") == 1
    assert any(s.name == "demo_seconds_bucket" for s in families["demo_seconds"].samples)


class _Recorder:
    def __init__(self, kind: Kind, name: str, buckets: Sequence[float]) -> None:
        self.kind, self.name, self.buckets = kind, name, tuple(buckets)
        self.values: list[tuple[float, dict[str, str]]] = []

    def record(self, value: float, tags: dict[str, str]) -> None:
        self.values.append((value, tags))


@pytest.fixture
def exported() -> Iterator[dict[str, _Recorder]]:
    made: dict[str, _Recorder] = {}

    def exporter(kind: Kind, name: str, doc: str, labelnames: tuple[str, ...], buckets: Sequence[float]) -> _Recorder:
        made[name] = _Recorder(kind, name, buckets)
        return made[name]

    cache_metrics.export_through(exporter)
    yield made
    cache_metrics.export_through(metrics.ray_exporter)


def test_families_write_the_local_registry_and_the_exporter(exported: dict[str, _Recorder]) -> None:
    before = REGISTRY.get_sample_value("tierserve_tier_hits_total", {"tier": "unit", "namespace": "features"}) or 0
    cache_metrics.count_by_namespace(cache_metrics.HITS, "unit", ["features:1", "features:2", "emb:x"])
    after = REGISTRY.get_sample_value("tierserve_tier_hits_total", {"tier": "unit", "namespace": "features"})
    assert after == before + 2
    assert sorted(v for v, _ in exported["tierserve_tier_hits"].values) == [1, 2]
    assert {"tier": "unit", "namespace": "emb"} in [t for _, t in exported["tierserve_tier_hits"].values]
    # Positional labels (the ingress's request counter) map onto the label names.
    metrics.REQUESTS.labels("recommendations", "hit", "200").inc()
    assert exported["tierserve_requests"].values[-1] == (1.0, {"route": "recommendations", "cache": "hit", "status": "200"})
    cache_metrics.LATENCY.labels(tier="unit", namespace="features").observe(0.002)
    assert exported["tierserve_tier_read_latency_seconds"].kind == "histogram"
    assert exported["tierserve_tier_read_latency_seconds"].buckets == cache_metrics.LATENCY_BUCKETS_S


def test_outside_a_replica_the_ray_exporter_declines_and_nothing_fails() -> None:
    # The driver and unit tests have no replica context: no Ray metric, the local one still counts.
    assert metrics.ray_exporter("counter", "x", "", ("a",), ()) is None
    before = REGISTRY.get_sample_value("tierserve_tier_misses_total", {"tier": "unit2", "namespace": "n"}) or 0
    cache_metrics.MISSES.labels(tier="unit2", namespace="n").inc(3)
    assert REGISTRY.get_sample_value("tierserve_tier_misses_total", {"tier": "unit2", "namespace": "n"}) == before + 3


def test_caches_package_stays_free_of_ray() -> None:
    import ast
    from pathlib import Path

    root = Path(cache_metrics.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "ray" or n.startswith("ray.") for n in names), path


def test_family_is_a_drop_in_for_collect() -> None:
    # /v1/cache/stats reads the lookups counter like a prometheus-client metric.
    metrics.CACHE_LOOKUPS.labels("exact", "unit", "hit").inc()
    names = {s.name for m in metrics.CACHE_LOOKUPS.collect() for s in m.samples}
    assert "tierserve_cache_lookups_total" in names
