"""Request metrics of the ingress, the Ray exporter of every tierserve family, the debug page.

What Prometheus scrapes: each replica records its own series through Ray Serve's metrics API
(:func:`install`), which tags them with `deployment`, `replica` and `application`; Ray's metrics
agent exports them on every node's `metrics_export_port` with the `ray_` prefix
(`ray_tierserve_requests_total`, ...). vLLM's engine metrics take the same road through vLLM's
`RayPrometheusStatLogger` (`ray_vllm_*`, see deployments/llm.py). Summing over `replica` is then
exact however many replicas a deployment has.

What `GET /metrics` on the app shows: the process-local prometheus-client registries of the
replicas that answered this one request (one replica per deployment), each sample labelled with
its `deployment` and `replica`. It is a page for humans and single-replica development, never a
scrape target: a scrape through Serve's proxy lands on a random replica.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from ray import serve
from ray.serve import metrics as serve_metrics
from ray.serve.exceptions import RayServeException

from caches import metrics as cache_metrics
from caches.lookup_counts import SharedLookupCounts, nest
from caches.metrics import Family, Kind, Sink
from caches.redis_client import REDIS_ERRORS

log = logging.getLogger("tierserve.metrics")

REQUESTS = Family("counter", "tierserve_requests", "HTTP requests by route, cache layer that answered and status",
                  ("route", "cache", "status"))
LATENCY = Family(
    "histogram", "tierserve_request_seconds", "End-to-end request latency by route and answering cache layer",
    ("route", "cache"),
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CACHE_LOOKUPS = Family("counter", "tierserve_cache_lookups", "Cache lookups by layer, tenant and outcome",
                       ("layer", "tenant", "outcome"))
# Verified semantic mode: would-be hits sent to the model (a lookup outcome "verify" above, each a
# model call) and the judge's verdict on them once the model's answer is stored.
SEMANTIC_VERIFICATIONS = Family(
    "counter", "tierserve_semantic_verifications",
    "Semantic would-be hits verified against the model's answer, by the answer judge's verdict", ("verdict",))


# Tenant names on exported series are opt-in (AppSettings.metrics_tenant_labels): a metrics
# backend is usually readable by more people than any one tenant's data, and every tenant would
# add series. Off, the label reads "all". /v1/cache/stats reads its per-tenant counts from the
# replicas' shared counts in Redis (caches/lookup_counts.py, installed by the Ingress), and from
# this replica's own when Redis is unreachable.
TENANT_LABELS = False
ALL_TENANTS = "all"
_LOCAL_LOOKUPS: Counter[tuple[str, str, str]] = Counter()  # (layer, tenant, outcome) -> count
_lookups_lock = threading.Lock()
_shared_lookups: SharedLookupCounts | None = None


def share_lookups(counts: SharedLookupCounts | None) -> None:
    """Count this replica's lookups into `counts` too (the Ingress, once it has its Redis)."""
    global _shared_lookups
    _shared_lookups = counts


def lookup(layer: str, tenant: str, outcome: str) -> None:
    """Count one cache lookup: exported (tenant label only when opted in), kept per tenant here,
    and added to the counts every replica shares."""
    CACHE_LOOKUPS.labels(layer, tenant if TENANT_LABELS else ALL_TENANTS, outcome).inc()
    with _lookups_lock:
        _LOCAL_LOOKUPS[(layer, tenant, outcome)] += 1
    if _shared_lookups is not None:
        _shared_lookups.add(layer, tenant, outcome)


def verification(verdict: str) -> None:
    """Count one judged verification (``equivalent``: the cached answer would have been right)."""
    SEMANTIC_VERIFICATIONS.labels(verdict).inc()


def lookups_by_tenant() -> tuple[dict[str, dict[str, dict[str, float]]], str]:
    """({layer: {tenant: {outcome: count}}}, scope) for /v1/cache/stats (blocking: one Redis
    read). Scope "all replicas": the shared counts; "this replica": Redis is unreachable (or
    nothing shares), so only the lookups this replica answered."""
    if _shared_lookups is not None:
        try:
            return _shared_lookups.snapshot(), "all replicas"
        except REDIS_ERRORS as exc:
            log.debug("shared lookup counts unreadable: %s", exc)
    with _lookups_lock:
        local = Counter(_LOCAL_LOOKUPS)
    return nest(local), "this replica"


def observe(route: str, cache: str, status: int, started: float) -> None:
    """Count one answered request and its latency since ``started`` (``time.perf_counter()``)."""
    REQUESTS.labels(route, cache, str(status)).inc()
    LATENCY.labels(route, cache).observe(time.perf_counter() - started)


