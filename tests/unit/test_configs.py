"""The Serve configs are ones Ray accepts and whose `args` the app accepts.

Ray's schema lets unknown keys through (pydantic's default), so a misspelt option would be ignored
silently; the checks below also require every key to be a field Ray or AppSettings knows.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import (
    DeploymentSchema,
    RayActorOptionsSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
)

from deployments.config import AppSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {name: REPO_ROOT / "configs" / f"{name}.yaml" for name in ("local", "gpu", "flood")}
APP_DEPLOYMENTS = {"Ingress", "Encoder", "SemanticCache", "LLM", "Recommender"}
IMPORT_PATH = "deployments.app:build_app"
RECS_IMPORT_PATH = "deployments.app:build_recs_app"


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load(CONFIGS[name].read_text())


def deployments_of(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every deployment's options by name, over the config's applications."""
    return {d["name"]: d for app in config["applications"] for d in app.get("deployments", [])}


def unknown_keys(data: dict[str, Any], model: type[BaseModel], where: str) -> list[str]:
    """Keys of `data` (recursively into nested pydantic models) that `model` has no field for."""
    found = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            found.append(f"{where}.{key}")
            continue
        sub = field.annotation
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            found += unknown_keys(value, sub, f"{where}.{key}")
    return found


def strict_serve_errors(config: dict[str, Any]) -> list[str]:
    errors = unknown_keys(config, ServeDeploySchema, "")
    for app in config.get("applications", []):
        errors += unknown_keys({k: v for k, v in app.items() if k != "deployments"}, ServeApplicationSchema, app["name"])
        for dep in app.get("deployments", []):
            where = f"{app['name']}.{dep['name']}"
            errors += unknown_keys(dep, DeploymentSchema, where)
            errors += unknown_keys(dep.get("ray_actor_options", {}), RayActorOptionsSchema, f"{where}.ray_actor_options")
            errors += unknown_keys(dep.get("autoscaling_config", {}), AutoscalingConfig, f"{where}.autoscaling_config")
    return errors


@pytest.fixture(params=sorted(CONFIGS))
def config_name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_ray_accepts_the_config(config_name: str) -> None:
    config = load(config_name)
    schema = ServeDeploySchema.model_validate(config)
    app, recs = schema.applications
    assert app.import_path == IMPORT_PATH
    assert app.route_prefix == "/"
    # The recommendations answered one hop from the proxy, by the application the Ingress names.
    assert recs.import_path == RECS_IMPORT_PATH
    assert recs.route_prefix == "/v1/recommendations"
    assert AppSettings.model_validate(app.args).recommendations_app == recs.name
    # One set of settings for both (a YAML alias): a tenant's key or a limit cannot differ by route.
    assert recs.args == app.args and recs.runtime_env == app.runtime_env
    assert not strict_serve_errors(config), strict_serve_errors(config)


def test_app_accepts_the_args(config_name: str) -> None:
    app = load(config_name)["applications"][0]
    args = app.get("args", {})
    AppSettings.model_validate(args)
    assert not unknown_keys(args, AppSettings, "args"), unknown_keys(args, AppSettings, "args")


def test_deployment_names_exist_in_the_app(config_name: str) -> None:
    app, recs = load(config_name)["applications"]
    names = [d["name"] for d in app["deployments"]]
    assert len(names) == len(set(names))
    assert set(names) <= APP_DEPLOYMENTS - {"Recommender"}, set(names) - APP_DEPLOYMENTS
    assert [d["name"] for d in recs["deployments"]] == ["Recommender"]


def deployment_names_in_code() -> set[str]:
    """`name=` of every `@serve.deployment(...)` in deployments/, read from the source.

    Parsed rather than imported: importing the deployments pulls in vLLM, FAISS and Feast.
    """
    names = set()
    for path in (REPO_ROOT / "deployments").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("serve.deployment", "deployment"):
                names |= {kw.value.value for kw in node.keywords if kw.arg == "name" and isinstance(kw.value, ast.Constant)}
    return names


def test_deployment_names_match_the_code() -> None:
    assert deployment_names_in_code() == APP_DEPLOYMENTS


def test_checks_reject_broken_configs() -> None:
    config = load("gpu")
    typo = copy.deepcopy(config)
    typo["applications"][0]["deployments"][0]["autoscaling_config"]["max_replica"] = 3
    assert strict_serve_errors(typo)
    both = copy.deepcopy(config)
    both["applications"][0]["deployments"][0]["num_replicas"] = 2  # next to autoscaling_config
    with pytest.raises(ValidationError):
        ServeDeploySchema.model_validate(both)
    bad_args = copy.deepcopy(config["applications"][0]["args"])
    bad_args["llm"]["gpu_memory_utilisation"] = 0.9
    assert unknown_keys(bad_args, AppSettings, "args") == ["args.llm.gpu_memory_utilisation"]
    bad_args["llm"]["max_model_len"] = "long"
    with pytest.raises(ValidationError):
        AppSettings.model_validate(bad_args)


def test_local_binds_loopback() -> None:
    http = ServeDeploySchema.model_validate(load("local")).http_options
    assert http.host == "127.0.0.1"


