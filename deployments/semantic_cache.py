"""SemanticCache deployment: one FAISS mirror per replica of the Redis-held semantic cache.

Redis is the source of truth; this replica's index converges from the Redis Stream in a
background thread, so any number of replicas answer the same lookups. Redis down means the
ingress answers with `x-cache: bypass`: this replica reports it instead of raising.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from caches.redis_client import make_client
from caches.result import CacheUnavailable
from caches.semantic import SemanticCache
from deployments import metrics
from deployments.config import CacheSettings

log = logging.getLogger("tierserve.semantic")


def load_threshold(settings: CacheSettings) -> float:
    if settings.semantic_threshold is not None:
        return settings.semantic_threshold
    path = Path(settings.semantic_calibration)
    if not path.exists():
        raise FileNotFoundError(
            f"no semantic threshold: {path} is missing; run `python -m caches.calibrate` "
            "or set cache.semantic_threshold in the Serve config"
        )
    return float(json.loads(path.read_text())["threshold"])


@serve.deployment(name="SemanticCache", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.1})
class SemanticCacheDeployment:
    def __init__(self, redis_url: str, settings: dict[str, Any]) -> None:
        self.settings = CacheSettings.model_validate(settings)
        self.threshold = load_threshold(self.settings)
        client = make_client(redis_url)
        self.cache = SemanticCache(
            client,
            threshold=self.threshold,
            mode=self.settings.semantic_mode,  # type: ignore[arg-type]
            max_entries=self.settings.semantic_max_entries,
            max_bytes=self.settings.semantic_max_bytes,
            tenant_max_entries=self.settings.semantic_tenant_max_entries,
            tenant_max_bytes=self.settings.semantic_tenant_max_bytes,
            mirror_max_entries=self.settings.semantic_mirror_max_entries,
            mirror_max_bytes=self.settings.semantic_mirror_max_bytes,
            ttl_s=self.settings.semantic_ttl_s,
            faiss_gpu=self.settings.semantic_faiss_gpu,
        )
        self.cache.start_background_sync()

    def lookup(self, scope: str, query: str, vector: list[float]) -> dict[str, Any]:
        try:
            hit = self.cache.lookup(scope, query, np.asarray(vector, dtype=np.float32))
        except CacheUnavailable:
            return {"status": "unavailable"}
        if hit is None:
            return {"status": "miss"}
        return {"status": "hit", **hit.model_dump()}

    def store(self, scope: str, query: str, vector: list[float], response: str) -> bool:
        try:
            return self.cache.store(scope, query, np.asarray(vector, dtype=np.float32), response) is not None
        except CacheUnavailable:
            return False

    def purge_model(self, model: str, old_version: str) -> int:
        try:
            return int(self.cache.delete_model_version(model, old_version))
        except CacheUnavailable:
            return 0

    def stats(self) -> dict[str, Any]:
        try:
            return {"threshold": self.threshold, "mode": self.settings.semantic_mode, **self.cache.stats()}
        except CacheUnavailable:
            return {"status": "unavailable"}

    def metrics_text(self) -> tuple[str, bytes]:
        return metrics.replica_exposition()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # best effort at replica shutdown
            self.cache.close()
