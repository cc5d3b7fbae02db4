"""The Serve app, started once for the e2e package on its own port and Ray temp dir.

Package scope, not session: the app is shut down when the last e2e test is done. Its Recommender
watchers sweep the pending-invalidation records of the Redis it shares with the rest of the run,
and its replicas hold gigabytes of a 24 GiB CI machine: neither may outlive the e2e tests.

It is the real application: `build_app` with the args of configs/local.yaml (SmolLM2 on vLLM's
CPU build, the MiniLM encoder, FAISS, the Feast repo built by `make install`), a real Redis.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from caches.redis_server import free_port
from deployments.config import AppSettings
from tests.support import wait_app_running

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_CONFIG = REPO_ROOT / "configs" / "local.yaml"
START_TIMEOUT_S = float(os.environ.get("TIERSERVE_E2E_START_TIMEOUT_S", "600"))
# The session app's admin key (TIERSERVE_ADMIN_KEYS in its replicas' environment): admin routes
# and every tenant's /v1/cache/stats need it.
ADMIN_KEY = "e2e-admin-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def local_config() -> dict:
    return yaml.safe_load(LOCAL_CONFIG.read_text())


def local_app_config() -> dict:
    """configs/local.yaml's main application (the Ingress and the chat deployments)."""
    return local_config()["applications"][0]


def session_handle(deployment: str):  # noqa: ANN201 - a DeploymentHandle (ray is imported lazily here)
    """A handle to one of the session app's deployments, in whichever application holds it (the
    Recommender is in the `recs` application: configs/local.yaml's `recommendations_app`)."""
    from ray import serve

    from deployments.config import AppSettings

    recs_app = AppSettings.model_validate(local_app_config().get("args") or {}).recommendations_app
    app_name = recs_app if deployment == "Recommender" and recs_app else "tierserve"
    return serve.get_deployment_handle(deployment, app_name=app_name)


def wait_running(app_name: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Block until a Serve application is RUNNING; fail the test run with Serve's reason if not."""
    try:
        wait_app_running(app_name, timeout_s)
    except RuntimeError as exc:
        pytest.fail(str(exc))


def deploy_side_ingress(app_name: str, route_prefix: str, settings: AppSettings) -> None:
    """A second Ingress with its own settings, reusing the session app's other deployments: the
    same caches and models, so what it shows holds for the app itself."""
    from ray import serve

    from deployments.ingress import Ingress

    handles = [session_handle(n) for n in ("Encoder", "SemanticCache", "LLM", "Recommender")]
    serve.run(Ingress.bind(settings.model_dump(), *handles), name=app_name, route_prefix=route_prefix, blocking=False)
    wait_running(app_name)


@pytest.fixture(scope="package")
def app_url(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import ray
    from ray import serve


    os.environ["REDIS_URL"] = redis_url
    state_dir = tmp_path_factory.mktemp("state")
    os.environ["TIERSERVE_STATE_DIR"] = str(state_dir)
    # Events write through Feast: the app gets its own copy of the repo, never the built one.
    feast_repo = tmp_path_factory.mktemp("feast") / "feature_store"
    shutil.copytree(REPO_ROOT / "feature_store", feast_repo, ignore=shutil.ignore_patterns("__pycache__"))
    os.environ["TIERSERVE_FEAST_REPO"] = str(feast_repo)
    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="tsray-", dir="/tmp")
    config = local_config()
    app_cfg = config["applications"][0]
    env_vars = {**app_cfg["runtime_env"]["env_vars"], "REDIS_URL": redis_url, "TIERSERVE_STATE_DIR": str(state_dir),
                "TIERSERVE_FEAST_REPO": str(feast_repo), "TIERSERVE_ADMIN_KEYS": ADMIN_KEY}
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=ray_tmp, runtime_env={"env_vars": env_vars},
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    started = time.monotonic()
    # Every application of configs/local.yaml, as `serve run` deploys them: the Ingress's and
    # `recs`, which answers /v1/recommendations itself (deployments/recommender_http.py).
    for spec in config["applications"]:
        module, _, builder = spec["import_path"].partition(":")
        build = getattr(importlib.import_module(module), builder)
        serve.run(build(spec.get("args")), name=spec["name"], route_prefix=spec["route_prefix"], blocking=False)
    url = f"http://127.0.0.1:{port}"
    for spec in config["applications"]:
        wait_running(spec["name"])
    httpx.get(f"{url}/healthz", timeout=30).raise_for_status()
    print(f"\napp started in {time.monotonic() - started:.1f}s on {url}")
    yield url
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="package")
def client(app_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=app_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="package")
def model_name(client: httpx.Client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]
