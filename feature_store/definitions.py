"""Feast object definitions for the tierserve feature repository.

`definitions(repo_dir)` builds the objects for any repository folder (the pipeline applies them
with `FeatureStore.apply`); the module-level names below are the same objects for this package's
own folder, which is what `feast apply` run in `feature_store/` picks up.

This module is imported by the Feast CLI as a top-level module, so it must only import feast and
the standard library (no `feature_store.*` imports).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float32, Int64, String

try:
    from feature_store.names import (
        CREATED_FIELD,
        ITEM_ENTITY,
        ITEM_KEY,
        ITEM_PARQUET,
        ITEM_VIEW,
        TIMESTAMP_FIELD,
        USER_ENTITY,
        USER_KEY,
        USER_PARQUET,
        USER_PUSH_SOURCE,
        USER_VIEW,
    )
except ImportError:  # the Feast CLI may import this file as a top-level module from the repo folder
    from names import (  # type: ignore[no-redef]
        CREATED_FIELD,
        ITEM_ENTITY,
        ITEM_KEY,
        ITEM_PARQUET,
        ITEM_VIEW,
        TIMESTAMP_FIELD,
        USER_ENTITY,
        USER_KEY,
        USER_PARQUET,
        USER_PUSH_SOURCE,
        USER_VIEW,
    )


def definitions(repo_dir: Path, *, absolute_paths: bool = False) -> list[Any]:
    """Entities, sources and feature views of the repository rooted at `repo_dir`.

    Source paths are stored relative to the repository by default: Feast resolves them against
    `repo_path`, so the registry stays valid when the folder moves (into an image, another host).
    Pass `absolute_paths=True` for stores opened from a `RepoConfig` without a `repo_path`.
    """
    objs = _build(Path(repo_dir), absolute_paths)
    return list(objs.values())


def _build(repo_dir: Path, absolute_paths: bool) -> dict[str, Any]:
    def path(rel: str) -> str:
        return str((repo_dir / rel).resolve()) if absolute_paths else rel

    user = Entity(
        name=USER_ENTITY,
        join_keys=[USER_KEY],
        value_type=ValueType.INT64,
        description="A user who rates items",
    )
    item = Entity(
        name=ITEM_ENTITY,
        join_keys=[ITEM_KEY],
        value_type=ValueType.INT64,
        description="A rated item (a movie in the MovieLens sample)",
    )
    user_source = FileSource(
        name="user_features_source",
        path=path(USER_PARQUET),
        timestamp_field=TIMESTAMP_FIELD,
        created_timestamp_column=CREATED_FIELD,
    )
    item_source = FileSource(
        name="item_features_source",
        path=path(ITEM_PARQUET),
        timestamp_field=TIMESTAMP_FIELD,
        created_timestamp_column=CREATED_FIELD,
    )
    # A push source backed by the batch parquet: `store.push(USER_PUSH_SOURCE, df)` writes fresh
    # user rows straight into the online store, and materialisation still reads the parquet.
    user_push = PushSource(name=USER_PUSH_SOURCE, batch_source=user_source)

    # ttl=0: features never expire in the online store; freshness is the cache's business
    # (model_version in every key, invalidation events), not Feast's.
    user_features = FeatureView(
        name=USER_VIEW,
        entities=[user],
        ttl=timedelta(0),
        schema=[
            Field(name=USER_KEY, dtype=Int64),
            Field(name="n_ratings", dtype=Int64),
            Field(name="mean_rating", dtype=Float32),
            Field(name="last_ts", dtype=Int64, description="Unix seconds of the latest rating"),
            Field(
                name="genre_affinity",
                dtype=Array(Float32),
                description="Share of the user's ratings per genre, in meta.json's genre order",
            ),
            Field(name="embedding", dtype=Array(Float32), description="SVD user factors, L2-normalised"),
            Field(
                name="rated_since_build",
                dtype=Array(Int64),
                description="Items the user rated through events after this build (the build's own are in rated.parquet)",
            ),
            Field(
                name="applied_events",
                dtype=Array(String),
                description="Ids of the user's latest events applied to this row (a replayed event is not applied twice)",
            ),
        ],
        source=user_push,
        online=True,
        description="Per-user aggregates and embedding",
    )
    item_features = FeatureView(
        name=ITEM_VIEW,
        entities=[item],
        ttl=timedelta(0),
        schema=[
            Field(name=ITEM_KEY, dtype=Int64),
            Field(name="popularity", dtype=Int64, description="Number of ratings"),
            Field(name="mean_rating", dtype=Float32),
            Field(name="genres", dtype=Array(String)),
            Field(name="year", dtype=Int64, description="Release year from the title, 0 if unknown"),
            Field(name="embedding", dtype=Array(Float32), description="SVD item factors, L2-normalised"),
        ],
        source=item_source,
        online=True,
        description="Per-item aggregates, metadata and embedding",
    )
    return {
        "user": user,
        "item": item,
        "user_source": user_source,
        "item_source": item_source,
        "user_activity_push": user_push,
        "user_features": user_features,
        "item_features": item_features,
    }


# Module-level objects for the Feast CLI (`feast apply` inside feature_store/), which collects
# Feast objects from module attributes, not from function results.
_objects = _build(Path(__file__).resolve().parent, absolute_paths=False)
user: Entity = _objects["user"]
item: Entity = _objects["item"]
user_source: FileSource = _objects["user_source"]
item_source: FileSource = _objects["item_source"]
user_activity_push: PushSource = _objects["user_activity_push"]
user_features: FeatureView = _objects["user_features"]
item_features: FeatureView = _objects["item_features"]
