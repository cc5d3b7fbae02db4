"""Small helpers shared by test modules (no fixtures: those live in conftest.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from caches.chat import ChatIdentity, EncoderIdentity, ModelIdentity, semantic_scope
from caches.features import FeatureCache
from feature_store import names
from feature_store.events import UserActivityWriter
from feature_store.pipeline import RepoInfo

FINGERPRINT = "f" * 64
ENCODER = EncoderIdentity(name="enc", version="1")


def model_identity(name: str = "m", fingerprint: str = FINGERPRINT, temperature: float | None = None) -> ModelIdentity:
    defaults = {} if temperature is None else {"temperature": temperature}
    return ModelIdentity(name=name, fingerprint=fingerprint, default_sampling=defaults)


def identity(request: dict[str, Any], *, tenant: str = "t", model: str = "m", version: str | None = "1",
             **kwargs: Any) -> ChatIdentity:
    return ChatIdentity.build(request, tenant=tenant, model=kwargs.pop("model_identity", model_identity(model)),
                              version=version, encoder=kwargs.pop("encoder", ENCODER), **kwargs)


def chat_key(*, tenant: str, model: str, version: str, request: dict[str, Any]) -> str:
    """The exact key of a (greedy) chat request, as the ingress builds it."""
    key = identity(request, tenant=tenant, model=model, version=version).exact_key
    assert key is not None, "not cacheable: give the request temperature 0"
    return key


def scope(*, tenant: str = "t", model: str = "m", version: str = "1", context: Any = None) -> str:
    """A semantic scope as the ingress builds it, for a given (or empty) context."""
    return semantic_scope(tenant=tenant, model=model_identity(model), version=version, context=context or {},
                          encoder=ENCODER)


def user_cache(repo: RepoInfo, redis_url: str, rocksdb_dir: Path, *, ram_budget: int = 1 << 20,
               **kwargs: Any) -> FeatureCache:
    """The users' FeatureCache as the Recommender opens it, on a test repo, with 8 MiB of SSD
    (`kwargs`: FeatureCache.open's other settings)."""
    return FeatureCache.open(
        redis_url=redis_url, rocksdb_dir=rocksdb_dir, feast_repo=repo.repo_dir, view=names.USER_VIEW,
        entity_key=names.USER_KEY, model_version=repo.model_version, ram_budget_bytes=ram_budget,
        ssd_budget_bytes=8 << 20, **kwargs,
    )


def item_features(writer: UserActivityWriter, item_id: int) -> dict[str, Any]:
    """An item's online features as the Recommender passes them to an event (read through `writer`'s store)."""
    rows = writer._open().get_online_features(
        features=[f"{names.ITEM_VIEW}:{f}" for f in names.ITEM_FEATURES], entity_rows=[{names.ITEM_KEY: item_id}]
    ).to_dict()
    return {f: rows[f][0] for f in names.ITEM_FEATURES}


def wait_app_running(app_name: str, timeout_s: float) -> None:
    """Block until a Serve application is RUNNING; RuntimeError with Serve's reason if it is not
    (usable outside pytest: tests/e2e/two_nodes.py runs as a script)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"{app_name} failed to deploy: {status.message}")
        time.sleep(1)
    raise RuntimeError(f"{app_name} did not become healthy in {timeout_s:.0f}s")
