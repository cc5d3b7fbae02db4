"""Recommender deployment: features through the tiered cache, candidates from FAISS.

Per request: result cache (user, model version, k, user generation) -> the user's features
through the TieredCache -> FAISS inner-product search over item embeddings -> the candidates'
features in one batched read -> score, drop items already rated, top-k. The item index is built
at start from the feature repo and rebuilt when the model version changes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import redis
from prometheus_client import generate_latest
from ray import serve

from caches.features import FeatureCache
from caches.result import CacheUnavailable, ResultCache
from caches.versions import ModelVersions
from deployments.config import RecommenderSettings
from feature_store import names
from feature_store.pipeline import RepoInfo

log = logging.getLogger("tierserve.recommender")

RECS_MODEL = "recs"
# Score = embedding affinity + small nudges from features the embedding does not see: a well-rated
# item and one in the user's favourite genres rank slightly higher among near-equal candidates.
W_MEAN_RATING = 0.10
W_GENRE = 0.10


class ItemIndex:
    """FAISS inner-product index over the L2-normalised item embeddings of one model version."""

    def __init__(self, item_parquet: Path) -> None:
        import faiss

        frame = pd.read_parquet(item_parquet, columns=[names.ITEM_KEY, "embedding", "popularity"])
        vectors = np.stack(frame["embedding"].to_numpy()).astype(np.float32)
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
        self.index.add_with_ids(vectors, frame[names.ITEM_KEY].to_numpy(dtype=np.int64))
        self.size = len(frame)

    def search(self, vector: np.ndarray, k: int) -> list[int]:
        _, ids = self.index.search(vector.reshape(1, -1).astype(np.float32), min(k, self.size))
        return [int(i) for i in ids[0] if i >= 0]


@serve.deployment(name="Recommender", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.25})
class RecommenderDeployment:
    def __init__(self, redis_url: str, state_dir: str, settings: dict[str, Any]) -> None:
        self.settings = RecommenderSettings.model_validate(settings)
        self.repo = Path(self.settings.feast_repo)
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.redis_url = redis_url
        self.results = ResultCache(self.redis, default_ttl_s=self.settings.result_ttl_s)
        replica = serve.get_replica_context().replica_id.unique_id
        self.rocksdb_root = Path(state_dir) / "rocksdb" / f"recommender-{replica}"
        self.info = RepoInfo.load(self.repo)
        self.versions = ModelVersions(self.redis, {RECS_MODEL: self.info.model_version})
        self._load(self.info)

    def _load(self, info: RepoInfo) -> None:
        self.model_version = info.model_version
        self.index = ItemIndex(info.files["item_features"])
        rated = pd.read_parquet(info.files["rated"])
        self.rated = {int(u): set(map(int, items)) for u, items in zip(rated[names.USER_KEY], rated["item_ids"], strict=True)}
        self.genres = {g: i for i, g in enumerate(info.genres)}
        popular = info.popular_items
        self.popular = [(int(item), 1.0 - rank / max(len(popular), 1)) for rank, item in enumerate(popular)]
        common = dict(redis_url=self.redis_url, feast_repo=self.repo, model_version=info.model_version)
        self.users = FeatureCache.open(
            rocksdb_dir=self.rocksdb_root / "users", view=names.USER_VIEW, entity_key=names.USER_KEY,
            ram_budget_bytes=self.settings.ram_budget_bytes // 4, ssd_budget_bytes=self.settings.ssd_budget_bytes // 4, **common,
        )
        self.items = FeatureCache.open(
            rocksdb_dir=self.rocksdb_root / "items", view=names.ITEM_VIEW, entity_key=names.ITEM_KEY,
            ram_budget_bytes=self.settings.ram_budget_bytes, ssd_budget_bytes=self.settings.ssd_budget_bytes, **common,
        )

    # ---------------------------------------------------------------- keys
    def _generation(self, user_id: int) -> int:
        """Bumped by every event of the user: older cached results become unreachable at once."""
        return int(self.redis.get(f"tierserve:recs:gen:{user_id}") or 0)

    def _seen(self, user_id: int) -> set[int]:
        seen = set(self.rated.get(user_id, ()))
        with contextlib.suppress(redis.RedisError):
            seen |= {int(x) for x in self.redis.smembers(f"tierserve:recs:rated:{user_id}")}
        return seen

    # ----------------------------------------------------------- recommend
    def recommend(self, user_id: int, k: int, tenant: str) -> dict[str, Any]:
        key = None
        try:
            payload = {"user": user_id, "k": k, "gen": self._generation(user_id)}
            key = self.results.key(tenant=tenant, model=RECS_MODEL, version=self.model_version, payload=payload)
            hit = self.results.get(key)
            if hit is not None:
                return {**json.loads(hit), "cached": True}
        except (CacheUnavailable, redis.RedisError):
            key = None
        answer = self._compute(user_id, k)
        if key is not None and answer.get("status", 200) == 200 and not answer["degraded"]:
            with contextlib.suppress(CacheUnavailable):
                self.results.put(key, json.dumps(answer).encode())
        return answer

    def _compute(self, user_id: int, k: int) -> dict[str, Any]:
        user = self.users.get([user_id])
        base = {"user_id": user_id, "model_version": self.model_version, "cached": False}
        if user_id not in user.features:
            if user.degraded:
                return {"status": 503, "message": "the feature store is unreachable and this user's features are not cached; retry shortly"}
            seen = self._seen(user_id)
            items = [{"item_id": i, "score": round(s, 6)} for i, s in self.popular if i not in seen][:k]
            return {**base, "items": items, "cold_start": True, "degraded": False}

        feats = user.features[user_id]
        u_emb = np.asarray(feats["embedding"], dtype=np.float32)
        affinity = np.asarray(feats.get("genre_affinity") or [], dtype=np.float32)
        seen = self._seen(user_id)
        candidates = [i for i in self.index.search(u_emb, self.settings.candidates + len(seen)) if i not in seen]
        batch = self.items.get(candidates)
        scored = []
        for item_id in candidates:
            f = batch.features.get(item_id)
            if f is None:
                continue  # a candidate no tier could answer is skipped, never scored on empty features
            score = float(np.dot(u_emb, np.asarray(f["embedding"], dtype=np.float32)))
            score += W_MEAN_RATING * (float(f.get("mean_rating") or 0.0) - 3.0) / 2.0
            if affinity.size:
                idx = [self.genres[g] for g in f.get("genres") or [] if g in self.genres]
                if idx:
                    score += W_GENRE * float(affinity[idx].mean())
            scored.append((score, item_id))
        scored.sort(reverse=True)
        if not scored and (batch.degraded or user.degraded):
            return {"status": 503, "message": "the feature store is unreachable and no candidate features are cached; retry shortly"}
        items = [{"item_id": i, "score": round(s, 6)} for s, i in scored[:k]]
        return {**base, "items": items, "cold_start": False, "degraded": bool(batch.degraded or user.degraded)}

    # -------------------------------------------------------------- events
    def record_event(self, event: dict[str, Any]) -> dict[str, Any]:
        user_id, item_id = int(event["user_id"]), int(event["item_id"])
        try:
            pipe = self.redis.pipeline()
            if event["type"] == "rating":
                pipe.sadd(f"tierserve:recs:rated:{user_id}", item_id)
            pipe.incr(f"tierserve:recs:gen:{user_id}")
            pipe.execute()
        except redis.RedisError:
            return {"status": 503, "message": "Redis is unreachable: the event was not recorded, retry it"}
        self.users.invalidate([user_id])
        return {"status": 202, "accepted": True, "user_id": user_id, "invalidated": ["results", "user_features"]}

    def reload(self, version: str | None = None) -> str:
        self.info = RepoInfo.load(self.repo)
        self.users.close()
        self.items.close()
        self._load(self.info)
        if version:
            self.model_version = version
        return self.model_version

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model_version": self.model_version, "items_indexed": self.index.size}
        for name, cache in (("user_features", self.users), ("item_features", self.items)):
            stats = getattr(cache, "stats", None)
            out[name] = stats() if callable(stats) else {}
        return out

    def metrics_text(self) -> bytes:
        return generate_latest()