def test_gpu_config_is_a_cluster_config() -> None:
    config = load("gpu")
    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.host == "0.0.0.0"
    app = config["applications"][0]
    deps = deployments_of(config)
    assert deps.keys() == APP_DEPLOYMENTS
    assert deps["LLM"]["ray_actor_options"]["num_gpus"] == 1
    for name in ("Ingress", "Encoder", "LLM", "Recommender"):
        auto = deps[name]["autoscaling_config"]
        assert 1 <= auto["min_replicas"] <= auto["max_replicas"] and auto["target_ongoing_requests"] > 0, name
        # Ray queues at most max_ongoing_requests per replica: the target must be reachable.
        assert auto["target_ongoing_requests"] <= deps[name]["max_ongoing_requests"], name
    settings = AppSettings.model_validate(app["args"])
    assert settings.llm.dtype == "bfloat16" and not settings.llm.enforce_eager
    # The weights come from the model volume (k8s/model-cache.yaml), downloaded once per cluster.
    assert settings.llm.model.startswith("/models/"), settings.llm.model
    # Addresses and secrets come from the environment, never from the file.
    assert settings.redis_url is None and not settings.api_keys
    env_vars = app.get("runtime_env", {}).get("env_vars", {})
    assert not {"REDIS_URL", "TIERSERVE_API_KEYS", "HF_TOKEN"} & env_vars.keys()
    # No pod start reaches the hub: the model is on the volume, the encoder in its wheel.
    assert env_vars.get("HF_HUB_OFFLINE") == "1"


@pytest.mark.slow
def test_gpu_engine_args_parse_with_vllm_and_offload_kv_to_cpu() -> None:
    """configs/gpu.yaml's engine flags are ones vLLM 0.32 knows, KV offload included."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from deployments.llm import engine_cli_args

    app = load("gpu")["applications"][0]
    settings = AppSettings.model_validate(app["args"])
    # The parser deployments/llm.py builds the engine with.
    parser = make_arg_parser(FlexibleArgumentParser())
    ns = parser.parse_args(engine_cli_args(settings.llm))
    assert ns.model == settings.llm.model
    assert ns.kv_offloading_size == 16 and ns.kv_offloading_backend == "native"
    with pytest.raises(SystemExit):
        parser.parse_args([*engine_cli_args(settings.llm), "--kv-offloading-backend", "nope"])


def test_environment_wins_over_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    app = load("gpu")["applications"][0]
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/0")
    monkeypatch.setenv("TIERSERVE_FEAST_REPO", "/feast")
    monkeypatch.setenv("TIERSERVE_STATE_DIR", "/state")
    settings = AppSettings.from_args(app["args"])
    assert (settings.redis, settings.recommender.feast_repo, settings.state_dir) == ("redis://cache:6379/0", "/feast", "/state")


def test_the_key_secret_wins_over_keys_in_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    # a rotated or revoked key must take effect: the documented order is environment first
    monkeypatch.setenv("TIERSERVE_API_KEYS", "new-key=acme")
    settings = AppSettings.from_args({"api_keys": {"revoked-key": "acme"}})
    assert settings.api_keys == {"new-key": "acme"}


def test_auth_off_as_the_docs_write_it_parses() -> None:
    # YAML 1.1 (Serve's config loader) reads a bare `off` as false; the docs tell users to write it
    args = yaml.safe_load("auth: off")
    assert args == {"auth": False}
    assert AppSettings.model_validate(args).auth == "off"
    assert AppSettings.model_validate({"auth": "auto"}).auth == "auto"
    with pytest.raises(ValidationError):
        AppSettings.model_validate({"auth": True})  # "on" is no mode: say which one


def test_tool_calling_is_on_for_the_gpu_model_only() -> None:
    """Qwen2.5-Instruct emits Hermes-style tool calls, which vLLM's `hermes` parser turns into
    OpenAI `tool_calls`; SmolLM2 on CPU has no parser, so its `tools` requests stay a clear 400.
    (tests/integration/test_llm_engine.py checks that vLLM's own argument parser accepts these.)"""
    def llm_args(name: str) -> list[str]:
        app = load(name)["applications"][0]
        return AppSettings.model_validate(app.get("args", {})).llm.extra_engine_args

    gpu = llm_args("gpu")
    assert "--enable-auto-tool-choice" in gpu
    assert gpu[gpu.index("--tool-call-parser") + 1] == "hermes"
    assert "Qwen2.5" in load("gpu")["applications"][0]["args"]["llm"]["model"], "hermes is Qwen2.5's parser"
    assert not {"--enable-auto-tool-choice", "--tool-call-parser"} & set(llm_args("local"))


def test_a_misspelled_setting_or_a_ttl_of_zero_is_refused_with_its_name() -> None:
    """Ignored, a misspelled `event_tenant` left who may send events at its default; a TTL of 0
    is "never expires" to Redis (PX 0 is no TTL), the opposite of what it reads as."""
    with pytest.raises(ValidationError, match="event_tenant"):
        AppSettings.model_validate({"recommender": {"event_tenant": ["acme"]}})
    with pytest.raises(ValidationError, match="semantic_tll_s"):
        AppSettings.model_validate({"cache": {"semantic_tll_s": 60}})
    for section, name in (("cache", "semantic_ttl_s"), ("cache", "result_ttl_s"), ("recommender", "result_ttl_s"),
                          ("recommender", "feature_ttl_s"), ("recommender", "unknown_user_ttl_s")):
        with pytest.raises(ValidationError, match=name):
            AppSettings.model_validate({section: {name: 0}})
    assert AppSettings.model_validate({"cache": {"semantic_ttl_s": 0.5}}).cache.semantic_ttl_s == 0.5
