"""Every manifest in k8s/ is one an API server would accept as it is, and wired the way the app needs.

* RayService / RayCluster: validated against KubeRay's own CRD schemas (../shared/schemas, or
  $TIERSERVE_SHARED_SCHEMAS), the `openAPIV3Schema` of the served version named by apiVersion.
  Objects in a CRD schema are made closed (unknown fields rejected) the way `kubectl apply`'s
  default strict field validation treats them, so a misspelt field fails here, not on the cluster.
* Built-in kinds: `kubernetes-validate` (bundled, offline JSON schemas of the Kubernetes API, strict
  mode), against the oldest and newest Kubernetes versions we claim.
* Each check is shown to fail on a deliberately broken copy.
"""

from __future__ import annotations

import copy
import os
import re
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S = REPO_ROOT / "k8s"
GPU_CONFIG = REPO_ROOT / "configs" / "gpu.yaml"
SCHEMAS = Path(os.environ.get("TIERSERVE_SHARED_SCHEMAS") or REPO_ROOT.parent / "shared" / "schemas")
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
# prometheus-operator's kinds: their CRD schemas are not in ../shared/schemas.
HAND_CHECKED = frozenset({"PodMonitor"})
KUBERNETES_VERSIONS = ("1.30", "1.37")
SECRET_NAME = "tierserve-secrets"
GPU = "nvidia.com/gpu"

kubernetes_validate = pytest.importorskip("kubernetes_validate")


# ----------------------------------------------------------------------------- loading
def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def manifest_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for name in kustomization()["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc:
                docs.append((name, doc))
    return docs


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifest_docs() if doc["kind"] == kind]


