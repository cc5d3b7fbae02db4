"""Feature reads for the Recommender: entity ids in, feature dicts out, through the TieredCache.

Keys are `features:{view}:{model_version}:{id}`: the view routes a cold miss to the right Feast
view, the model version makes a feature-pipeline rebuild invalidate everything at once (old keys
are simply never asked for again, and `bump_version` purges them in the background).
Several FeatureCaches (user and item views) can share one TieredCache, hence one RAM budget and
one frequency sketch: the sketch then weighs a hot item against a hot user, which is the point.
Rows that change between pipeline builds (users, through events) are generation-checked: open
the cache with `generation_key` (entity id -> its counter's Redis key; see caches/generations.py)
and write through `write`, or bump with `invalidate(..., bump=True)` after your own write.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caches.keys import key_prefix, make_key
from caches.tiered import TieredCache
from caches.tiers.base import TierUnavailable
from caches.tiers.feast import FeastTier, FeastView, decode_features

NAMESPACE = "features"


@dataclass
class FeatureBatch:
    features: dict[int, dict[str, Any]]  # found ids -> feature dict (lists for array features)
    missing: list[int]  # ids no tier nor Feast could answer
    degraded: bool  # True when a tier was unavailable during the read
    sources: dict[int, str]  # id -> tier name that answered ("redis" | "rocksdb" | "feast")


class FeatureCache:
    def __init__(self, tiered: TieredCache, *, view: str, entity_key: str, model_version: str) -> None:
        self.tiered = tiered
        self.view = view
        self.entity_key = entity_key
        self.model_version = model_version
        if isinstance(tiered.cold, FeastTier) and view not in tiered.cold.views:
            tiered.cold.add_view(FeastView(view, entity_key))

    @classmethod
    def feast_only(cls, *, feast_repo: Path | str, view: str, entity_key: str, model_version: str) -> FeatureCache:
        """No RAM or SSD tier: every read is one Feast call (a baseline, and a way to rule the
        tiers out when debugging)."""
        cold = FeastTier(feast_repo, [FeastView(view, entity_key)])
        tiered = TieredCache(ram=None, ssd=None, cold=cold, ssd_budget_bytes=0, name=f"features-{view}")
        return cls(tiered, view=view, entity_key=entity_key, model_version=model_version)

    @classmethod
    def open(
        cls, *, redis_url: str, rocksdb_dir: Path, feast_repo: Path, view: str, entity_key: str,
        model_version: str, ram_budget_bytes: int, ssd_budget_bytes: int, ttl_s: float | None = None,
        generation_key: Callable[[int], str] | None = None,
    ) -> FeatureCache:
        """One view on its own TieredCache (named after the view: replicas of it share RAM).
        `generation_key`: entity id -> its generation counter (turns on generation checks)."""
        cold = FeastTier(feast_repo, [FeastView(view, entity_key)])
        tiered = TieredCache.open(
            redis_url=redis_url, rocksdb_dir=rocksdb_dir, ram_budget_bytes=ram_budget_bytes,
            ssd_budget_bytes=ssd_budget_bytes, cold=cold, ttl_s=ttl_s, name=f"features-{view}",
            generation_of=(lambda key: generation_key(ident_of(key))) if generation_key is not None else None,
        )
        return cls(tiered, view=view, entity_key=entity_key, model_version=model_version)

    def key(self, ident: int) -> str:
        return make_key(NAMESPACE, self.view, self.model_version, str(int(ident)))

    def get(self, ids: list[int], generations: dict[int, int] | None = None) -> FeatureBatch:
        """`generations`: id -> generation as the caller read it before (generation-checked caches)."""
        keys = {self.key(i): int(i) for i in ids}
        gens = {self.key(i): g for i, g in generations.items()} if generations else None
        result = self.tiered.get_many(list(keys), gens)
        features = {keys[k]: decode_features(v) for k, v in result.values.items()}
        return FeatureBatch(
            features=features,
            missing=[keys[k] for k in result.missing],
            degraded=result.degraded,
            sources={keys[k]: s for k, s in result.sources.items()},
        )

    def invalidate(self, ids: list[int], *, bump: bool = False) -> bool:
        """Drop upper-tier copies here and, through the stream, on every replica; `bump` (after a
        write to Feast) moves the ids' generations first. True when it reached everyone."""
        return self.tiered.invalidate([self.key(i) for i in ids], bump=bump)

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Write changed features through Feast, then invalidate the cached copies everywhere.
        Each row holds the join key and every feature; timestamps default to now."""
        cold = self.tiered.cold
        if not isinstance(cold, FeastTier):
            raise TierUnavailable("this FeatureCache has no Feast tier to write through")
        cold.write(self.view, rows)
        self.invalidate([int(r[self.entity_key]) for r in rows], bump=True)

    def bump_version(self, new_version: str, *, purge_in_background: bool = True) -> threading.Thread | None:
        """Serve `new_version` keys from now on; old keys are unreachable at once and purged."""
        old, self.model_version = self.model_version, new_version
        prefix = key_prefix(NAMESPACE, self.view, old)
        if not purge_in_background:
            self.tiered.purge_prefix(prefix)
            return None
        thread = threading.Thread(target=self.tiered.purge_prefix, args=(prefix,), daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.tiered.close()


def ident_of(key: str) -> int:
    """The entity id of a feature key (its last part)."""
    return int(key.rsplit(":", 1)[1])
