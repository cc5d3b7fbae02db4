"""A second application for the recommendation tests: its own Ingress and two Recommender replicas
on a copy of the Feast repo and a Redis of the test's choosing (one server, or the cluster), in
the session's Serve instance. The chat deployments are the session app's, passed in as handles."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from deployments.config import REPO_ROOT, AppSettings
from feature_store import names
from feature_store.pipeline import RepoInfo
from tests.e2e.conftest import local_app_config, wait_running

SOURCE_REPO = REPO_ROOT / "feature_store"
START_TIMEOUT_S = 600


def copy_repo(target: Path) -> RepoInfo:
    """A copy of the project's Feast repo: a module's events must not change the session app's rows.
    The registry stores source paths relative to the repo, so a copied folder is a working repo."""
    shutil.copyfile(SOURCE_REPO / "feature_store.yaml", target / "feature_store.yaml")
    shutil.copytree(SOURCE_REPO / names.DATA_DIR, target / names.DATA_DIR,
                    ignore=shutil.ignore_patterns(".build.lock", "*.tmp"))
    return RepoInfo.load(target)


@contextmanager
def serve_recs(app_url: str, *, redis_url: str, repo: RepoInfo, state_dir: Path, name: str,
               prefix: str, event_within_s: float | None = None) -> Iterator[httpx.Client]:
    """The app deployed at `prefix`, a client for it, and the app deleted after."""
    from ray import serve

    from deployments.ingress import Ingress
    from deployments.recommender import RecommenderDeployment

    settings = AppSettings.from_args(local_app_config().get("args"))
    settings.redis_url = redis_url
    settings.state_dir = str(state_dir)
    settings.recommender.feast_repo = str(repo.repo_dir)
    if event_within_s is not None:
        settings.recommender.event_within_s = event_within_s
    handles = [serve.get_deployment_handle(n, app_name="tierserve") for n in ("Encoder", "SemanticCache", "LLM")]
    recommender = RecommenderDeployment.options(num_replicas=2).bind(
        redis_url, settings.state_dir, settings.recommender.model_dump()
    )
    serve.run(Ingress.bind(settings.model_dump(), *handles, recommender), name=name, route_prefix=prefix,
              blocking=False)
    wait_running(name, START_TIMEOUT_S)
    try:
        with httpx.Client(base_url=f"{app_url}{prefix}", timeout=120) as client:
            yield client
    finally:
        serve.delete(name)


def recommend(client: httpx.Client, user: int, k: int) -> dict[str, Any]:
    resp = client.post("/v1/recommendations", json={"user_id": user, "k": k})
    assert resp.status_code == 200, resp.text
    return resp.json()