def rayservice() -> dict[str, Any]:
    (svc,) = of_kind("RayService")
    return svc


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, pod spec) of every pod template in a manifest."""
    kind = doc["kind"]
    if kind in ("RayService", "RayCluster"):
        cluster = doc["spec"]["rayClusterConfig"] if kind == "RayService" else doc["spec"]
        yield "head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield group["groupName"], group["template"]["spec"]
    elif kind in ("StatefulSet", "Deployment", "Job", "DaemonSet"):
        yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


# ------------------------------------------------------------------------- validators
def _close_objects(schema: Any) -> Any:
    """A copy of a CRD schema in which objects with listed properties reject unknown fields.

    The API server prunes or (with strict field validation, kubectl's default) rejects fields a
    structural schema does not list, unless x-kubernetes-preserve-unknown-fields is set; plain
    JSON Schema would let them through silently.
    """
    if isinstance(schema, list):
        return [_close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _close_objects(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    path = SCHEMAS / CRD_FILES[kind]
    if not path.exists():
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS}; set TIERSERVE_SHARED_SCHEMAS")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group, f"{path.name} is for {crd['spec']['group']}, not {group}"
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in served, f"{kind} {version} is not served by the CRD (served: {sorted(served)})"
    schema = _close_objects(served[version]["schema"]["openAPIV3Schema"])
    # metadata is validated by the API server itself, not by the CRD schema.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    validator = crd_validator(doc["kind"], doc["apiVersion"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def builtin_errors(doc: dict[str, Any], version: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'/'.join(map(str, exc.path))}: {exc.message}"]
    return []


def pod_template(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """A pod template as a v1 PodTemplate object, so Kubernetes' own schema checks it too."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": {"spec": spec}}


# ------------------------------------------------------------------------------ tests
def test_kustomization_lists_every_manifest() -> None:
    listed = set(kustomization()["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present, f"listed but missing: {listed - present}; present but unlisted: {present - listed}"


def test_every_document_is_validated_somewhere() -> None:
    kinds = {doc["kind"] for _, doc in manifest_docs()}
    assert "RayService" in kinds
    for _, doc in manifest_docs():
        assert doc.get("apiVersion") and doc.get("metadata", {}).get("name"), doc


def kuberay_objects(kind: str) -> list[dict[str, Any]]:
    docs = of_kind(kind)
    if kind == "RayCluster":
        # The operator creates a RayCluster whose spec is the RayService's rayClusterConfig.
        docs += [
            {"apiVersion": svc["apiVersion"], "kind": "RayCluster", "metadata": {"name": svc["metadata"]["name"]},
             "spec": svc["spec"]["rayClusterConfig"]}
            for svc in of_kind("RayService")
        ]
    return docs


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_kuberay_objects_match_the_crd(kind: str) -> None:
    docs = kuberay_objects(kind)
    assert docs
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1"
        errors = crd_errors(doc)
        assert not errors, "\n".join(errors)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_kinds_are_valid(version: str) -> None:
    checked = 0
    for name, doc in manifest_docs():
        if doc["kind"] in HAND_CHECKED:
            continue  # no schema on hand: its shape is checked in tests/unit/test_k8s_monitoring.py
        if doc["kind"] in CRD_FILES:
            # The pod templates inside also get Kubernetes' own (stricter, typed) schema.
            for group, spec in pod_specs(doc):
                errors = builtin_errors(pod_template(spec, f"{doc['metadata']['name']}-{group}"), version)
                assert not errors, f"{name} {group}: {errors}"
            continue
        errors = builtin_errors(doc, version)
        assert not errors, f"{name} {doc['kind']}/{doc['metadata']['name']}: {errors}"
        checked += 1
    # ConfigMaps, Services, StatefulSets, Jobs, PVC, PDBs, NetworkPolicies, Ingress
    assert checked >= 17, checked


def test_broken_copies_are_rejected() -> None:
    svc = rayservice()
    typo = copy.deepcopy(svc)
    typo["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "0"}
    assert crd_errors(typo), "an unknown field must fail CRD validation"
    wrong_type = copy.deepcopy(svc)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "one"
    assert crd_errors(wrong_type), "a string replica count must fail CRD validation"
    no_image = copy.deepcopy(svc)
    no_image["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagee"] = "x"
    assert crd_errors(no_image), "an unknown container field must fail CRD validation"

    (redis_sts, *_) = of_kind("StatefulSet")
    bad = copy.deepcopy(redis_sts)
    bad["spec"]["replica"] = 1
    assert builtin_errors(bad, KUBERNETES_VERSIONS[-1]), "an unknown StatefulSet field must fail"
    bad = copy.deepcopy(redis_sts)
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "6379"
    assert builtin_errors(bad, KUBERNETES_VERSIONS[-1]), "a string port must fail"
    bad_pod = pod_template({"containers": [{"name": "x", "image": "y", "resources": {"limit": {}}}]}, "x")
    assert builtin_errors(bad_pod, KUBERNETES_VERSIONS[-1])


def _serve_config_matches(svc: dict[str, Any], config: dict[str, Any]) -> bool:
    return yaml.safe_load(svc["spec"]["serveConfigV2"]) == config


def test_serve_config_v2_is_configs_gpu_yaml() -> None:
    svc = rayservice()
    config = yaml.safe_load(GPU_CONFIG.read_text())
    assert _serve_config_matches(svc, config), "k8s/rayservice.yaml serveConfigV2 differs from configs/gpu.yaml"
    drifted = copy.deepcopy(config)
    drifted["applications"][0]["deployments"][0]["max_ongoing_requests"] += 1
    assert not _serve_config_matches(svc, drifted)


def test_head_takes_no_replicas_and_gpu_group_asks_for_gpus() -> None:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    import ray

    assert cluster["rayVersion"] == ray.__version__
    config = yaml.safe_load(GPU_CONFIG.read_text())
    llm = next(d for d in config["applications"][0]["deployments"] if d["name"] == "LLM")
    gpu_groups = []
    for group in cluster["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            res = c.get("resources", {})
            if GPU in res.get("limits", {}) or GPU in res.get("requests", {}):
                # Kubernetes requires extended resources to be set in limits, equal to requests.
                assert res["requests"][GPU] == res["limits"][GPU], group["groupName"]
                assert int(res["limits"][GPU]) >= llm["ray_actor_options"]["num_gpus"]
                gpu_groups.append(group["groupName"])
    assert gpu_groups, "no worker group requests nvidia.com/gpu"


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_every_feast_redis_connection_is_bounded_under_the_event_lock() -> None:
    """A Feast Redis without socket_timeout holds a stalled push for good, past the event lock:
    another replica's update of the same user is then overwritten (feature_store/events.py)."""
    from deployments.recommender_events import EVENT_LOCK_TIMEOUT_S
    from feature_store.events import FEAST_REDIS_ENV, unbounded_feast_redis

    seen = 0
    for _, doc in manifest_docs():
        for group, spec in pod_specs(doc):
            for container in containers(spec):
                value = _env(container).get(FEAST_REDIS_ENV, {}).get("value")
                if value is None or "materialize" in container["name"]:  # the batch job: its own bound
                    continue
                seen += 1
                assert unbounded_feast_redis(value, bound_s=EVENT_LOCK_TIMEOUT_S) is None, (group, value)
    assert seen >= 3  # head and both worker groups


def test_every_ray_pod_has_the_app_env_and_a_local_state_volume() -> None:
    for group, spec in pod_specs(rayservice()):
        main = spec["containers"][0]
        env = _env(main)
        for name in ("REDIS_URL", "TIERSERVE_FEAST_REPO", "TIERSERVE_STATE_DIR", "FEAST_REDIS_CONNECTION_STRING"):
            assert name in env, f"{group}: {name} missing"
        if group == "head":
            continue
        mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        state = mounts.get(env["TIERSERVE_STATE_DIR"]["value"])
        assert state, f"{group}: nothing mounted at TIERSERVE_STATE_DIR"
        # Node-local: an emptyDir on disk (not tmpfs: that is RAM) or a generic ephemeral volume.
        vol = volumes[state]
        assert ("emptyDir" in vol and vol["emptyDir"].get("medium") != "Memory") or "ephemeral" in vol
        assert env["TIERSERVE_FEAST_REPO"]["value"] in mounts


def test_secrets_only_by_reference() -> None:
    assert not of_kind("Secret"), "Secrets must not be committed; reference them with secretKeyRef"
    sensitive = re.compile(r"PASSWORD|TOKEN|API_KEY|SECRET|AUTH", re.I)
    seen_refs = 0
    for _, doc in manifest_docs():
        for group, spec in pod_specs(doc):
            for c in containers(spec):
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["name"] == SECRET_NAME, f"{group}/{c['name']}: {e['name']}"
                        seen_refs += 1
                    elif sensitive.search(e["name"]):
                        pytest.fail(f"{group}/{c['name']}: {e['name']} has a literal value")
                    elif "value" in e and "@" in e["value"]:
                        # A URL with credentials must take them from another variable.
                        assert "$(" in e["value"], f"{group}/{c['name']}: {e['name']} embeds credentials"
    assert seen_refs


def test_cache_redis_is_not_persisted_and_services_select_their_pods() -> None:
    services = {s["metadata"]["name"]: s for s in of_kind("Service")}
    for sts in of_kind("StatefulSet"):
        name = sts["metadata"]["name"]
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
        svc = services[sts["spec"]["serviceName"]]
        assert svc["spec"]["selector"].items() <= labels.items(), name
    cache_sts = next(s for s in of_kind("StatefulSet") if s["metadata"]["name"] == "tierserve-redis")
    conf = redis_conf(cache_sts)
    assert conf["save"] == '""' and conf["appendonly"] == "no"
    assert "volumeClaimTemplates" not in cache_sts["spec"]
    # The app's REDIS_URL points at the cache Redis Service.
    env = _env(rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert "@tierserve-redis:6379" in env["REDIS_URL"]["value"]


def test_feast_config_map_is_the_redis_feature_store_yaml() -> None:
    (cm,) = [c for c in of_kind("ConfigMap") if "feature_store.yaml" in c.get("data", {})]
    in_cluster = yaml.safe_load(cm["data"]["feature_store.yaml"])
    assert in_cluster["online_store"]["type"] == "redis"
    assert in_cluster == yaml.safe_load((REPO_ROOT / "feature_store" / "feature_store_redis.yaml").read_text())
    referenced = {
        v["configMap"]["name"]
        for _, doc in manifest_docs()
        for _, spec in pod_specs(doc)
        for v in spec.get("volumes", [])
        if "configMap" in v
    }
    assert cm["metadata"]["name"] in referenced


def test_images_are_set_through_kustomize() -> None:
    names = {img["name"] for img in kustomization()["images"]}
    for _, doc in manifest_docs():
        for group, spec in pod_specs(doc):
            for c in containers(spec):
                image_name = c["image"].split(":")[0]
                assert image_name in names, f"{group}/{c['name']}: {c['image']} is not in kustomization images"


# -------------------------------------------------- Redis: config files, memory, passwords
def redis_statefulsets() -> dict[str, dict[str, Any]]:
    return {
        s["metadata"]["name"]: s
        for s in of_kind("StatefulSet")
        if s["spec"]["template"]["spec"]["containers"][0]["image"].startswith("redis")
    }


def redis_config_map() -> dict[str, str]:
    (cm,) = [c for c in of_kind("ConfigMap") if c["metadata"]["name"] == "tierserve-redis-config"]
    return cm["data"]


def redis_conf(sts: dict[str, Any]) -> dict[str, str]:
    """The redis.conf directives one Redis StatefulSet starts with (from the ConfigMap it mounts)."""
    spec = sts["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    argv = container["command"] + container.get("args", [])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_mount = next(name for name, v in volumes.items() if v.get("configMap", {}).get("name") == "tierserve-redis-config")
    conf_path = argv[-1]
    assert conf_path.startswith(mounts[config_mount] + "/"), argv
    text = redis_config_map()[conf_path.rsplit("/", 1)[1]]
    conf: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.strip().partition(" ")
            conf[key] = value
    return conf


def test_every_redis_has_maxmemory_and_the_right_eviction_policy() -> None:
    stses = redis_statefulsets()
    assert set(stses) == {"tierserve-redis", "tierserve-redis-feast", "tierserve-redis-gcs"}
    limits = {"gb": 1 << 30, "mb": 1 << 20}
    for name, sts in stses.items():
        conf = redis_conf(sts)
        maxmemory = conf["maxmemory"]
        assert maxmemory[-2:] in limits, f"{name}: maxmemory {maxmemory}"
        max_bytes = int(maxmemory[:-2]) * limits[maxmemory[-2:]]
        limit = sts["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        assert limit.endswith("Gi")
        # Redis' own overhead and (when persisted) the AOF rewrite's fork need room above maxmemory.
        assert max_bytes <= int(limit[:-2]) * (1 << 30) * 0.8, f"{name}: maxmemory {maxmemory} vs limit {limit}"
        policy = conf["maxmemory-policy"]
        if name == "tierserve-redis":
            # Only keys with a TTL (cache entries) may go; versions, streams and counters stay.
            assert policy.startswith("volatile-"), policy
            assert conf["appendonly"] == "no"
        else:
            # Sources of truth (Feast's online store, Ray's GCS): fail writes, never drop data.
            assert policy == "noeviction", f"{name}: {policy}"
            assert conf["appendonly"] == "yes" and "volumeClaimTemplates" in sts["spec"], name


def test_redis_passwords_are_not_on_any_command_line() -> None:
    start = redis_config_map()["start.sh"]
    assert "requirepass" in start and "unset REDIS_PASSWORD" in start and "exec redis-server" in start
    for name, sts in redis_statefulsets().items():
        spec = sts["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        argv = " ".join(container["command"] + container.get("args", []))
        assert "PASSWORD" not in argv and "requirepass" not in argv, f"{name}: {argv}"
        assert redis_conf(sts)["include"].startswith("/run/redis/"), name
        # The generated auth.conf lives in memory only.
        auth = next(v for v in spec["volumes"] if v["name"] == "auth")
        assert auth["emptyDir"]["medium"] == "Memory"
        assert spec["securityContext"]["runAsNonRoot"] is True
    for _, doc in manifest_docs():
        for group, pod in pod_specs(doc):
            for c in containers(pod):
                argv = " ".join(map(str, c.get("command", []) + c.get("args", [])))
                assert "requirepass" not in argv and "--redis-password" not in argv, f"{group}/{c['name']}"


# ------------------------------------------------------------- Ray: GCS fault tolerance
def test_gcs_fault_tolerance_uses_the_gcs_redis() -> None:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    gcs = cluster["gcsFaultToleranceOptions"]
    host, _, port = gcs["redisAddress"].partition(":")
    services = {s["metadata"]["name"]: s for s in of_kind("Service")}
    assert host in services and int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    assert redis_conf(redis_statefulsets()[host])["maxmemory-policy"] == "noeviction"
    assert gcs["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == SECRET_NAME
    # KubeRay rejects a head that sets these itself when GCS fault tolerance is on.
    head_env = _env(cluster["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert not {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS"} & head_env.keys()
    assert "redis-password" not in cluster["headGroupSpec"]["rayStartParams"]


# --------------------------------------------------------- selectors, PDBs, NetworkPolicies
def ray_pod_labels() -> dict[str, dict[str, str]]:
    """Labels of each Ray pod the operator creates: its template's plus KubeRay's own."""
    cluster = rayservice()["spec"]["rayClusterConfig"]
    labels = {"head": {**cluster["headGroupSpec"]["template"]["metadata"]["labels"],
                       "ray.io/node-type": "head", "ray.io/group": "headgroup", "ray.io/is-ray-node": "yes"}}
    for group in cluster["workerGroupSpecs"]:
        labels[group["groupName"]] = {**group["template"]["metadata"]["labels"], "ray.io/node-type": "worker",
                                      "ray.io/group": group["groupName"], "ray.io/is-ray-node": "yes"}
    return labels


def other_pod_labels() -> dict[str, dict[str, str]]:
    out = {}
    for _, doc in manifest_docs():
        if doc["kind"] in ("StatefulSet", "Job", "Deployment"):
            out[doc["metadata"]["name"]] = doc["spec"]["template"]["metadata"]["labels"]
    return out


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels") and not selector.get("matchExpressions"):
        return True
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def test_selector_matching() -> None:
    assert selects({"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]}, {"a": "1", "b": "x"})
    assert not selects({"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]}, {"a": "1"})
    assert not selects({"matchExpressions": [{"key": "a", "operator": "In", "values": ["2"]}]}, {"a": "1"})


def test_disruption_budgets_cover_each_worker_group_one_pod_at_a_time() -> None:
    pods = ray_pod_labels()
    covered = set()
    for pdb in of_kind("PodDisruptionBudget"):
        matched = {g for g, labels in pods.items() if selects(pdb["spec"]["selector"], labels)}
        assert matched, f"{pdb['metadata']['name']} selects no Ray pod"
        assert not any(selects(pdb["spec"]["selector"], lbl) for lbl in other_pod_labels().values())
        assert pdb["spec"].get("maxUnavailable") == 1
        covered |= matched
    assert covered == set(pods) - {"head"}


def _policies_for(labels: dict[str, str]) -> list[dict[str, Any]]:
    return [p for p in of_kind("NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]


def _from_ray_pods_only(rule: dict[str, Any], extra_ok: tuple[dict[str, str], ...] = ()) -> bool:
    peers = rule.get("from")
    if not peers:
        return False
    for peer in peers:
        if "ipBlock" in peer or "namespaceSelector" in peer:
            return False
        allowed = [lbl for lbl in ray_pod_labels().values() if selects(peer["podSelector"], lbl)]
        allowed += [lbl for lbl in extra_ok if selects(peer["podSelector"], lbl)]
        strangers = [n for n, lbl in other_pod_labels().items() if selects(peer["podSelector"], lbl)
                     and lbl not in extra_ok]
        if not allowed or strangers or peer["podSelector"] == {}:
            return False
    return True


def test_network_policies_expose_only_serve_and_keep_redis_to_ray_pods() -> None:
    for group, labels in ray_pod_labels().items():
        (policy,) = _policies_for(labels)
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            if _from_ray_pods_only(rule):
                continue  # Ray's own node-to-node traffic
            ports = {p["port"] for p in rule.get("ports", [])}
            if not rule.get("from"):
                assert ports == {8000}, f"{group}: open to all on {ports}"
            elif ports == {8080}:
                # Prometheus, from the monitoring namespace, to Ray's metrics export port only.
                (peer,) = rule["from"]
                assert peer == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
            else:
                # Only the KubeRay operator, only to the dashboard ports it polls.
                (peer,) = rule["from"]
                assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
                assert ports <= {8265, 52365}
    materialize = other_pod_labels()["tierserve-feast-materialize"]
    for name, sts in redis_statefulsets().items():
        labels = sts["spec"]["template"]["metadata"]["labels"]
        policies = _policies_for(labels)
        assert policies, f"{name}: no NetworkPolicy, reachable from every pod"
        extra = (materialize,) if name == "tierserve-redis-feast" else ()
        for policy in policies:
            for rule in policy["spec"]["ingress"]:
                assert _from_ray_pods_only(rule, extra), f"{name}: {rule}"
                assert {p["port"] for p in rule["ports"]} == {6379}
        # The materialisation Job reaches Feast's Redis and only that one.
        reachable = any(_from_ray_pods_only(r, ()) is False and any(selects(p["podSelector"], materialize)
                        for p in r["from"]) for pol in policies for r in pol["spec"]["ingress"])
        assert reachable == (name == "tierserve-redis-feast"), name


def test_ingress_terminates_tls_in_front_of_the_serve_service() -> None:
    (ing,) = of_kind("Ingress")
    hosts = {h for rule in ing["spec"]["rules"] for h in [rule["host"]]}
    tls_hosts = {h for t in ing["spec"]["tls"] for h in t["hosts"]}
    assert hosts <= tls_hosts and all(t["secretName"] for t in ing["spec"]["tls"])
    backends = {(p["backend"]["service"]["name"], p["backend"]["service"]["port"]["number"])
                for rule in ing["spec"]["rules"] for p in rule["http"]["paths"]}
    # KubeRay names the RayService's Serve Service <name>-serve-svc.
    assert backends == {(f"{rayservice()['metadata']['name']}-serve-svc", 8000)}


# ------------------------------------------------------------------ GPU pods, model cache
def test_gpu_pods_run_on_gpu_nodes_and_read_the_model_volume() -> None:
    config = yaml.safe_load(GPU_CONFIG.read_text())
    model_path = config["applications"][0]["args"]["llm"]["model"]
    (pvc,) = of_kind("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    (job,) = [j for j in of_kind("Job") if j["metadata"]["name"] == "tierserve-model-download"]
    job_env = _env(job["spec"]["template"]["spec"]["containers"][0])
    assert job_env["MODEL_DIR"]["value"] == model_path
    assert job_env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": "hf-token", "optional": True}
    job_mounts = {m["name"]: m["mountPath"] for m in job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    job_vol = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v.get("persistentVolumeClaim"))
    assert job_vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert model_path.startswith(job_mounts[job_vol["name"]] + "/")
    marker = f"{model_path}/.tierserve-complete"
    assert ".tierserve-complete" in job["spec"]["template"]["spec"]["containers"][0]["args"][0]

    for group in rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        main = spec["containers"][0]
        if GPU not in main["resources"]["limits"]:
            assert "models" not in {v["name"] for v in spec["volumes"]}
            continue
        assert spec["nodeSelector"], f"{group['groupName']}: GPU pods need an accelerator nodeSelector"
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in containers(spec):
            for m in c.get("volumeMounts", []):
                claim = volumes[m["name"]].get("persistentVolumeClaim")
                if claim and claim["claimName"] == pvc["metadata"]["name"]:
                    assert m.get("readOnly") is True and claim.get("readOnly") is True, c["name"]
        mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
        assert any(model_path.startswith(path + "/") and volumes[name].get("persistentVolumeClaim")
                   for path, name in mounts.items()), "the LLM's model path is not on the model volume"
        assert any(marker in " ".join(c.get("command", [])) for c in spec["initContainers"]), "no wait for the model"


class _NoTimestampLoader(yaml.SafeLoader):
    """kustomize unquotes strings such as "1970-01-01T00:00:00"; the API server (like go-yaml into
    a string field) keeps them strings, where PyYAML would make datetimes of them."""


_NoTimestampLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def test_kubectl_kustomize_renders_every_object_and_each_validates() -> None:
    import shutil
    import subprocess

    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not on PATH: the kustomize rendering was not checked")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.load_all(out.stdout, Loader=_NoTimestampLoader) if d]
    assert len(rendered) == len(manifest_docs())
    image = next(i for i in kustomization()["images"] if i["name"] == "tierserve")
    for doc in rendered:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tierserve"
        if doc["kind"] in HAND_CHECKED:
            continue
        if doc["kind"] in CRD_FILES:
            assert not crd_errors(doc)
            continue
        errors = builtin_errors(doc, KUBERNETES_VERSIONS[-1])
        assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: {errors}"
        for _, spec in pod_specs(doc):
            for c in containers(spec):
                if c["image"].startswith(image["newName"]):
                    assert c["image"] == f"{image['newName']}:{image['newTag']}"


def _broken(monkeypatch: pytest.MonkeyPatch, edit: Any) -> None:
    """Make every check above see a copy of the manifests changed by `edit(docs)`."""
    docs = copy.deepcopy(manifest_docs())
    edit(docs)
    monkeypatch.setattr(sys.modules[__name__], "manifest_docs", lambda: docs)


def _doc(docs: list[tuple[str, dict[str, Any]]], kind: str, name: str) -> dict[str, Any]:
    return next(d for _, d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.parametrize(
    ("check", "edit"),
    [
        # Feast's store must never evict.
        (test_every_redis_has_maxmemory_and_the_right_eviction_policy,
         lambda docs: _doc(docs, "ConfigMap", "tierserve-redis-config")["data"].update(
             {"feast.conf": "appendonly yes\nmaxmemory 1536mb\nmaxmemory-policy allkeys-lru\ninclude /run/redis/auth.conf\n"})),
        # A Redis without maxmemory.
        (test_every_redis_has_maxmemory_and_the_right_eviction_policy,
         lambda docs: _doc(docs, "ConfigMap", "tierserve-redis-config")["data"].update(
             {"gcs.conf": "appendonly yes\nmaxmemory-policy noeviction\ninclude /run/redis/auth.conf\n"})),
        # The password back on the command line.
        (test_redis_passwords_are_not_on_any_command_line,
         lambda docs: _doc(docs, "StatefulSet", "tierserve-redis")["spec"]["template"]["spec"]["containers"][0].update(
             {"args": ["--requirepass", "$(REDIS_PASSWORD)"]})),
        # KubeRay refuses a head that sets REDIS_PASSWORD with GCS fault tolerance on.
        (test_gcs_fault_tolerance_uses_the_gcs_redis,
         lambda docs: _doc(docs, "RayService", "tierserve")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
         ["spec"]["containers"][0]["env"].append({"name": "REDIS_PASSWORD", "value": "x"})),
        # Redis open to every pod.
        (test_network_policies_expose_only_serve_and_keep_redis_to_ray_pods,
         lambda docs: _doc(docs, "NetworkPolicy", "tierserve-redis")["spec"]["ingress"].append(
             {"ports": [{"protocol": "TCP", "port": 6379}]})),
        # The dashboard open to all.
        (test_network_policies_expose_only_serve_and_keep_redis_to_ray_pods,
         lambda docs: _doc(docs, "NetworkPolicy", "tierserve-ray")["spec"]["ingress"][1]["ports"].append(
             {"protocol": "TCP", "port": 8265})),
        # The model volume writable from the GPU pods.
        (test_gpu_pods_run_on_gpu_nodes_and_read_the_model_volume,
         lambda docs: [m.pop("readOnly") for m in _doc(docs, "RayService", "tierserve")["spec"]["rayClusterConfig"]
                       ["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMounts"]
                       if m["name"] == "models"]),
        # No accelerator nodeSelector.
        (test_gpu_pods_run_on_gpu_nodes_and_read_the_model_volume,
         lambda docs: _doc(docs, "RayService", "tierserve")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
         ["template"]["spec"].pop("nodeSelector")),
        # A PDB that lets a whole group go at once.
        (test_disruption_budgets_cover_each_worker_group_one_pod_at_a_time,
         lambda docs: _doc(docs, "PodDisruptionBudget", "tierserve-ray-gpu")["spec"].update({"maxUnavailable": "100%"})),
    ],
)
def test_new_checks_reject_broken_copies(check: Any, edit: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _broken(monkeypatch, edit)
    with pytest.raises((AssertionError, KeyError, StopIteration)):
        check()
