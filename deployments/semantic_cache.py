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
from caches.semantic.judge import EmbeddingJudge
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
            mode=self.settings.semantic_mode,
            error_budget=self.settings.semantic_error_budget,
            explore_rate=self.settings.semantic_explore_rate,
            judge=EmbeddingJudge() if self.settings.semantic_judge_threshold is None
            else EmbeddingJudge(threshold=self.settings.semantic_judge_threshold),
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
        """``{"status": "hit", ...the hit}``, ``{"status": "verify", ...the candidate}`` (ask the
        model, answer with its answer, store it: the store judges it against the candidate),
        ``miss`` or ``unavailable``."""
        try:
            found = self.cache.find(scope, query, np.asarray(vector, dtype=np.float32))
        except CacheUnavailable:
            return {"status": "unavailable"}
        if found.hit is None:
            return {"status": "miss"}
        return {"status": found.status, **found.hit.model_dump()}

    def store(self, scope: str, query: str, vector: list[float], response: str,
              answer_vector: list[float] | None = None) -> bool:
        """Store the model's answer with its embedding; judging it against what this query's lookup
        proposed is the verified mode's learning step."""
        answer = np.asarray(answer_vector, dtype=np.float32) if answer_vector is not None else None
        before = dict(self.cache.counters)
        try:
            stored = self.cache.store(scope, query, np.asarray(vector, dtype=np.float32), response,
                                      answer_vector=answer) is not None
        except CacheUnavailable:
            return False
        for verdict in ("verified_equivalent", "verified_different"):
            if self.cache.counters[verdict] > before[verdict]:
                metrics.verification(verdict.removeprefix("verified_"))
        return stored

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
