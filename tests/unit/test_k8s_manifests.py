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
        if doc["kind"] in CRD_FILES:
            # The pod templates inside also get Kubernetes' own (stricter, typed) schema.
            for group, spec in pod_specs(doc):
                errors = builtin_errors(pod_template(spec, f"{doc['metadata']['name']}-{group}"), version)
                assert not errors, f"{name} {group}: {errors}"
            continue
        errors = builtin_errors(doc, version)
        assert not errors, f"{name} {doc['kind']}/{doc['metadata']['name']}: {errors}"
        checked += 1
    assert checked >= 4  # ConfigMap, 2 Services, 2 StatefulSets, Job


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
    args = cache_sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
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
