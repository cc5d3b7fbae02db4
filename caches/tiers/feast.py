"""Cold tier: read-through over a Feast online store, the source of truth for features.

Why these choices:
- One `get_online_features` call per feature view per batch (never per key); the view comes from
  the key's model part, the entity id from its ident (`features:{view}:{version}:{id}`), so a key
  carries everything needed to fetch it.
- A row whose features are all null is an entity Feast does not know: a miss, never a value of
  empty features (an empty dict cached upstream would be served as "this user has no history").
- Any failure of the store (online DB missing, registry unreadable, network) is
  `TierUnavailable`: the TieredCache still serves what RAM and SSD hold and reports the rest
  missing. After a failure the store is reopened on the next call, so a repaired store is picked up.
- A Redis online store's client tries each command once (`one_try_online_redis`): a stalled
  server costs a read one `socket_timeout` (the connection string's), then the TieredCache
  answers from what it holds, instead of redis-py re-sending the read up to ten times.
- `import feast` costs 7-11 s, so it happens on first use, not at import of this module.
- Values are msgpack of the feature dict (lists stay lists): compact, fast, no pickle.
- Writes go through Feast's own `write_to_online_store`; the cache never writes Feast's tables.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from caches import metrics
from caches.tiers.base import TierStats, TierUnavailable


@dataclass(frozen=True)
class FeastView:
    view: str
    entity_key: str  # join key, e.g. user_id
    features: tuple[str, ...] | None = None  # None: every feature of the view (asked once)
    parse_id: Callable[[str], Any] = int


def encode_features(features: dict[str, Any]) -> bytes:
    return msgpack.packb(features, use_bin_type=True)


def decode_features(raw: bytes) -> dict[str, Any]:
    return msgpack.unpackb(raw, raw=False)


def one_try_online_redis(store: Any) -> None:
    """Make a Redis online store's client send each command once: its timeout is the answer, as
    for the app's own clients (caches/redis_client.py `make_client`).

    redis-py 8 re-sends a command that timed out (10 tries, with backoff), and a Feast connection
    string cannot say otherwise (its values are JSON, not a Retry). So `socket_timeout` alone
    bounds one try, not the call: a call to a stalled server was re-sent until the server woke
    (tests/integration/test_feast_redis_timeout.py). A read then held a recommendation thread long
    after its answer fell back; an event's push could outlive its lock (the event writer,
    feature_store/events.py, queues a failed push and replays it). Reaches into Feast's provider:
    checked against the pinned Feast by that test."""
    from feast.infra.online_stores.redis import RedisOnlineStore  # loaded with FeatureStore already
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    online = store._get_provider().online_store
    if isinstance(online, RedisOnlineStore):
        client = online._get_client(store.config.online_store)
        if hasattr(client, "set_retry"):
            client.set_retry(Retry(NoBackoff(), 0))


class FeastTier:
    def __init__(
        self, repo_dir: Path | str | None = None, views: Sequence[FeastView] = (), *,
        store: Any = None, store_factory: Callable[[], Any] | None = None, name: str = "feast",
    ) -> None:
        self.name = name
        self.repo_dir = Path(repo_dir) if repo_dir is not None else None
        self.views = {v.view: v for v in views}
        self._store = store
        self._factory = store_factory
        self._features: dict[str, list[str]] = {v.view: list(v.features) for v in views if v.features}
        self._stats = TierStats()
        self._lock = threading.Lock()

    # -- store --------------------------------------------------------------------------------
    def _open(self) -> Any:
        if self._store is not None:
            return self._store
        with self._lock:
            if self._store is None:
                if self._factory is not None:
                    self._store = self._factory()
                else:
                    if self.repo_dir is None or not (self.repo_dir / "feature_store.yaml").exists():
                        raise FileNotFoundError(f"no Feast repo at {self.repo_dir}")
                    from feast import FeatureStore  # slow import: first use only

                    self._store = FeatureStore(repo_path=str(self.repo_dir))
                    one_try_online_redis(self._store)
        return self._store

    @property
    def store(self) -> Any:
        return self._open()

    def _feature_names(self, view: str) -> list[str]:
        if view not in self._features:
            self._features[view] = [f.name for f in self._open().get_feature_view(view).features]
        return self._features[view]

    def add_view(self, view: FeastView) -> None:
        self.views[view.view] = view
        if view.features:
            self._features[view.view] = list(view.features)

    # -- the protocol -------------------------------------------------------------------------
    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        by_view: dict[str, list[tuple[str, Any]]] = defaultdict(list)
        for key in keys:
            parts = key.split(":", 3)
            spec = self.views.get(parts[1]) if len(parts) == 4 else None
            if spec is None:
                continue  # not a feature key this tier serves: a miss
            try:
                by_view[spec.view].append((key, spec.parse_id(parts[3])))
            except ValueError:
                continue
        found: dict[str, bytes] = {}
        ns = metrics.namespace_of(keys[0])
        t0 = time.perf_counter()
        for view, wanted in by_view.items():
            spec = self.views[view]
            try:
                names = self._feature_names(view)
                rows = self._open().get_online_features(
                    features=[f"{view}:{f}" for f in names],
                    entity_rows=[{spec.entity_key: ident} for _, ident in wanted],
                ).to_dict()
            except Exception as exc:  # sqlite/redis/registry errors all mean "cannot read now"
                self._stats.errors += 1
                metrics.ERRORS.labels(tier=self.name, namespace=ns).inc()
                self._store = None  # reopen next time: the store may be repaired by then
                raise TierUnavailable(f"feast view {view} unreadable: {type(exc).__name__}: {exc}") from exc
            for i, (key, _) in enumerate(wanted):
                values = {f: rows[f][i] for f in names}
                if all(v is None for v in values.values()):
                    continue  # unknown entity
                found[key] = encode_features(values)
        metrics.record_read(self._stats, self.name, keys, found, time.perf_counter() - t0)
        return found

    def put_many(self, items: dict[str, bytes], ttl_s: float | None = None) -> None:
        raise NotImplementedError("the cold tier is written through Feast's API: use write()")

    def delete_many(self, keys: list[str]) -> int:
        return 0  # the source of truth is never evicted by the cache

    def write(self, view: str, rows: list[dict[str, Any]]) -> None:
        """Write changed features through Feast (`write_to_online_store`); rows need the join key
        and every feature (timestamps default to now)."""
        from datetime import UTC, datetime

        import pandas as pd

        try:
            store = self._open()
            source = store.get_feature_view(view).batch_source
            now = datetime.now(UTC)
            # The view's source names its event and created timestamp columns; default both to now.
            stamps = [c for c in (source.timestamp_field, source.created_timestamp_column) if c]
            frame = pd.DataFrame([{**{c: now for c in stamps}, **r} for r in rows])
            store.write_to_online_store(view, frame)
        except Exception as exc:
            self._store = None
            raise TierUnavailable(f"feast write to {view} failed: {exc}") from exc

    def size_bytes(self) -> int:
        return 0  # not the cache's to budget

    def stats(self) -> TierStats:
        return self._stats
