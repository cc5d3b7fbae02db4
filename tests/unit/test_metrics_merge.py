from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from deployments.metrics import merge_expositions


def _exposition(value: float) -> bytes:
    reg = CollectorRegistry()
    Counter("demo_hits", "hits", ["tier"], registry=reg).labels("redis").inc(value)
    Histogram("demo_seconds", "lat", registry=reg).observe(0.01)
    return generate_latest(reg)


def test_same_metric_from_two_processes_stays_two_valid_series() -> None:
    page = merge_expositions({"A": _exposition(2), "B": _exposition(5)})
    families = {f.name: f for f in text_string_to_metric_families(page)}
    hits = {s.labels["deployment"]: s.value for s in families["demo_hits"].samples if s.name == "demo_hits_total"}
    assert hits == {"A": 2.0, "B": 5.0}
    assert page.count("# TYPE demo_hits_total counter") == 1
    assert any(s.name == "demo_seconds_bucket" for s in families["demo_seconds"].samples)