# ------------------------------------------------------------------ export through Ray Serve
# Ray keeps a gauge's value only about two export intervals after it was last set (so that a dead
# worker's gauges age out); a tier's byte count can stay unchanged for minutes. Gauges are set
# again from their last values this often, so an idle replica still shows what it holds.
GAUGE_REFRESH_S = 5.0


class _RaySink:
    def __init__(self, metric: serve_metrics.Counter | serve_metrics.Gauge | serve_metrics.Histogram, kind: Kind) -> None:
        self.metric, self.kind = metric, kind
        self.last: dict[tuple[tuple[str, str], ...], float] = {}
        if kind == "gauge":
            _GAUGES.append(self)
            _start_gauge_refresher()

    def record(self, value: float, tags: dict[str, str]) -> None:
        try:
            if self.kind == "counter":
                if value > 0:  # Ray refuses a zero increment; it would change nothing anyway
                    self.metric.inc(value, tags=dict(tags))
            elif self.kind == "gauge":
                self.last[tuple(sorted(tags.items()))] = value
                self.metric.set(value, tags=dict(tags))
            else:
                self.metric.observe(value, tags=dict(tags))
        except Exception:  # noqa: BLE001 - a metric must never fail the request it counts
            log.debug("could not record %s", self.metric._name, exc_info=True)

    def refresh(self) -> None:
        for tags, value in list(self.last.items()):
            with contextlib.suppress(Exception):
                self.metric.set(value, tags=dict(tags))


_GAUGES: list[_RaySink] = []
_refresher: threading.Thread | None = None


def _start_gauge_refresher() -> None:
    global _refresher
    if _refresher is not None:
        return

    def loop() -> None:
        while True:
            time.sleep(GAUGE_REFRESH_S)
            for sink in list(_GAUGES):
                sink.refresh()

    _refresher = threading.Thread(target=loop, name="tierserve-gauge-refresh", daemon=True)
    _refresher.start()


def replica_id() -> str | None:
    """This replica's id, or None outside a Serve replica (the driver, unit tests)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return None


def ray_exporter(kind: Kind, name: str, doc: str, labelnames: tuple[str, ...], buckets: Sequence[float]) -> Sink | None:
    """A Ray Serve metric for one family; None outside a replica, where Serve has no tags to add
    (the family asks again on its next record)."""
    if replica_id() is None:
        return None
    if kind == "counter":
        return _RaySink(serve_metrics.Counter(name, doc, tag_keys=labelnames), kind)
    if kind == "gauge":
        return _RaySink(serve_metrics.Gauge(name, doc, tag_keys=labelnames), kind)
    return _RaySink(serve_metrics.Histogram(name, doc, boundaries=list(buckets), tag_keys=labelnames), kind)


def install() -> None:
    """Every tierserve family exports through Ray in replica processes (a no-op elsewhere)."""
    cache_metrics.export_through(ray_exporter)


# On import: every deployment that counts anything imports this module, so no constructor has to
# remember to call it.
install()


# ----------------------------------------------------------------------- the debug page
def replica_exposition() -> tuple[str, bytes]:
    """(replica id, this process's prometheus-client page): what `metrics_text` answers."""
    return replica_id() or "local", generate_latest()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(sample: Sample) -> str:
    labels = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(sample.labels.items()))
    value = sample.value
    text = repr(float(value)) if not float(value).is_integer() else f"{float(value):.1f}"
    if value == float("inf"):
        text = "+Inf"
    return f"{sample.name}{{{labels}}} {text}" if labels else f"{sample.name} {text}"


def merge_expositions(parts: dict[str, tuple[str, bytes]]) -> str:
    """Merge text expositions keyed by deployment name, each with the replica that made it, into
    one valid page: `deployment` and `replica` labels keep every process's counters its own series."""
    families: dict[str, tuple[str, str, list[Sample]]] = {}
    for deployment, (replica, blob) in parts.items():
        for fam in text_string_to_metric_families(blob.decode("utf-8")):
            if fam.name.startswith(("python_", "process_")) and deployment != "Ingress":
                continue  # per-process runtime noise: the ingress's own is enough
            _, _, samples = families.setdefault(fam.name, (fam.type, fam.documentation, []))
            for s in fam.samples:
                samples.append(s._replace(labels={**s.labels, "deployment": deployment, "replica": replica}))
    lines: list[str] = []
    for name, (kind, doc, samples) in families.items():
        # The parser strips `_total` from counter family names; the 0.0.4 text format wants it back.
        shown = f"{name}_total" if kind == "counter" else name
        lines.append(f"# HELP {shown} {doc}")
        lines.append(f"# TYPE {shown} {kind}")
        lines.extend(_fmt(s) for s in samples if not s.name.endswith("_created"))
    return "\n".join(lines) + "\n"
