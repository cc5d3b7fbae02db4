"""Recommender deployment: features through the tiered cache, candidates from FAISS.

Per request: result cache (user, model version, k, user generation) -> the user's features
through the TieredCache -> FAISS inner-product search over item embeddings -> the candidates'
features in one batched read -> score, drop items already rated, top-k. The item index is built
at start from the feature repo and rebuilt when the model version changes.

Events (`record_event`): the user's updated row goes into Feast through its push source
(feature_store/events.py), then the user's feature entries are invalidated on every replica
(TieredCache.invalidate: shared RAM copy now, every replica's SSD copy through the Redis
Stream), then the user's generation counter moves, which makes their cached results unreachable.

Failure: Feast unreachable -> answers from what the tiers hold, `degraded: true`, or a 503 with
a message when they hold nothing usable; Redis unreachable -> no result cache, features from SSD
and Feast (degraded), events refused with a 503 (nothing is written half-way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import redis
from prometheus_client import generate_latest
from ray import serve

from caches.features import FeatureCache
from caches.result import CacheUnavailable, ResultCache
from caches.tiered import TieredCache
from caches.tiers.feast import FeastTier, FeastView
from caches.vector_index import make_ip_index
from caches.versions import ModelVersions
from deployments.config import RecommenderSettings
from feature_store import names
from feature_store.events import Activity, EventRejected, FeatureStoreUnavailable, UserActivityWriter
from feature_store.pipeline import RepoInfo

log = logging.getLogger("tierserve.recommender")

RECS_MODEL = "recs"
# Score = embedding affinity + small nudges from features the embedding does not see: a well-rated
# item and one in the user's favourite genres rank slightly higher among near-equal candidates.
W_MEAN_RATING = 0.10
W_GENRE = 0.10
# Candidates per request: at least this many times k, so a large k still has enough left after
# the filters (and a larger k really asks the feature tiers for more items).
CANDIDATES_PER_K = 4
# Users whose event generation this replica remembers (see _ensure_fresh); bounded, and
# forgetting one only costs that user one extra Feast read.
GENERATIONS_REMEMBERED = 100_000
# Second invalidation of an event's user, after reads that straddled the push have finished:
# such a read fetched the old row before the push and may place it in RAM after the first one.
SECOND_INVALIDATION_S = 2.0
EVENT_LOCK_TIMEOUT_S = 10.0
EVENT_LOCK_WAIT_S = 5.0


class ItemIndex:
    """FAISS inner-product index over the L2-normalised item embeddings of one model version."""

    def __init__(self, item_parquet: Path, use_gpu: bool = False) -> None:
        frame = pd.read_parquet(item_parquet, columns=[names.ITEM_KEY, "embedding", "popularity"])
        vectors = np.stack(frame["embedding"].to_numpy()).astype(np.float32)
        ids = frame[names.ITEM_KEY].to_numpy(dtype=np.int64)
        # On the replica's GPU when the config asks and Ray gave it one; the CPU otherwise.
        self.index = make_ip_index(vectors.shape[1], use_gpu=use_gpu)
        self.index.add_with_ids(vectors, ids)
        self.size = len(frame)
        self.ids = frozenset(int(i) for i in ids)  # the catalogue: events may only name these

    def search(self, vector: np.ndarray, k: int) -> list[int]:
        _, ids = self.index.search(vector.reshape(1, -1).astype(np.float32), min(k, self.size))
        return [int(i) for i in ids[0] if i >= 0]


def _feature_cache(settings: RecommenderSettings, *, redis_url: str, repo: Path, rocksdb_dir: Path, view: str,
                   entity_key: str, model_version: str, share: float) -> FeatureCache:
    if settings.tiers == "feast-only":
        # No RAM or SSD tier: every read is one Feast call (the benchmark's baseline arm).
        cold = FeastTier(repo, [FeastView(view, entity_key)])
        tiered = TieredCache(ram=None, ssd=None, cold=cold, ssd_budget_bytes=0, name=f"features-{view}")
        return FeatureCache(tiered, view=view, entity_key=entity_key, model_version=model_version)
    return FeatureCache.open(
        redis_url=redis_url, rocksdb_dir=rocksdb_dir, feast_repo=repo, view=view, entity_key=entity_key,
        model_version=model_version, ram_budget_bytes=int(settings.ram_budget_bytes * share),
        ssd_budget_bytes=int(settings.ssd_budget_bytes * share),
    )


@serve.deployment(name="Recommender", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.25})
class RecommenderDeployment:
    def __init__(self, redis_url: str, state_dir: str, settings: dict[str, Any]) -> None:
        self.settings = RecommenderSettings.model_validate(settings)
        self.repo = Path(self.settings.feast_repo)
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.redis_url = redis_url
        self.results = ResultCache(self.redis, default_ttl_s=self.settings.result_ttl_s)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.rocksdb_root = Path(state_dir) / "rocksdb" / f"recommender-{self.replica}"
        self.info = RepoInfo.load(self.repo)
        self.versions = ModelVersions(self.redis, {RECS_MODEL: self.info.model_version})
        self.writer = UserActivityWriter(self.repo)
        self._read_gen: OrderedDict[int, int] = OrderedDict()
        self._gen_lock = threading.Lock()
        self._load(self.info)

    def _load(self, info: RepoInfo) -> None:
        self.model_version = info.model_version
        self.index = ItemIndex(info.files["item_features"], use_gpu=self.settings.faiss_gpu)
        rated = pd.read_parquet(info.files["rated"])
        self.rated = {int(u): set(map(int, items)) for u, items in zip(rated[names.USER_KEY], rated["item_ids"], strict=True)}
        self.genre_list = list(info.genres)
        self.genres = {g: i for i, g in enumerate(info.genres)}
        popular = info.popular_items
        self.popular = [(int(item), 1.0 - rank / max(len(popular), 1)) for rank, item in enumerate(popular)]
        common = dict(redis_url=self.redis_url, repo=self.repo, model_version=info.model_version)
        self.users = _feature_cache(self.settings, rocksdb_dir=self.rocksdb_root / "users", view=names.USER_VIEW,
                                    entity_key=names.USER_KEY, share=0.25, **common)
        self.items = _feature_cache(self.settings, rocksdb_dir=self.rocksdb_root / "items", view=names.ITEM_VIEW,
                                    entity_key=names.ITEM_KEY, share=1.0, **common)

    # ---------------------------------------------------------------- keys
    @staticmethod
    def _gen_key(user_id: int) -> str:
        return f"tierserve:recs:gen:{user_id}"

    @staticmethod
    def _rated_key(user_id: int) -> str:
        return f"tierserve:recs:rated:{user_id}"

    def _generation(self, user_id: int) -> int:
        """Bumped by every event of the user: older cached results become unreachable at once."""
        return int(self.redis.get(self._gen_key(user_id)) or 0)

    def _seen(self, user_id: int) -> set[int]:
        seen = set(self.rated.get(user_id, ()))
        with contextlib.suppress(redis.RedisError):
            seen |= {int(x) for x in self.redis.smembers(self._rated_key(user_id))}
        return seen

    def _ensure_fresh(self, user_id: int, gen: int | None) -> None:
        """Read-your-writes on every replica: the stream delivers an event's invalidation within
        milliseconds, but a request can arrive sooner. When the user's generation moved since this
        replica last read their features, drop this replica's copies before reading."""
        if not gen:
            return  # no event ever, or Redis down (then the stream is down too: nothing to compare)
        with self._gen_lock:
            if self._read_gen.get(user_id) == gen:
                self._read_gen.move_to_end(user_id)
                return
            self._read_gen[user_id] = gen
            while len(self._read_gen) > GENERATIONS_REMEMBERED:
                self._read_gen.popitem(last=False)
        self.users.tiered.invalidate([self.users.key(user_id)], broadcast=False)

    # ----------------------------------------------------------- recommend
    def recommend(self, user_id: int, k: int, tenant: str) -> dict[str, Any]:
        key, gen = None, None
        try:
            gen = self._generation(user_id)
            if self.settings.result_cache:
                payload = {"user": user_id, "k": k, "gen": gen}
                key = self.results.key(tenant=tenant, model=RECS_MODEL, version=self.model_version, payload=payload)
                hit = self.results.get(key)
                if hit is not None:
                    return {**json.loads(hit), "cached": True, "replica": self.replica}
        except (CacheUnavailable, redis.RedisError):
            key = None
        answer = self._compute(user_id, k, gen)
        if key is not None and answer.get("status", 200) == 200 and not answer["degraded"]:
            with contextlib.suppress(CacheUnavailable):
                self.results.put(key, json.dumps(answer).encode())
        return answer

    def _compute(self, user_id: int, k: int, gen: int | None) -> dict[str, Any]:
        self._ensure_fresh(user_id, gen)
        user = self.users.get([user_id])
        base = {"user_id": user_id, "model_version": self.model_version, "cached": False, "replica": self.replica}
        if user_id not in user.features:
            if user.degraded:
                return {"status": 503, "message": "the feature store is unreachable and this user's features are "
                                                  "not cached on any tier; retry shortly"}
            seen = self._seen(user_id)
            items = [{"item_id": i, "score": round(s, 6)} for i, s in self.popular if i not in seen][:k]
            return {**base, "items": items, "cold_start": True, "degraded": False,
                    "sources": {"user": None, "items": {}}}

        feats = user.features[user_id]
        u_emb = np.asarray(feats["embedding"], dtype=np.float32)
        affinity = np.asarray(feats.get("genre_affinity") or [], dtype=np.float32)
        seen = self._seen(user_id)
        wanted = max(self.settings.candidates, CANDIDATES_PER_K * k) + len(seen)
        candidates = [i for i in self.index.search(u_emb, wanted) if i not in seen]
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
            return {"status": 503, "message": "the feature store is unreachable and none of this user's candidate "
                                              "items' features are cached; retry shortly"}
        items = [{"item_id": i, "score": round(s, 6)} for s, i in scored[:k]]
        return {
            **base, "items": items, "cold_start": False, "degraded": bool(batch.degraded or user.degraded),
            # Which tier answered, like the chat route's x-cache: the operator's first question.
            "sources": {"user": user.sources.get(user_id), "items": dict(Counter(batch.sources.values()))},
            "user_activity": {"n_ratings": feats.get("n_ratings"), "last_ts": feats.get("last_ts")},
        }

    # -------------------------------------------------------------- events
    def record_event(self, event: dict[str, Any]) -> dict[str, Any]:
        try:
            activity = Activity.parse(event)
        except EventRejected as exc:
            return {"status": exc.status, "message": exc.message}
        user_id, item_id = activity.user_id, activity.item_id
        if item_id not in self.index.ids:
            return {"status": 404, "message": f"item_id {item_id} is not in the catalogue of model version "
                                              f"{self.model_version}; events must name a known item"}
        # One event of a user at a time (across replicas): the push is a read-modify-write.
        lock = self.redis.lock(f"tierserve:recs:eventlock:{user_id}", timeout=EVENT_LOCK_TIMEOUT_S,
                               blocking_timeout=EVENT_LOCK_WAIT_S)
        try:
            if not lock.acquire():
                return {"status": 503, "message": f"another event of user {user_id} is still being recorded; retry it"}
        except redis.RedisError:
            return {"status": 503, "message": "Redis is unreachable: the event was not recorded, retry it"}
        try:
            return self._record_locked(activity)
        except redis.RedisError:
            return {"status": 503, "message": "Redis is unreachable: the event was not recorded, retry it"}
        finally:
            with contextlib.suppress(redis.RedisError):  # an expired lock is released by its timeout anyway
                lock.release()

    def _record_locked(self, activity: Activity) -> dict[str, Any]:
        user_id, item_id = activity.user_id, activity.item_id
        item = self.items.get([item_id])
        if item_id not in item.features:
            if item.degraded:
                return {"status": 503, "message": "the feature store is unreachable: the event was not recorded, retry it"}
            return {"status": 404, "message": f"item_id {item_id} has no features in the feature store"}
        if activity.type == "rating":
            # Before the push and idempotent: a failed push leaves nothing a retry would double.
            self.redis.sadd(self._rated_key(user_id), item_id)
        try:
            row, new_user = self.writer.record(activity, item.features[item_id], self.genre_list)
        except FeatureStoreUnavailable as exc:
            log.warning("event of user %s not recorded: %s", user_id, exc)
            return {"status": 503, "message": "the feature store is unreachable: the event was not recorded, retry it"}
        self.users.invalidate([user_id])
        out: dict[str, Any] = {"status": 202, "accepted": True, "user_id": user_id, "item_id": item_id,
                               "type": activity.type, "new_user": new_user, "n_ratings": row["n_ratings"],
                               "invalidated": ["user_features", "results"], "replica": self.replica}
        try:
            # Last: a result computed from now on is computed from the pushed row.
            self.redis.incr(self._gen_key(user_id))
        except redis.RedisError:
            out["invalidated"] = ["user_features"]
            out["warning"] = "Redis failed after the push: cached results of this user may be served until they expire"
        timer = threading.Timer(SECOND_INVALIDATION_S, self._invalidate_quietly, args=([user_id],))
        timer.daemon = True
        timer.start()
        return out

    def _invalidate_quietly(self, user_ids: list[int]) -> None:
        try:
            self.users.invalidate(user_ids)
        except Exception:  # a timer thread: log, never raise into nothing
            log.exception("second invalidation of %s failed", user_ids)

    # ---------------------------------------------------------- operations
    def reload(self, version: str | None = None) -> str:
        self.info = RepoInfo.load(self.repo)
        self.users.close()
        self.items.close()
        self._load(self.info)
        if version:
            self.model_version = version
        return self.model_version

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_version": self.model_version, "items_indexed": self.index.size, "replica": self.replica,
            "tiers": self.settings.tiers, "result_cache": self.settings.result_cache,
        }
        for name, cache in (("user_features", self.users), ("item_features", self.items)):
            out[name] = dataclasses.asdict(cache.tiered.stats())
        return out

    def metrics_text(self) -> bytes:
        return generate_latest()
