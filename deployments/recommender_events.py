"""Rating, view and click events of the Recommender: applied now, or queued and applied later.

Applying one (`record`): one event of a user at a time across replicas (a Redis lock: the push is
a read-modify-write of the user's Feast row); a rating's item into the user's rated set, then a
durable pending-invalidation record and an audit entry naming the sending tenant, one entry per
event id however often the event is tried (Redis, one transaction, one hash slot on a cluster:
deployments/recommender_keys.py; caches/invalidation.py; `_AUDIT_ONCE`),
then the user's row into Feast through its push source, then the user's generation moves (cached
results become unreachable, and no tier accepts or serves a row read before it:
caches/generations.py) and the user's feature entries are dropped on every replica. If Redis fails after the push the
answer says `"invalidation": "pending"`, and the record is replayed by whichever replica's watcher
sees it due, until it reaches everyone.

When a step cannot be done now (Redis or Feast down, slow, or the user's lock busy) the event is
queued on the replica's disk (feature_store/journal.py) and answered 202 `"recorded": "queued"`;
the replica's watcher calls `replay_queued`, which applies queued events oldest first through the
same path. Only users the feature store knows get events (404 otherwise: see `_record_locked`).

An answer within `within_s`: a dependency that is slow rather than down (a Feast read that takes
30 s) would otherwise hold the client until it answers. Past the deadline the event is queued as
above and answered at once; the attempt still running finishes in its thread. Applying twice is
impossible either way: if that attempt lands, the queued copy finds its `event_id` in the row
("already applied", feature_store/events.py); if it fails, it does not queue a second copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import redis
from redis.exceptions import LockError
from redis.lock import Lock

from caches.invalidation import PendingInvalidations
from caches.redis_client import REDIS_ERRORS, is_cluster
from caches.versions import Leased
from deployments.recommender_keys import audit_key, audited_keys, event_lock_key, pending_key
from deployments.recommender_model import CACHE_ERRORS, RecsModel
from feature_store.events import (
    FEAST_REDIS_ENV,
    Activity,
    FeatureStoreUnavailable,
    UserActivityWriter,
    already_applied,
    new_event_id,
    reused_key,
    unbounded_feast_redis,
    updated_user_row,
)
from feature_store.journal import EventJournal

log = logging.getLogger("tierserve.recommender")

EVENT_LOCK_TIMEOUT_S = 10.0
EVENT_LOCK_WAIT_S = 5.0
# Random bytes of an event lock's token (redis-py's own is a 16-byte uuid1).
EVENT_LOCK_TOKEN_BYTES = 16
# KEYS[1]: a lock; ARGV[1]: a token. Deletes the lock only while it holds that token.
_RELEASE_IF_OURS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# When another replica may replay an event's pending record: only when the event's own
# invalidation did not settle it (Redis failed after the push, the replica died). Not sooner than
# the event can still be running (its lock's timeout): a replay that ran ahead of the push, and
# settled the record, would leave nothing to retry a failed invalidation after it.
PENDING_REPLAY_S = EVENT_LOCK_TIMEOUT_S
# The audit stream (deployments/recommender_keys.py `audit_key`) says who sent which event
# (tenant, user, item), newest last; bounded like the invalidation stream.
AUDIT_MAXLEN = 100_000
# An event is audited once, however often it is tried (a lost reply, a failed push replayed from
# the queue, a client's retry with its Idempotency-Key): an index of the audited events (a hash
# event id -> entry id, and a list of the same ids in the order they were audited, to trim it;
# recommender_keys.py `audited_keys`) answers a try again with the first try's entry. The index
# keeps the newest AUDIT_MAXLEN events, the stream's own window, so it is bounded (~20 MB) like
# the stream: a try again of an event older than that (only after so many newer events) appends a
# second entry, when its first has been trimmed from the stream anyway.
# KEYS: 1 the audit stream, 2 the index hash, 3 its order list. ARGV[1]: the stream's MAXLEN
# (`~`) and the index's bound, ARGV[2]: the event id, then the entry's field/value pairs. One
# script, so two tries can never both append; queued in the event's MULTI, so neither the entry
# nor its index row is ever written without the pending record.
_AUDIT_ONCE = """
local first = redis.call('HGET', KEYS[2], ARGV[2])
if first then return first end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
redis.call('HSET', KEYS[2], ARGV[2], id)
local over = redis.call('RPUSH', KEYS[3], ARGV[2]) - tonumber(ARGV[1])
for _ = 1, over do  -- one a call, but for a lowered bound (LPOP's count needs Redis 6.2)
  redis.call('HDEL', KEYS[2], redis.call('LPOP', KEYS[3]))
end
return id
"""

# Queued events applied per watcher tick (the rest wait for the next one).
REPLAY_BATCH = 64
# An event is answered (applied, or queued) within this long by default: below the Ingress's
# deadline for the call (deployments/ingress.py), which could only answer "maybe recorded".
EVENT_WITHIN_S = 5.0
# Threads that apply events under that deadline. When all are stuck on a slow dependency, new
# events wait for one, miss the deadline and are queued without ever starting.
EVENT_THREADS = 8


class NotNow(RuntimeError):
    """An event cannot be applied right now (a dependency is down, slow or busy): queue it."""


@dataclasses.dataclass
class _Attempt:
    """Who queues an event whose attempt may outlive its deadline: exactly one of the two sides,
    decided under `lock`. `settled`: the attempt has its outcome (the deadline side then waits
    for it); `handed_over`: the deadline side queued the event (the attempt must not again)."""

    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    settled: bool = False
    handed_over: bool = False


class EventRecorder:
    """One per Recommender replica; `models` is the replica's current model version (leased)."""

    def __init__(self, client: redis.Redis, writer: UserActivityWriter, journal: EventJournal,
                 models: Leased[RecsModel], replica: str, within_s: float = EVENT_WITHIN_S) -> None:
        self.redis = client
        self.writer = writer
        self.journal = journal
        self.models = models
        self.replica = replica
        self.within_s = within_s
        self._workers = ThreadPoolExecutor(max_workers=EVENT_THREADS, thread_name_prefix="recs-event")
        # Event ids with an attempt still running here: the watcher leaves their queued copy
        # (a deadline's) until it ends, rather than wait on the user's lock the attempt holds.
        self._running: set[str] = set()
        # On a cluster both under one hash tag (the index of audited events too): an event writes
        # them in one MULTI.
        self.cluster = is_cluster(client)
        self.audit_stream = audit_key(self.cluster)
        self.pending = PendingInvalidations(client, pending_key(self.cluster))
        why = unbounded_feast_redis(os.environ.get(FEAST_REDIS_ENV), bound_s=EVENT_LOCK_TIMEOUT_S)
        if why is not None:
            log.warning("%s: %s; add e.g. socket_timeout=2,socket_connect_timeout=2 (docs/operations.md)",
                        FEAST_REDIS_ENV, why)

    def record(self, m: RecsModel, activity: Activity, tenant: str) -> dict[str, Any]:
        """The answer to one event: 202 applied or queued, 404 for an unknown item or user."""
        if activity.event_id is None:  # its id from here on, through the queue (feature_store/events.py)
            activity = dataclasses.replace(activity, event_id=new_event_id())
        if activity.item_id not in m.index.ids:
            return _unknown_item(m, activity.item_id)
        if self.journal.holds_user(activity.user_id):
            return self.queue(activity, tenant, "earlier events of this user are still queued here")
        event_id = activity.event_id
        attempt = _Attempt()
        self._running.add(event_id)
        future: Future[dict[str, Any]] = self._workers.submit(self._attempt, activity, tenant, attempt)
        future.add_done_callback(lambda _: self._running.discard(event_id))  # a cancelled one too
        try:
            return future.result(timeout=self.within_s)
        except FutureTimeout:
            with attempt.lock:
                late = attempt.settled
                attempt.handed_over = not late
            if late:  # its outcome came in the same instant: answer that
                return future.result()
            future.cancel()  # still waiting for a thread: it never starts
            return self.queue(activity, tenant, f"not applied within {self.within_s:g}s (a dependency is slow)")

    def _attempt(self, activity: Activity, tenant: str, attempt: _Attempt) -> dict[str, Any]:
        """`record`'s try in a worker thread, under its own lease: it may outlive the caller's."""
        why, outcome = None, None
        try:
            with self.models.lease() as m:
                outcome = self._record(m, activity, tenant)
        except NotNow as exc:
            why = str(exc)
        with attempt.lock:
            attempt.settled = True
            if attempt.handed_over:
                # Queued by the deadline already: applied now -> its queued copy is skipped as
                # "already applied"; not applied -> the queued copy is the retry.
                log.info("event %s of user %s finished after its deadline: %s", activity.event_id, activity.user_id,
                         why or (outcome or {}).get("recorded", (outcome or {}).get("status")))
                return outcome or {}
            # Queued under the lock: the deadline side, if it fires now, waits and answers this.
            return outcome if why is None else self.queue(activity, tenant, why)

    def queue(self, activity: Activity, tenant: str, why: str) -> dict[str, Any]:
        """Accept an event that cannot be applied now: on disk before the 202, applied by the
        watcher (`replay_queued`) when the dependencies answer."""
        try:
            entry = self.journal.append(activity, tenant)
        except Exception as exc:  # noqa: BLE001 - sqlite3/OS errors: disk full, read-only volume
            log.error("event of user %s could not be queued: %s", activity.user_id, exc)
            return {"status": 503, "message": f"the event could not be recorded ({why}) nor queued on this replica's "
                                              "disk; retry it"}
        log.info("event of user %s queued (%s)", activity.user_id, why)
        return {"status": 202, "accepted": True, "recorded": "queued", "event_id": activity.event_id,
                "user_id": activity.user_id,
                "item_id": activity.item_id, "type": activity.type, "tenant": tenant, "queue_id": entry,
                "replica": self.replica, "invalidation": "queued", "invalidated": [],
                "warning": f"{why}: the event is kept on this replica's disk and applied when the dependency answers "
                           "again; recommendations reflect it from then on"}

    def replay_queued(self) -> None:
        """Apply queued events, oldest first; stop at the first that still cannot be applied
        (order is kept). One that can never be (its user or item unknown) is dropped and logged:
        the 202 had said it was queued, not applied."""
        for entry in self.journal.due(REPLAY_BATCH):
            if entry.activity.event_id in self._running:
                return  # its own attempt (past its deadline) still runs here: the next tick decides
            with self.models.lease() as m:
                try:
                    out = self._record(m, entry.activity, entry.tenant)
                except NotNow as exc:
                    delay = self.journal.retry_later(entry)
                    log.info("queued event %s of user %s not applied yet (%s); next try in %.1fs",
                             entry.id, entry.activity.user_id, exc, delay)
                    return
            if out["status"] != 202:
                log.warning("queued event %s dropped: %s", entry.id, out.get("message"))
            self.journal.done(entry)

    def _record(self, m: RecsModel, activity: Activity, tenant: str) -> dict[str, Any]:
        """Apply one event now, or raise NotNow (a dependency down or busy: the caller queues)."""
        user_id, item_id = activity.user_id, activity.item_id
        if item_id not in m.index.ids:
            return _unknown_item(m, item_id)
        # One event of a user at a time (across replicas): the push is a read-modify-write.
        lock = acquire_event_lock(self.redis, user_id)
        try:
            return self._record_locked(m, activity, tenant, lock)
        finally:
            with contextlib.suppress(*REDIS_ERRORS):  # an expired lock is released by its timeout anyway
                lock.release()

    def _record_locked(self, m: RecsModel, activity: Activity, tenant: str, lock: Any) -> dict[str, Any]:
        user_id, item_id = activity.user_id, activity.item_id
        item = m.items.get([item_id])
        if item_id not in item.features:
            if item.degraded:
                raise NotNow("the feature store is unreachable")
            return {"status": 404, "message": f"item_id {item_id} has no features in the feature store"}
        try:
            # From Feast itself, never a cache tier: a stale row incremented would lose an event.
            current = self.writer.current_row(user_id)
        except FeatureStoreUnavailable as exc:
            raise NotNow("the feature store is unreachable") from exc
        if already_applied(current, activity):
            # Its push landed before (a push that timed out but wrote, or a replica that died
            # before removing it from its queue): the row holds it. Its invalidation was armed
            # before that push, so the pending sweep settles it even if it never ran.
            log.info("event %s of user %s was already applied: not applied again", activity.event_id, user_id)
            # Its try that landed may not have invalidated (a push that timed out never got that
            # far): invalidate now rather than leave old rows and answers to the pending sweep,
            # PENDING_REPLAY_S later. For a try that did invalidate it is one more bump: a miss.
            published = self.invalidate_users(m, [user_id])
            return {"status": 202, "accepted": True, "recorded": "already applied", "event_id": activity.event_id,
                    "user_id": user_id, "item_id": item_id, "type": activity.type, "tenant": tenant,
                    "replica": self.replica, "invalidation": "published" if published else "pending"}
        if reused_key(current, activity):
            return {"status": 422, "message": "Idempotency-Key: this key was already used for another event of user "
                                              f"{user_id} (another item, type or value); a retry must repeat the event "
                                              "as first sent, and a new event needs a new key"}
        if current is None:
            # Users come from the feature pipeline, not from events: any API client could
            # otherwise mint permanent users (a Feast row in a `noeviction` store, and generation
            # and rated keys, which must not expire: a generation that vanished would reset
            # under the cached rows it guards). A 404 costs nothing, and the id stays a
            # cold-start user until the pipeline's next build knows it.
            return {"status": 404, "message": f"user_id {user_id} is not in the feature store: events are accepted "
                                              "for known users only; new users arrive with the feature pipeline's "
                                              "next build (until then they get the cold-start list)"}
        try:
            if activity.type == "rating":
                # Before the push and idempotent: a failed push (or a failed write below) leaves
                # nothing a retry would double, and the item is one the user did rate. Its own
                # command: the set is the user's key, in another slot than the records below.
                self.redis.sadd(m.keys.rated(user_id), item_id)
            # Before the push, in one transaction (one hash slot on a cluster): if Redis fails
            # after it, the pending record still says "invalidate user", and the audit entry
            # says who sent the event; neither is ever written without the other.
            pipe = self.redis.pipeline(transaction=True)
            pending_score = self.pending.arm(str(user_id), PENDING_REPLAY_S, pipe=pipe)
            entry: dict[Any, Any] = {  # redis-py types its fields invariantly
                "tenant": tenant, "event_id": activity.event_id or "", "user_id": user_id, "item_id": item_id,
                "type": activity.type, "value": "" if activity.value is None else activity.value,
                "replica": self.replica}
            if activity.event_id:
                # Once per event: a try again gets the first try's entry id, and appends nothing.
                # EVAL, not a cached EVALSHA: a NOSCRIPT inside the MULTI would fail the event. A
                # raw command: a cluster pipeline's `eval` method is something else (no arguments).
                pipe.execute_command("EVAL", _AUDIT_ONCE, 3, self.audit_stream, *audited_keys(self.cluster),
                                     AUDIT_MAXLEN, activity.event_id, *(x for kv in entry.items() for x in kv))
            else:  # queued before events had ids: nothing to know a try again by
                pipe.xadd(self.audit_stream, entry, maxlen=AUDIT_MAXLEN, approximate=True)
            audit_id = pipe.execute()[-1]
        except REDIS_ERRORS as exc:
            raise NotNow("Redis is unreachable") from exc
        row = updated_user_row(current, activity, item.features[item_id], m.genre_list)
        try:
            # Still ours, and for a whole timeout from now: a slow Feast read above may have
            # outlived the lock, and another replica may then have pushed its own update of the
            # row we read (ours would overwrite it: a lost rating). Not ours -> queue and redo
            # the read-modify-write later. The push itself is bounded by SQLite's busy timeout,
            # or by the Feast Redis's socket_timeout (checked at start: unbounded_feast_redis),
            # both well under EVENT_LOCK_TIMEOUT_S.
            lock.reacquire()
        except (LockError, *REDIS_ERRORS) as exc:
            raise NotNow("the user's event lock expired while the feature store was slow") from exc
        try:
            self.writer.push(row)
        except FeatureStoreUnavailable as exc:
            # Nothing of the event is in Feast (the pending record and the rated item are
            # idempotent: the replay writes them again).
            raise NotNow("the feature store is unreachable") from exc
        published = self.invalidate_users(m, [user_id])
        if published:  # reached everyone: nothing left to replay
            with contextlib.suppress(*REDIS_ERRORS):
                self.pending.settle([(str(user_id), pending_score)])
        out: dict[str, Any] = {"status": 202, "accepted": True, "recorded": "applied", "event_id": activity.event_id,
                               "user_id": user_id, "item_id": item_id,
                               "type": activity.type, "new_user": False, "n_ratings": row["n_ratings"],
                               "tenant": tenant,
                               "audit_id": audit_id.decode() if isinstance(audit_id, bytes) else str(audit_id),
                               "invalidation": "published" if published else "pending", "replica": self.replica,
                               "invalidated": ["user_features", "results"] if published else []}
        if not published:
            out["warning"] = ("Redis failed after the push: the invalidation is recorded and will be retried "
                              "until every replica has it; this user's old answers may be served until then")
        return out

    def invalidate_users(self, m: RecsModel, user_ids: list[int]) -> bool:
        """Move the users' generations (cached results unreachable, no tier takes or serves an
        older row), then drop their feature copies everywhere. True only when both reached
        everyone."""
        try:
            if m.users.tiered.generations is None:
                # feast-only (no tiers to guard): the generation still keys the cached results
                pipe = self.redis.pipeline(transaction=False)
                for u in user_ids:
                    pipe.incr(m.keys.generation(u))  # the name the request path reads
                pipe.execute()
            ok = m.users.invalidate(user_ids, bump=True)
        except CACHE_ERRORS as exc:
            log.warning("invalidation of users %s not published yet: %s", user_ids[:5], exc)
            return False
        if not ok:
            log.warning("invalidation of users %s not published yet", user_ids[:5])
        return ok

    def invalidate_users_of(self, members: list[str]) -> bool:
        with self.models.lease() as m:
            return self.invalidate_users(m, [int(u) for u in members])


def acquire_event_lock(client: redis.Redis, user_id: int) -> Lock:
    """The user's event lock, held; NotNow when another event holds it or Redis fails.

    The token is ours before the SET NX is sent: on a slow Redis the SET may run and only its reply
    be lost, and a lock taken under a token nobody knows stays held for EVENT_LOCK_TIMEOUT_S (every
    event of the user meanwhile waits EVENT_LOCK_WAIT_S, then is queued). On a Redis error the
    lock is released by that token: deleted only if it holds ours (a compare-and-delete, never
    another event's lock). It is EVAL, not the lock's cached EVALSHA: on a server that never ran
    the script, an EVALSHA whose NOSCRIPT reply is lost too would leave the lock behind."""
    lock = client.lock(event_lock_key(user_id), timeout=EVENT_LOCK_TIMEOUT_S, blocking_timeout=EVENT_LOCK_WAIT_S)
    token = secrets.token_hex(EVENT_LOCK_TOKEN_BYTES)
    try:
        if not lock.acquire(token=token):
            raise NotNow(f"another event of user {user_id} is still being recorded")
    except REDIS_ERRORS as exc:
        # Best effort, and never another event's lock. On a stalled server it waits behind the
        # SET and runs after it; if it never arrives, the lock's timeout frees the key as before.
        with contextlib.suppress(*REDIS_ERRORS):
            client.eval(_RELEASE_IF_OURS, 1, event_lock_key(user_id), token)
        raise NotNow("Redis is unreachable") from exc
    return lock


def _unknown_item(m: RecsModel, item_id: int) -> dict[str, Any]:
    return {"status": 404, "message": f"item_id {item_id} is not in the catalogue of model version {m.version}; "
                                      "events must name a known item"}
