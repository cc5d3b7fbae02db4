"""The Grafana dashboard plots only metrics that the running app really exports.

Metric names are parsed out of every PromQL expression (panel targets and the `label_values`
queries of template variables) and looked up where Prometheus scrapes them: every Ray node's
metrics export port, where each replica's series carry `deployment` and `replica` (Ray names
them `ray_...`). A name counts
as exported when the page declares it (`# TYPE`) or has a sample of it; `_bucket`, `_sum` and
`_count` are accepted only on histogram (or summary, for the latter two) families, so a typo such
as `tierserve_requests_total_bucket` is still caught.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.node_metrics import node_metrics_urls, poll

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "tierserve.json"

# Words of PromQL that look like identifiers but are not metrics.
PROMQL_KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
    "offset", "inf", "nan", "atan2", "start", "end",
})
SUFFIXES = {"_bucket": ("histogram",), "_sum": ("histogram", "summary"), "_count": ("histogram", "summary")}
# Counted only when the event happens (an upper tier over budget, a tier down): declared on the
# page from the start, but a short test run cannot be expected to produce samples of them.
EVENT_DRIVEN = frozenset({"ray_tierserve_tier_demotions_total", "ray_tierserve_tier_drops_total",
                          "ray_tierserve_tier_errors_total"})
# Panels aggregate over replicas (and nodes): a bare selector would draw one line per replica.
_AGGREGATED = re.compile(r"\s*(?:histogram_quantile\s*\(\s*[\d.]+\s*,\s*)?(?:sum|max|min|avg)\b")

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[[^\]]*\]\]")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """Metric names used in a PromQL expression: not functions, keywords, labels or durations."""
    text = _GRAFANA_VAR.sub(" ", expr)  # before strings: `${VAR}` holds braces of its own
    text = _STRING.sub('""', text)
    text = _MATCHERS.sub(" ", text)  # label matchers: label names and values are no metrics
    text = _RANGE.sub(" ", text)  # [5m], [1h:1m]
    text = _GROUPING.sub(" ", text)  # label lists of by/without/on/ignoring/group_*
    text = re.sub(r"\boffset\s+-?\w+", " ", text, flags=re.IGNORECASE)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target, nested rows included, and every query variable."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"]
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard.get("panels", []))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        # label_values(metric{...}, label): only the first argument names a metric.
        found = re.match(r"\s*label_values\s*\(\s*([^,)]+)", query)
        yield f"variable {var.get('name')!r}", found.group(1) if found else query


def exported(page: str) -> tuple[dict[str, str], set[str]]:
    """Family types from `# TYPE` lines and the names of all samples on a Prometheus text page."""
    types: dict[str, str] = {}
    samples: set[str] = set()
    for line in page.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                types[parts[2]] = parts[3]
        elif line and not line.startswith("#"):
            samples.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return types, samples


def resolve(name: str, types: dict[str, str], samples: set[str]) -> str | None:
    """The exported name that `name` refers to (itself or its histogram family), or None."""
    if name in types or name in samples:
        return name
    for suffix, kinds in SUFFIXES.items():
        base = name.removesuffix(suffix)
        if base != name and types.get(base) in kinds:
            return name if name in samples else base
    return None


def missing_metrics(dashboard: dict[str, Any], page: str) -> dict[str, set[str]]:
    types, samples = exported(page)
    missing: dict[str, set[str]] = {}
    for where, expr in dashboard_exprs(dashboard):
        absent = {n for n in metric_names(expr) if resolve(n, types, samples) is None}
        if absent:
            missing[where] = absent
    return missing


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


# --------------------------------------------------------------- the checker itself (no app needed)
PAGE = """\
# HELP demo_requests_total Requests
# TYPE demo_requests_total counter
demo_requests_total{route="chat",deployment="Ingress"} 3.0
# TYPE demo_seconds histogram
demo_seconds_bucket{le="0.1"} 1.0
demo_seconds_bucket{le="+Inf"} 2.0
demo_seconds_count 2.0
demo_seconds_sum 0.3
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{deployment="LLM"} 5.0
# TYPE demo_bytes gauge
"""


def _panel(*exprs: str) -> dict[str, Any]:
    return {"panels": [{"title": "p", "targets": [{"refId": chr(65 + i), "expr": e} for i, e in enumerate(exprs)]}]}


def test_metric_names_ignore_functions_keywords_labels_and_variables() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, route) (rate(demo_seconds_bucket{route=~"$route", cache!="x"}'
            '[$__rate_interval] offset 5m))) / ignoring(cache) group_left sum without (instance) '
            '(rate(vllm:prefix_cache_hits_total{job="a{b}"}[5m:1m])) > bool 0 and on(route) demo_bytes')
    assert metric_names(expr) == {"demo_seconds_bucket", "vllm:prefix_cache_hits_total", "demo_bytes"}


def test_checker_accepts_exported_names_and_histogram_suffixes() -> None:
    dash = _panel("sum(rate(demo_requests_total[5m]))", "histogram_quantile(0.5, rate(demo_seconds_bucket[5m]))",
                  "rate(demo_seconds_sum[5m]) / rate(demo_seconds_count[5m])", "demo_bytes",
                  "rate(vllm:prefix_cache_hits_total[1m])")
    assert missing_metrics(dash, PAGE) == {}


def test_checker_reports_made_up_and_misspelt_names() -> None:
    dash = _panel("sum(rate(tierserve_made_up_metric_total[5m]))", "rate(demo_requests_total_bucket[5m])",
                  "rate(vllm:prefix_cache_hits[5m])")
    missing = missing_metrics(dash, PAGE)
    assert set().union(*missing.values()) == {
        "tierserve_made_up_metric_total", "demo_requests_total_bucket", "vllm:prefix_cache_hits",
    }


def test_dashboard_json_is_a_grafana_dashboard() -> None:
    dash = load_dashboard()
    assert dash["schemaVersion"] >= 36 and dash["title"] and dash["uid"]
    ds_vars = [v for v in dash["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert ds_vars and ds_vars[0]["type"] == "datasource" and ds_vars[0]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    exprs = list(dashboard_exprs(dash))
    assert len(exprs) >= 15
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    used = set().union(*(metric_names(e) for _, e in exprs))
    # The figures issue 7 asks the dashboard for.
    for required in ("ray_tierserve_requests_total", "ray_tierserve_request_seconds_bucket",
                     "ray_tierserve_cache_lookups_total", "ray_tierserve_tier_hits_total", "ray_tierserve_tier_misses_total",
                     "ray_tierserve_tier_promotions_total", "ray_tierserve_tier_demotions_total", "ray_tierserve_tier_bytes",
                     "ray_tierserve_tier_read_latency_seconds_bucket", "ray_vllm_prefix_cache_hits_total",
                     "ray_vllm_prefix_cache_queries_total", "ray_vllm_time_to_first_token_seconds_bucket",
                     "ray_vllm_generation_tokens_total"):
        assert required in used, required


def test_every_panel_sums_over_replicas() -> None:
    for where, expr in dashboard_exprs(load_dashboard()):
        if where.startswith("panel"):
            assert _AGGREGATED.match(expr), f"{where}: aggregate over replicas (sum/max by ...): {expr}"


def test_replica_panel_shows_the_spread() -> None:
    exprs = [e for _, e in dashboard_exprs(load_dashboard())]
    assert any("by (deployment, replica)" in e for e in exprs)


# --------------------------------------------------------------------------- against the app
@pytest.fixture(scope="module")
def metrics_page(client: httpx.Client, model_name: str) -> str:
    """Every node's Ray metrics pages after traffic on every path, so that lazily labelled series
    exist. Ray's agent exports on an interval and lets a gauge go when its process stops setting it
    (vLLM sets its gauges on engine steps only), so the pages of several scrapes are kept, until
    every plotted series has shown up."""
    tag = uuid.uuid4().hex[:8]
    # Two questions behind one long shared prefix: the second finds the first's KV blocks in
    # vLLM's prefix cache, so its hit counter has something to count.
    shared = f"({tag}) " + " ".join(f"Fact {i}: planet {i} orbits star {i % 3}." for i in range(40))
    for question in ("Name one planet.", "Name one star."):
        body = {"model": model_name, "temperature": 0, "max_tokens": 8,
                "messages": [{"role": "user", "content": f"{shared}\n{question}"}]}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    body = {"model": model_name, "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": f"Name one planet. ({tag})"}]}
    first = client.post("/v1/chat/completions", json=body)
    assert first.status_code == 200, first.text
    second = client.post("/v1/chat/completions", json=body)
    assert second.status_code == 200 and second.headers["x-cache"] == "exact", second.headers
    # Several users, twice each: cold reads, promotions, then RAM-tier hits and result-cache hits.
    for user in (1, 2, 3, 1, 2, 3):
        resp = client.post("/v1/recommendations", json={"user_id": user, "k": 10})
        assert resp.status_code == 200, resp.text
    urls = node_metrics_urls()
    assert urls, "no Ray node exports metrics"
    wanted = set().union(*(metric_names(e) for _, e in dashboard_exprs(load_dashboard()))) - EVENT_DRIVEN
    pages: list[str] = []

    def seen_all(page: str) -> bool:
        pages.append(page)
        return not wanted - exported("\n".join(pages))[1]

    poll(urls, seen_all, timeout_s=60)
    return "\n".join(pages)


def test_event_driven_series_are_declared_families() -> None:
    # Ray exports a series once it was first recorded: the event-driven ones cannot be looked up
    # on the live page after a short run, so their names are checked against the declarations.
    from caches import metrics as cache_metrics

    declared = {f"ray_{f.name}_total" for f in cache_metrics._FAMILIES if f.kind == "counter"}
    assert declared >= EVENT_DRIVEN


def test_every_dashboard_metric_is_exported(metrics_page: str) -> None:
    missing = {where: names - EVENT_DRIVEN for where, names in missing_metrics(load_dashboard(), metrics_page).items()}
    missing = {where: names for where, names in missing.items() if names}
    assert not missing, f"dashboard metrics absent from the nodes' metrics pages: {missing}"


def test_dashboard_metrics_have_samples_after_traffic(metrics_page: str) -> None:
    # Declared is not enough for a panel to show data: after traffic on every path, each plotted
    # series must have samples (save the event-driven ones).
    _, samples = exported(metrics_page)
    used = set().union(*(metric_names(e) for _, e in dashboard_exprs(load_dashboard())))
    empty = {n for n in used - EVENT_DRIVEN if n not in samples}
    assert not empty, f"plotted metrics without samples after traffic: {sorted(empty)}"


def test_tierserve_series_carry_deployment_and_replica(metrics_page: str) -> None:
    # What makes `sum by (deployment)` over replicas possible.
    for line in metrics_page.splitlines():
        if line.startswith("ray_tierserve_"):
            assert 'deployment="' in line and 'replica="' in line, line
