"""Recommender deployment: features through the tiered cache, candidates from FAISS.

Per request: one Redis round trip (the user's generation, the unknown-user memo, items rated
since the pipeline) -> result cache (user, model version, k, user generation) -> the user's
features through the TieredCache -> FAISS inner-product search over item embeddings -> drop items
already rated -> a vectorised score over the candidates' features, which come with the model
version in process (`RecsModel.item_table`, in every arm) -> top-k. What one model version
needs (index, feature caches) is a `RecsModel` (deployments/recommender_model.py).

Model versions: every replica follows the version in Redis (caches/versions.py): each request
reads it through ModelVersions' 0.5 s cache, and a watcher thread checks it when the replica is
idle. A new version's caches are built beside the old ones and swapped in; the old ones close
when their last in-flight request ends (`Leased`). `reload` (the admin route's call) does the same.

Events (`record_event`, allowed to the tenants the Ingress lets through: see docs/api.md) are
applied, or queued on the replica's disk and applied later, by deployments/recommender_events.py.

Bounded memory: results have their own byte budget (`result_max_bytes`), cold-start answers are
not result-cached, unknown user ids are remembered for `unknown_user_ttl_s` (per generation, so
an event of that user makes the memo stale at once), feature entries carry a TTL.

Failure: no dependency failure becomes a 5xx for a valid request. Feast unreachable -> answers
from what the tiers hold (`degraded: true`); Redis unreachable or failing (OOM, BUSY, script
errors) -> no result cache, features from Feast first, then SSD (degraded). When nothing usable is
held, or the personal answer is not ready within `answer_within_s` (a slow dependency), the answer
is the fallback list: the popular items the user has not rated, `degraded: true` and `fallback`
saying why. An event that cannot be applied now (Redis or Feast down, slow or busy) is queued on
the replica's disk (feature_store/journal.py) and answered 202 `"recorded": "queued"`; the
watcher applies queued events in order when they answer again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from caches.redis_client import REDIS_ERRORS, make_client, restarted, run_ids
from caches.tiered import claim_dir, reclaim_dead_dirs
from caches.versions import Leased, ModelVersions
from deployments import metrics
from deployments.config import RecommenderSettings
from deployments.recommender_events import EventRecorder
from deployments.recommender_keys import RatedMemo, read_user, remember_unknown
from deployments.recommender_model import CACHE_ERRORS, ItemIndex, RecommendationResults, RecsModel
from feature_store.events import Activity, EventRejected, UserActivityWriter, client_event_id
from feature_store.journal import EventJournal
from feature_store.pipeline import RepoInfo

__all__ = ["ItemIndex", "Recommender", "RecommenderDeployment"]  # ItemIndex: its home moved to recommender_model

log = logging.getLogger("tierserve.recommender")

RECS_MODEL = "recs"
# Score = embedding affinity + small nudges from features the embedding does not see: a well-rated
# item and one in the user's favourite genres rank slightly higher among near-equal candidates.
W_MEAN_RATING = 0.10
W_GENRE = 0.10
# Candidates per request: at least this many times k, so a large k still has enough left after
# the filters (and a larger k really asks the feature tiers for more items).
CANDIDATES_PER_K = 4
# A version whose load failed (missing files, disk full) is tried again after this long.
FAILED_LOAD_RETRY_S = 30.0
ROCKSDB_PREFIX = "recommender-"
JOURNAL_PREFIX = "recommender-"
# Threads that compute answers under the replica's answer deadline (one per ongoing request).
ANSWER_THREADS = 32


class Recommender:
    """One replica's recommendation path, called through a DeploymentHandle (the Ingress's) or,
    as `RecommenderHTTP`, over HTTP straight from Serve's proxy."""

    def __init__(self, redis_url: str, state_dir: str, settings: dict[str, Any]) -> None:
        self.settings = RecommenderSettings.model_validate(settings)
        self.repo = Path(self.settings.feast_repo)
        self.redis = make_client(redis_url)
        self.redis_url = redis_url
        self.results = RecommendationResults(self.redis, default_ttl_s=self.settings.result_ttl_s,
                                             max_bytes=self.settings.result_max_bytes,
                                             tenant_max_bytes=self.settings.result_tenant_max_bytes)
        self.replica = serve.get_replica_context().replica_id.unique_id
        # Directories are named by replica id: a restarted replica gets a new one. Claim ours,
        # then give back the space of replicas that are gone (before opening any RocksDB here).
        rocksdb_parent = Path(state_dir) / "rocksdb"
        self.rocksdb_root = rocksdb_parent / f"{ROCKSDB_PREFIX}{self.replica}"
        self._owner = claim_dir(self.rocksdb_root)
        for gone in reclaim_dead_dirs(rocksdb_parent, prefix=ROCKSDB_PREFIX, keep=self.rocksdb_root):
            log.info("reclaimed the RocksDB directory of a dead replica: %s", gone)
        # Events accepted while a dependency was down wait here (feature_store/journal.py); a dead
        # replica's queue is adopted, not dropped.
        journal_parent = Path(state_dir) / "journal"
        journal_dir = journal_parent / f"{JOURNAL_PREFIX}{self.replica}"
        self._journal_owner = claim_dir(journal_dir)
        self.journal = EventJournal(journal_dir)
        for gone in reclaim_dead_dirs(journal_parent, prefix=JOURNAL_PREFIX, keep=journal_dir,
                                      salvage=self.journal.adopt):
            log.info("adopted the queued events of a dead replica: %s", gone)
        self._answers = ThreadPoolExecutor(max_workers=ANSWER_THREADS, thread_name_prefix="recs-answer")
        info = RepoInfo.load(self.repo)
        self.versions = ModelVersions(self.redis, {RECS_MODEL: info.model_version})
        self.writer = UserActivityWriter(self.repo)
        self._reload_lock = threading.Lock()
        self._builds = 0
        self._redis_run_ids: dict[str, str] = {}  # server (a cluster: each primary) -> its run id
        self._failed: dict[str, float] = {}  # version -> when its failed load may be tried again
        self.models: Leased[RecsModel] = Leased(self._build(self.versions.current(RECS_MODEL), info),
                                                 lambda m: m.close(remove_files=True))
        self.events = EventRecorder(self.redis, self.writer, self.journal, self.models, self.replica,
                                    within_s=self.settings.event_within_s)
        self.rated_memo = RatedMemo()
        self._warm_up(info)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="recs-watch", daemon=True)
        self._watcher.start()

    def _warm_up(self, info: RepoInfo) -> None:
        """One read of each feature view and of the event writer's store before taking traffic:
        Feast's first use imports it and opens the registry (7-11 s on 2 cores), which the first
        requests after a (re)start would otherwise wait out, past the Ingress's deadline (seen in
        benchmarks/fault_matrix.py's replica_kill row). Best effort: a dependency that is down
        now is the requests' business, not a reason to fail the replica."""
        users, items = info.user_ids_sample[:1], info.popular_items[:1]
        with self.models.lease() as m:
            for cache, ids in ((m.users, users), (m.items, items)):
                with contextlib.suppress(Exception):
                    cache.get(ids)
        if users:
            with contextlib.suppress(Exception):
                self.writer.current_row(users[0])

    def _build(self, version: str, info: RepoInfo | None = None) -> RecsModel:
        self._builds += 1  # each build its own SSD directory: the one it replaces may still be open
        return RecsModel(self.settings, info or RepoInfo.load(self.repo), version=version, slot=self._builds,
                         redis_url=self.redis_url, rocksdb_root=self.rocksdb_root)

    @property
    def model_version(self) -> str:
        return self.models.current.version

    # -------------------------------------------------------- version watch
    def _follow(self, version: str, *, force: bool = False) -> bool:
        """Serve `version` from now on (no-op when already there unless `force`); one reload at a
        time. A load that fails leaves the current version serving: a bad bump is not an outage."""
        with self._reload_lock:
            if version == self.models.current.version and not force:
                return True
            if not force and self._failed.get(version, 0.0) > time.monotonic():
                return False  # failed moments ago: requests must not each pay for a doomed load
            try:
                new = self._build(version)
            except Exception:
                log.exception("loading model version %s failed; still serving %s", version, self.models.current.version)
                self._failed[version] = time.monotonic() + FAILED_LOAD_RETRY_S
                return False
            old = self.models.swap(new)
            log.info("model version %s -> %s", old.version, version)
            return True

    def _follow_current(self) -> None:
        version = self.versions.current(RECS_MODEL)  # cached 0.5 s: almost always no round trip
        if version != self.models.current.version:
            self._follow(version)

    def _check_redis_restart(self) -> None:
        """A Redis that came back empty lost the pending-invalidation records and the generations
        with everything else: this replica's SSD copies of user rows may then be stale for good
        (and a read may already have promoted one into the new, empty RAM). So when a server's
        run id changes (on a cluster: any primary's, it held a slice of the records and counters),
        drop every user row this replica holds, here and in RAM; Feast still has them all."""
        now = run_ids(self.redis)
        gone = restarted(self._redis_run_ids, now)
        if gone:
            with self.models.lease() as m:
                ssd = m.users.tiered.ssd
                keys = list(ssd.keys()) if ssd is not None else []  # noqa: SIM118 (a method)
                if not m.users.tiered.invalidate(keys, broadcast=False):
                    return  # RAM unreachable again: retry on the next tick, run ids not taken
            # Results computed from such a row in the moment before this check: gone too. Entries
            # only (`recs.{<tenant>}:...`, the tenant the hash tag): `recs.__meta.{<tenant>}:...`
            # holds each tenant's hit/miss counters and budget books, which must outlive a purge.
            self.results.delete_prefix(f"{RecommendationResults.NAMESPACE}.{{")
            log.warning("Redis restarted (%s): dropped %d user rows", ", ".join(gone), len(keys))
        self._redis_run_ids.update(now)

    def _watch(self) -> None:
        while not self._stop.wait(self.settings.watch_interval_s):
            # Two independent duties: queued events need Feast and Redis, the rest Redis only.
            for duty in (self._watch_redis, self.events.replay_queued):
                try:
                    duty()
                except CACHE_ERRORS as exc:  # Redis down: the next tick retries
                    log.debug("watch tick skipped: %s", exc)
                except Exception:
                    log.exception("recommender watch tick failed")

    def _watch_redis(self) -> None:
        self._check_redis_restart()
        self._follow_current()
        self.events.pending.sweep(self.events.invalidate_users_of)

    def __del__(self) -> None:
        self._stop.set()

    # ----------------------------------------------------------- rated items
    def _seen(self, m: RecsModel, user_id: int, rated_since: set[bytes] | None = None, *,
              ask_redis: bool = True) -> set[int]:
        """Items the user rated: the pipeline's, plus those rated by events since (a Redis set,
        read here unless the caller fetched it already, and what this replica learned of them
        before: `rated_memo`, all there is when Redis is not asked), plus those of events queued
        here (not applied yet, but the user said so: no answer of ours should offer them again)."""
        seen = set(m.rated.get(user_id, ()))
        if rated_since is None and ask_redis:
            with contextlib.suppress(*REDIS_ERRORS):
                rated_since = self.redis.smembers(m.keys.rated(user_id))
        if rated_since:
            self.rated_memo.add(user_id, rated_since)
        return seen | self.rated_memo.get(user_id) | self.journal.items_of(user_id)

    # ----------------------------------------------------------- recommend
    def recommend(self, user_id: int, k: int, tenant: str) -> dict[str, Any]:
        """The personal answer if it is ready within `answer_within_s`, else the fallback list.

        Why a deadline here and not only the Ingress's: a slow Redis or Feast makes every call of
        the path wait out its timeout, and a dozen of them pass the Ingress's deadline, which can
        only answer 503. Here the replica still has something true to say: the popular items the
        user has not rated (`degraded: true`, `fallback` says why). The late answer finishes in
        its thread (it may still fill the caches) and is dropped."""
        future = self._answers.submit(self._recommend_leased, user_id, k, tenant)
        try:
            return future.result(timeout=self.settings.answer_within_s)
        except FutureTimeout:
            return self._too_late(future, user_id, k)

    def _too_late(self, future: Future[dict[str, Any]], user_id: int, k: int) -> dict[str, Any]:
        """The fallback list for an answer that missed `answer_within_s`."""
        future.cancel()  # still queued behind slow ones: never start it (a backlog would only grow)
        log.warning("recommendation for user %s not ready within %.1fs: fallback list", user_id,
                    self.settings.answer_within_s)
        with self.models.lease() as m:  # the deadline is spent: no Redis call for the rated filter
            return self._fallback(m, user_id, k, "the answer was not ready within "
                                  f"{self.settings.answer_within_s:g}s (a slow dependency)", ask_redis=False)

    def _recommend_leased(self, user_id: int, k: int, tenant: str) -> dict[str, Any]:
        with contextlib.suppress(*CACHE_ERRORS):
            self._follow_current()  # Redis down: keep serving the version we have
        with self.models.lease() as m:
            try:
                return self._recommend(m, user_id, k, tenant)
            except CACHE_ERRORS as exc:
                # The last line of defence: a Redis failure the paths below did not absorb is a
                # dependency failure: the fallback list, never a 500.
                log.warning("recommendation for user %s failed on the cache: %s", user_id, exc)
                return self._fallback(m, user_id, k, "the cache store failed while answering")

    def _recommend(self, m: RecsModel, user_id: int, k: int, tenant: str) -> dict[str, Any]:
        key, gen, unknown, rated = None, None, False, None
        try:
            # One round trip: the user's generation, the "Feast does not know them" memo and the
            # items rated by events since the pipeline ran (deployments/recommender_keys.py).
            state = read_user(self.redis, m.keys, m.key_version, user_id, self.settings.feature_ttl_s)
            rated = self._seen(m, user_id, state.rated_since)
            gen, unknown = state.generation, state.unknown
            if self.settings.result_cache and not unknown:
                payload = {"user": user_id, "k": k, "gen": gen}
                key = self.results.key(tenant=tenant, model=RECS_MODEL, version=m.key_version, payload=payload)
                hit = self.results.get(key)
                if hit is not None:
                    return {**json.loads(hit), "cached": True, "replica": self.replica}
        except CACHE_ERRORS:
            key = None
        if unknown:
            return self._cold_start(m, user_id, k, rated)
        answer = self._compute(m, user_id, k, gen, rated)
        if answer.get("cold_start") and gen is not None:
            # Feast does not know this user: remember it briefly (an event moves `gen`, which
            # makes the memo stale at once), and keep cold-start lists out of the result budget.
            with contextlib.suppress(*REDIS_ERRORS):
                remember_unknown(self.redis, m.keys, m.key_version, user_id, gen, self.settings.unknown_user_ttl_s)
        elif key is not None and answer.get("status", 200) == 200 and not answer["degraded"]:
            with contextlib.suppress(*CACHE_ERRORS):
                self.results.put(key, json.dumps(answer).encode())
        return answer

    def _base(self, m: RecsModel, user_id: int) -> dict[str, Any]:
        return {"user_id": user_id, "model_version": m.version, "cached": False, "replica": self.replica}

    def _cold_start(self, m: RecsModel, user_id: int, k: int, rated: set[int] | None = None) -> dict[str, Any]:
        seen = self._seen(m, user_id) if rated is None else rated
        items = [{"item_id": i, "score": round(s, 6)} for i, s in islice(((i, s) for i, s in m.popular if i not in seen), k)]
        return {**self._base(m, user_id), "items": items, "cold_start": True, "degraded": False,
                "sources": {"user": None, "items": {}}}

    def _fallback(self, m: RecsModel, user_id: int, k: int, why: str, *, rated: set[int] | None = None,
                  ask_redis: bool = True) -> dict[str, Any]:
        """The popular items the user has not rated, when their personal answer cannot be had (a
        dependency down or too slow): a degraded answer, never a 5xx for a valid request. The
        rated filter uses what is known here: the pipeline's ratings, the events' (Redis, unless
        the caller's deadline is spent), and the events queued on this replica."""
        if rated is None:
            rated = self._seen(m, user_id, ask_redis=ask_redis)
        items = [{"item_id": i, "score": round(s, 6)} for i, s in islice(((i, s) for i, s in m.popular if i not in rated), k)]
        return {**self._base(m, user_id), "items": items, "cold_start": False, "degraded": True,
                "fallback": {"kind": "popular", "reason": why}, "sources": {"user": None, "items": {}}}

    def _compute(self, m: RecsModel, user_id: int, k: int, gen: int | None,
                 rated: set[int] | None = None) -> dict[str, Any]:
        # Read-your-writes on every replica, before the stream's drop reaches it: the tiers serve
        # only a row of the generation read above (the one the result is keyed on), so a copy
        # from before an event is a miss here at once.
        user = m.users.get([user_id], {user_id: gen} if gen is not None else None)
        if user_id not in user.features:
            if user.degraded:
                return self._fallback(m, user_id, k, "the feature store is unreachable and this user's features "
                                      "are not cached on any tier", rated=rated)
            return self._cold_start(m, user_id, k, rated)

        feats = user.features[user_id]
        u_emb = np.asarray(feats["embedding"], dtype=np.float32)
        affinity = np.asarray(feats.get("genre_affinity") or [], dtype=np.float32)
        seen = self._seen(m, user_id) if rated is None else rated
        # The row's own list: what events rated, kept in Feast, so a Redis that lost its set of
        # the same items (restarted empty) never brings them back into the answer.
        since_build = feats.get("rated_since_build") or ()
        if since_build:
            self.rated_memo.add(user_id, since_build)
        seen = seen | {int(x) for x in since_build}
        ranked = m.top_k(u_emb, affinity, seen, k, max(self.settings.candidates, CANDIDATES_PER_K * k),
                         w_mean_rating=W_MEAN_RATING, w_genre=W_GENRE)
        degraded = user.degraded or ranked.degraded
        if not ranked.ids.size and degraded:
            return self._fallback(m, user_id, k, "the feature store is unreachable and none of this user's "
                                  "candidate items' features are cached", rated=seen)
        items = [{"item_id": int(i), "score": round(float(s), 6)}
                 for i, s in zip(ranked.ids, ranked.scores, strict=True)]
        return {
            **self._base(m, user_id), "items": items, "cold_start": False, "degraded": bool(degraded),
            # Which tier answered, like the chat route's x-cache: the operator's first question.
            "sources": {"user": user.sources.get(user_id), "items": ranked.sources},
            "user_activity": {"n_ratings": feats.get("n_ratings"), "last_ts": feats.get("last_ts")},
        }

    # -------------------------------------------------------------- events
    def record_event(self, event: dict[str, Any], tenant: str = "-", idempotency_key: str | None = None) -> dict[str, Any]:
        """`tenant`: who sent it (the Ingress checked the right), kept in the audit entry.
        `idempotency_key`: the client's, as sent; its retries of the event are applied once."""
        try:
            activity = Activity.parse(event)
            activity = dataclasses.replace(activity, event_id=client_event_id(tenant, idempotency_key, activity))
        except EventRejected as exc:
            return {"status": exc.status, "message": exc.message}
        with contextlib.suppress(*CACHE_ERRORS):
            self._follow_current()
        with self.models.lease() as m:
            outcome = self.events.record(m, activity, tenant)
        if activity.type == "rating" and outcome.get("status") in (200, 202):
            self.rated_memo.add(activity.user_id, [activity.item_id])  # queued too: the user said so
        return outcome

    # ---------------------------------------------------------- operations
    def reload(self, version: str | None = None) -> str:
        """Serve `version` (a no-op when this replica already follows it: the admin route calls
        this on one replica after the bump, which every replica picks up by itself anyway), or,
        with no version, load the repo again: new caches swapped in, the old ones closed when
        their last request ends."""
        self._follow(version or self.versions.current(RECS_MODEL), force=version is None)
        return self.models.current.version

    def stats(self) -> dict[str, Any]:
        with self.models.lease() as m:
            out: dict[str, Any] = {
                "model_version": m.version, "items_indexed": m.index.size, "replica": self.replica,
                "tiers": self.settings.tiers, "result_cache": self.settings.result_cache,
            }
            for name, cache in (("user_features", m.users), ("item_features", m.items)):
                out[name] = dataclasses.asdict(cache.tiered.stats())
        with contextlib.suppress(*CACHE_ERRORS):
            out["pending_invalidations"] = self.events.pending.count()
        out["queued_events"] = self.journal.count()
        # The recommendation result cache has budgets of its own (result_max_bytes, per tenant):
        # its hits, bytes and evictions, per tenant like the chat cache's (a gap when Redis is down).
        out["results"] = self.results.stats()
        return out

    def metrics_text(self) -> tuple[str, bytes]:
        return metrics.replica_exposition()


# Called by the Ingress through a handle (the two-hop route, and events, stats, reloads).
RecommenderDeployment = serve.deployment(name="Recommender", max_ongoing_requests=32,
                                         ray_actor_options={"num_cpus": 0.25})(Recommender)
