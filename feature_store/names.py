"""Names shared by the Feast definitions, the pipeline and the readers (no heavy imports here)."""

from __future__ import annotations

PROJECT = "tierserve"
USER_ENTITY = "user"
ITEM_ENTITY = "item"
USER_KEY = "user_id"
ITEM_KEY = "item_id"
USER_VIEW = "user_features"
ITEM_VIEW = "item_features"
USER_PUSH_SOURCE = "user_activity_push"
TIMESTAMP_FIELD = "event_timestamp"
CREATED_FIELD = "created"

# Relative to the repository folder.
DATA_DIR = "data"
USER_PARQUET = "data/user_features.parquet"
ITEM_PARQUET = "data/item_features.parquet"
RATED_PARQUET = "data/rated.parquet"
META_JSON = "data/meta.json"
REGISTRY_DB = "data/registry.db"
ONLINE_DB = "data/online_store.db"

# `rated_since_build`: items rated through events after the build. It lives in the row, in Feast
# (the source of truth), so that the "never recommend what the user rated" filter survives a cache
# Redis that restarts empty; the Redis set beside it is only the fast path.
# `applied_events`: ids of the user's latest events applied to the row (feature_store/events.py):
# an event replayed after a crash, or after a push that timed out but landed, is not applied twice.
USER_FEATURES = ["n_ratings", "mean_rating", "last_ts", "genre_affinity", "embedding", "rated_since_build",
                 "applied_events"]
ITEM_FEATURES = ["popularity", "mean_rating", "genres", "year", "embedding"]
