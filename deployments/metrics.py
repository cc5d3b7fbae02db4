"""Request metrics of the ingress and one `/metrics` page for the whole application.

Each replica is its own process with its own prometheus-client registry (the tiers count in the
Recommender, vLLM counts in the LLM replica). The ingress asks every deployment for its text
exposition and merges the families, adding a `deployment` label so that identical metric names
from different processes stay distinct series and the page stays valid Prometheus text.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

REQUESTS = Counter(
    "tierserve_requests_total", "HTTP requests by route, cache layer that answered and status",
    ["route", "cache", "status"],
)
LATENCY = Histogram(
    "tierserve_request_seconds", "End-to-end request latency by route and answering cache layer",
    ["route", "cache"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CACHE_LOOKUPS = Counter(
    "tierserve_cache_lookups_total", "Cache lookups by layer, tenant and outcome",
    ["layer", "tenant", "outcome"],
)


def observe(route: str, cache: str, status: int, started: float) -> None:
    """Count one answered request and its latency since ``started`` (``time.perf_counter()``)."""
    REQUESTS.labels(route, cache, str(status)).inc()
    LATENCY.labels(route, cache).observe(time.perf_counter() - started)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(sample: Sample) -> str:
    labels = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(sample.labels.items()))
    value = sample.value
    text = repr(float(value)) if not float(value).is_integer() else f"{float(value):.1f}"
    if value == float("inf"):
        text = "+Inf"
    return f"{sample.name}{{{labels}}} {text}" if labels else f"{sample.name} {text}"


def merge_expositions(parts: dict[str, bytes]) -> str:
    """Merge text expositions keyed by deployment name into one valid page."""
    families: dict[str, tuple[str, str, list[Sample]]] = {}
    for deployment, blob in parts.items():
        for fam in text_string_to_metric_families(blob.decode("utf-8")):
            if fam.name.startswith(("python_", "process_")) and deployment != "Ingress":
                continue  # per-process runtime noise: the ingress's own is enough
            _, _, samples = families.setdefault(fam.name, (fam.type, fam.documentation, []))
            for s in fam.samples:
                samples.append(s._replace(labels={**s.labels, "deployment": deployment}))
    lines: list[str] = []
    for name, (kind, doc, samples) in families.items():
        # The parser strips `_total` from counter family names; the 0.0.4 text format wants it back.
        shown = f"{name}_total" if kind == "counter" else name
        lines.append(f"# HELP {shown} {doc}")
        lines.append(f"# TYPE {shown} {kind}")
        lines.extend(_fmt(s) for s in samples if not s.name.endswith("_created"))
    return "\n".join(lines) + "\n"


def local_exposition() -> bytes:
    return generate_latest()
