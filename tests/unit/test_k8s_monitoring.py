"""The PodMonitor in k8s/monitoring.yaml scrapes Ray's metrics port on every Ray pod, and the
network policy lets Prometheus in.

prometheus-operator's CRD schema is not among ../shared/schemas, so the PodMonitor's shape is
checked by hand against the fields of monitoring.coreos.com/v1 that it uses; a broken copy shows
each check fails.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.unit.test_k8s_manifests import (
    containers,
    manifest_docs,
    of_kind,
    other_pod_labels,
    pod_specs,
    ray_pod_labels,
    rayservice,
    selects,
)

METRICS_PORT = 8080
# monitoring.coreos.com/v1 PodMonitor: the spec fields and endpoint fields this repo may use.
SPEC_FIELDS = {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels", "sampleLimit"}
ENDPOINT_FIELDS = {"port", "portNumber", "path", "interval", "scrapeTimeout", "scheme", "relabelings",
                   "metricRelabelings", "honorLabels"}
RELABEL_FIELDS = {"sourceLabels", "targetLabel", "regex", "replacement", "action", "separator", "modulus"}


def pod_monitor() -> dict[str, Any]:
    (mon,) = of_kind("PodMonitor")
    return mon


def shape_errors(mon: dict[str, Any]) -> list[str]:
    errors = []
    if mon.get("apiVersion") != "monitoring.coreos.com/v1":
        errors.append(f"apiVersion {mon.get('apiVersion')}")
    if not mon.get("metadata", {}).get("name"):
        errors.append("no metadata.name")
    spec = mon.get("spec", {})
    errors += [f"unknown spec field {k}" for k in set(spec) - SPEC_FIELDS]
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not (selector.get("matchLabels") or selector.get("matchExpressions")):
        errors.append("spec.selector must select pods")
    endpoints = spec.get("podMetricsEndpoints")
    if not isinstance(endpoints, list) or not endpoints:
        errors.append("spec.podMetricsEndpoints must be a non-empty list")
        endpoints = []
    for i, ep in enumerate(endpoints):
        errors += [f"endpoint {i}: unknown field {k}" for k in set(ep) - ENDPOINT_FIELDS]
        if not isinstance(ep.get("port"), str):
            errors.append(f"endpoint {i}: port must be a container port's name")
        if "interval" in ep and not str(ep["interval"]).rstrip("smh").isdigit():
            errors.append(f"endpoint {i}: interval {ep['interval']!r} is no duration")
        for r in ep.get("relabelings", []):
            errors += [f"endpoint {i}: unknown relabeling field {k}" for k in set(r) - RELABEL_FIELDS]
    return errors


def test_pod_monitor_is_listed_and_well_formed() -> None:
    assert any(name == "monitoring.yaml" for name, _ in manifest_docs())
    assert shape_errors(pod_monitor()) == []


def test_pod_monitor_scrapes_ray_metrics_port_of_every_ray_pod() -> None:
    mon = pod_monitor()
    ports = {ep["port"] for ep in mon["spec"]["podMetricsEndpoints"]}
    assert ports == {"metrics"}
    cluster = rayservice()["spec"]["rayClusterConfig"]
    labels = ray_pod_labels()
    for group, spec in pod_specs(rayservice()):
        assert selects(mon["spec"]["selector"], labels["head" if group == "head" else group]), group
        named = {p.get("name"): p["containerPort"] for c in containers(spec) for p in c.get("ports", [])}
        assert named.get("metrics") == METRICS_PORT, (group, named)
    params = [cluster["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in cluster["workerGroupSpecs"]]
    assert all(p.get("metrics-export-port") == str(METRICS_PORT) for p in params), params
    # Not the Redis pods or the Feast Job: only Ray's agent serves these series.
    for name, other in other_pod_labels().items():
        assert not selects(mon["spec"]["selector"], other), name


def test_network_policy_lets_the_monitoring_namespace_reach_the_metrics_port() -> None:
    (policy,) = [p for p in of_kind("NetworkPolicy") if p["metadata"]["name"] == "tierserve-ray"]
    rules = [r for r in policy["spec"]["ingress"]
             if any(p.get("port") == METRICS_PORT for p in r.get("ports", []))]
    assert rules, "no rule opens the metrics port"
    for rule in rules:
        for peer in rule["from"]:
            assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}, peer


@pytest.mark.parametrize(("path", "value"), [
    (("apiVersion",), "monitoring.coreos.com/v1beta1"),
    (("spec", "podMetricEndpoints"), []),
    (("spec", "podMetricsEndpoints"), []),
    (("spec", "selector"), {}),
])
def test_broken_pod_monitors_are_rejected(path: tuple[str, ...], value: Any) -> None:
    broken = copy.deepcopy(pod_monitor())
    target = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert shape_errors(broken)


def test_endpoint_typos_are_rejected() -> None:
    broken = copy.deepcopy(pod_monitor())
    broken["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    broken["spec"]["podMetricsEndpoints"][0]["port"] = 8080
    errors = shape_errors(broken)
    assert any("intervall" in e for e in errors) and any("port" in e for e in errors)
