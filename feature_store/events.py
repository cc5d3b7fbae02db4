"""User activity -> the user's updated feature row, written through Feast's push path.

Pure Python (Feast, pandas, numpy; no Ray): the Recommender calls it, the tests call it directly.

Why it is built this way:
- Feast is the source of truth, so the current row is read from the online store itself, never
  from a cache tier: a stale cached row would be incremented and pushed back, losing an event.
- Feast 0.67 pushes need every feature column of the view, so a push is always a whole row.
- Only what one event can honestly change is changed: a rating adds one to `n_ratings`, moves
  `mean_rating` and `genre_affinity` (both are running means over the ratings); every event moves
  `last_ts`; a rating adds its item to `rated_since_build` (the durable half of the "already
  rated" filter: the Recommender's Redis set of the same items is lost with a Redis restart). The embedding is a factorisation of the whole rating matrix: it is kept as is until
  the pipeline's next build.
- A never-seen user (no row in the online store): `record` creates their row by "fold-in", the
  embedding of the item they acted on (the user coordinates of the SVD space, last coordinate 0,
  L2-normalised). The Recommender does not let it: it refuses events of users the store does not
  know (404; users come from the pipeline, and an API client must not mint permanent ones: see
  deployments/recommender.py `_record_locked`). Unknown *items* are rejected by the caller too:
  nothing can be said about an item the catalogue does not hold.
- Read-modify-write is not atomic across processes: the caller serialises events of one user
  (the Recommender holds a per-user Redis lock around `record`).
- An event can reach the row twice: a push that timed out but landed (the event is then queued
  and replayed), or a replica that died between a queued event's push and its removal from the
  queue. Every event carries an id from acceptance on; the row keeps the ids of its last
  `APPLIED_EVENTS_KEPT` events (`applied_events`, in Feast with the row, so the check and the
  write are one read-modify-write under the same lock), and `already_applied` says to skip it.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from caches.tiers.feast import one_try_online_redis
from feature_store import names

EVENT_TYPES = ("view", "click", "rating")
# Ids of a user's latest applied events kept in the row. A replay comes soon after its first try
# (seconds, or a replica restart) and only events of the same user push an id out, so 16 covers
# any realistic gap at ~200 bytes a row.
APPLIED_EVENTS_KEPT = 16
# Random hex characters of an event id: 48 bits; two of one user's 16 ids colliding is ~1e-13.
EVENT_ID_CHARS = 12
# Hex characters of a client event id's body part (see `client_event_id`).
BODY_ID_CHARS = 8
# Longest `Idempotency-Key` a client may send (a UUID is 36).
IDEMPOTENCY_KEY_MAX = 255


def new_event_id() -> str:
    return secrets.token_hex(EVENT_ID_CHARS // 2)


def client_event_id(sender: str, key: str | None, activity: Activity) -> str | None:
    """The event id of a client's `Idempotency-Key` (None without one): the same key from the
    same sender for the same event is the same id, so a retry after a timeout or a hang-up is
    applied once. Per sender: two tenants that pick the same key send two events.

    The id is `{key part}.{body part}`: the body part hashes what the event changes (user, item,
    type, value; not `ts`, which a retry may take anew). The same key with another body is a
    client's mistake, not a retry: `reused_key` tells it apart, and the event is refused rather
    than answered "already applied" for something never applied (the IETF Idempotency-Key
    draft's 422)."""
    if key is None:
        return None
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX or not all("!" <= c <= "~" for c in key):
        raise EventRejected(400, f"Idempotency-Key: 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters, no spaces "
                                 "(e.g. a UUID); send the same key when you retry the same event")
    key_part = hashlib.sha256(f"{sender}\0{key}".encode()).hexdigest()[:EVENT_ID_CHARS]
    value = "" if activity.value is None else repr(float(activity.value))
    body = f"{activity.user_id}\0{activity.item_id}\0{activity.type}\0{value}"
    return f"{key_part}.{hashlib.sha256(body.encode()).hexdigest()[:BODY_ID_CHARS]}"


# Where production puts the Feast online store's Redis (feature_store_redis.yaml expands it).
FEAST_REDIS_ENV = "FEAST_REDIS_CONNECTION_STRING"


def unbounded_feast_redis(connection_string: str | None, *, bound_s: float) -> str | None:
    """Why a Feast Redis connection string ("host:port,db=0,...,socket_timeout=S") lets one
    push run past `bound_s`, or None when it does not (or there is none).

    An event's read-modify-write of the user row runs under a lock of `bound_s`
    (deployments/recommender_events.py); a push that outlives it can land after another replica's
    update of the same row and overwrite it (a lost rating). Feast's push to Redis is two round
    trips (its `online_write_batch` reads the rows' timestamps, then writes), each one try
    (`one_try_online_redis`), and a reconnect first costs up to `socket_connect_timeout` (redis-py:
    `socket_timeout` when unset). So the string must say its timeout (redis-py's own default, 5 s
    a try, is a library's, not a decision of ours), and two tries plus a connect must fit."""
    if not connection_string:
        return None
    params = dict(part.split("=", 1) for part in connection_string.split(",") if "=" in part)
    raw, raw_connect = params.get("socket_timeout"), params.get("socket_connect_timeout")
    if raw is None:
        return f"it sets no socket_timeout (two tries and a connect must fit in the {bound_s:g}s event lock)"
    try:
        timeout = float(raw)
        connect = timeout if raw_connect is None else float(raw_connect)
    except ValueError:
        return f"its socket_timeout or socket_connect_timeout ({raw!r}, {raw_connect!r}) is not a number of seconds"
    worst = 2 * timeout + connect
    if timeout <= 0 or connect <= 0 or worst >= bound_s:
        return (f"a push may take 2 x socket_timeout + socket_connect_timeout = {worst:g}s, not under the "
                f"{bound_s:g}s event lock")
    return None


class EventRejected(ValueError):
    """The event cannot be recorded as sent (a client error): `status` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class FeatureStoreUnavailable(RuntimeError):
    """Feast's online store cannot be read or written right now: the event was not recorded."""


@dataclass(frozen=True)
class Activity:
    user_id: int
    item_id: int
    type: str  # "view" | "click" | "rating"
    value: float | None = None  # the rating (required for "rating")
    ts: int = field(default_factory=lambda: int(time.time()))  # Unix seconds
    # Set when the event is accepted (never read from the body): random, or derived from the
    # client's Idempotency-Key; kept through the queue (see the note).
    event_id: str | None = None

    @classmethod
    def parse(cls, event: dict[str, Any], now: float | None = None) -> Activity:
        kind = event.get("type")
        if kind not in EVENT_TYPES:
            raise EventRejected(422, f"type: must be one of {', '.join(EVENT_TYPES)} (got {kind!r})")
        value = event.get("value")
        if kind == "rating" and value is None:
            raise EventRejected(422, "value: a rating event needs a value (the rating, 0 to 5)")
        ts = int(event.get("ts") or (now if now is not None else time.time()))
        return cls(int(event["user_id"]), int(event["item_id"]), kind, None if value is None else float(value), ts)


def fold_in_embedding(item_embedding: Sequence[float]) -> list[float]:
    """A new user's vector from one item: the item's factors with the norm coordinate zeroed.

    Items carry the MIPS-to-cosine norm term in their last coordinate and users carry 0 there
    (see feature_store.features.svd_embeddings); dropping it and normalising puts the user in
    the user space, nearest to the items most like this one."""
    vec = np.asarray(item_embedding, dtype=np.float64).copy()
    if vec.size:
        vec[-1] = 0.0
    norm = float(np.linalg.norm(vec))
    return [float(x) for x in (vec / norm if norm > 0 else vec)]


def already_applied(current: dict[str, Any] | None, activity: Activity) -> bool:
    """Whether `current` (the row in the online store) already holds this event."""
    return (current is not None and activity.event_id is not None
            and activity.event_id in (current.get("applied_events") or ()))


def reused_key(current: dict[str, Any] | None, activity: Activity) -> bool:
    """Whether the row holds an event sent with the same Idempotency-Key but another body."""
    if current is None or activity.event_id is None or "." not in activity.event_id:
        return False
    key_part = activity.event_id.split(".", 1)[0] + "."
    return any(str(x).startswith(key_part) and str(x) != activity.event_id
               for x in (current.get("applied_events") or ()))


def _applied_after(current: dict[str, Any] | None, activity: Activity) -> list[str]:
    kept = [str(x) for x in ((current or {}).get("applied_events") or [])]
    if activity.event_id is not None:
        kept.append(activity.event_id)
    return kept[-APPLIED_EVENTS_KEPT:]


def updated_user_row(
    current: dict[str, Any] | None, activity: Activity, item: dict[str, Any], genres: Sequence[str]
) -> dict[str, Any]:
    """The user's full feature row after `activity` (every feature of the view, plus the join key).

    `current` is the row in the online store (None: a never-seen user), `item` the acted-on
    item's features (needs `genres` and `embedding`), `genres` the repo's genre order."""
    onehot = np.zeros(len(genres), dtype=np.float64)
    order = {g: i for i, g in enumerate(genres)}
    for g in item.get("genres") or []:
        if g in order:
            onehot[order[g]] = 1.0
    rating = activity.type == "rating"
    if current is None:
        return {
            names.USER_KEY: activity.user_id,
            "n_ratings": 1 if rating else 0,
            "mean_rating": float(activity.value) if rating and activity.value is not None else 0.0,
            "last_ts": activity.ts,
            "genre_affinity": [float(x) for x in (onehot if rating else np.zeros(len(genres)))],
            "embedding": fold_in_embedding(item.get("embedding") or []),
            "rated_since_build": [activity.item_id] if rating else [],
            "applied_events": _applied_after(None, activity),
        }
    n = int(current.get("n_ratings") or 0)
    mean = float(current.get("mean_rating") or 0.0)
    affinity = np.asarray(current.get("genre_affinity") or np.zeros(len(genres)), dtype=np.float64)
    if affinity.size != len(genres):  # a repo built with another genre list: start the shares afresh
        affinity = np.zeros(len(genres), dtype=np.float64)
    row = {
        names.USER_KEY: activity.user_id,
        "n_ratings": n,
        "mean_rating": mean,
        "last_ts": max(int(current.get("last_ts") or 0), activity.ts),
        "genre_affinity": [float(x) for x in affinity],
        "embedding": [float(x) for x in (current.get("embedding") or [])],
        # A set kept sorted: replaying an event (a queued one applied twice) changes nothing.
        "rated_since_build": sorted({int(x) for x in (current.get("rated_since_build") or [])}
                                    | ({activity.item_id} if rating else set())),
        "applied_events": _applied_after(current, activity),
    }
    if rating and activity.value is not None:
        # Running means over n -> n+1 ratings, exactly what the pipeline would compute.
        row["n_ratings"] = n + 1
        row["mean_rating"] = (mean * n + activity.value) / (n + 1)
        row["genre_affinity"] = [float(x) for x in (affinity * n + onehot) / (n + 1)]
    return row


class UserActivityWriter:
    """Reads a user's current row from Feast's online store and pushes the updated one."""

    def __init__(self, repo_dir: Path | str | None = None, *, store_factory: Callable[[], Any] | None = None) -> None:
        if repo_dir is None and store_factory is None:
            raise ValueError("give repo_dir or store_factory")
        self.repo_dir = Path(repo_dir) if repo_dir is not None else None
        self._factory = store_factory
        self._store: Any = None
        self._lock = threading.Lock()

    def _open(self) -> Any:
        with self._lock:
            if self._store is None:
                if self._factory is not None:
                    self._store = self._factory()
                else:
                    from feast import FeatureStore  # slow import: first use only

                    self._store = FeatureStore(repo_path=str(self.repo_dir))
                    one_try_online_redis(self._store)
            return self._store

    def _failed(self, what: str, exc: Exception) -> FeatureStoreUnavailable:
        # Reopen next time: the store may be repaired by then (a fresh connection sees it).
        self._store = None
        return FeatureStoreUnavailable(f"feature store {what} failed: {type(exc).__name__}: {exc}")

    def current_row(self, user_id: int) -> dict[str, Any] | None:
        """The user's row in the online store, or None for a user it does not hold."""
        try:
            rows = self._open().get_online_features(
                features=[f"{names.USER_VIEW}:{f}" for f in names.USER_FEATURES],
                entity_rows=[{names.USER_KEY: int(user_id)}],
            ).to_dict()
        except Exception as exc:  # sqlite/redis/registry errors all mean "cannot read now"
            raise self._failed("read", exc) from exc
        row = {f: rows[f][0] for f in names.USER_FEATURES}
        if all(v is None for v in row.values()):
            return None
        return row

    def push(self, row: dict[str, Any]) -> None:
        """Write one full user row through the push source (online store only)."""
        import pandas as pd

        now = pd.Timestamp(datetime.now(UTC))
        frame = pd.DataFrame([{**row, names.TIMESTAMP_FIELD: now, names.CREATED_FIELD: now}])
        try:
            self._open().push(names.USER_PUSH_SOURCE, frame)
        except Exception as exc:
            raise self._failed("push", exc) from exc

    def record(self, activity: Activity, item: dict[str, Any], genres: Sequence[str]) -> tuple[dict[str, Any], bool]:
        """Read, update and push the user's row; returns (the pushed row, whether the user was new)."""
        current = self.current_row(activity.user_id)
        row = updated_user_row(current, activity, item, genres)
        self.push(row)
        return row, current is None
