"""Ingress: the FastAPI app: routes, auth, schemas, and the recommendation and admin routes.

Chat goes through :class:`deployments.chat.ChatPath`: exact result cache (one Redis GET, done here
to save a hop) -> Encoder -> SemanticCache -> single flight -> LLM; legacy completions through
:class:`deployments.completions.CompletionPath` (the same flow, exact only). Redis down never fails
a request: the LLM answers with `x-cache: bypass`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from caches.coalesce import Coalescer
from caches.lookup_counts import SharedLookupCounts
from caches.redis_client import REDIS_ERRORS, make_async_client, make_client
from caches.result import CacheUnavailable, ResultCache
from caches.tenancy import ADMIN_SENDER, AdminKeys, Forbidden, tenant_view
from caches.versions import ModelVersions, purge_in_background
from deployments import http_guards, metrics
from deployments.cached_route import ModelUnavailable
from deployments.chat import ChatPath
from deployments.completions import CompletionPath
from deployments.config import AppSettings
from deployments.openai_compat import error_body
from deployments.openai_surface import embeddings_response, model_card, model_not_found
from deployments.schemas import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    EventRequest,
    RecommendationRequest,
    VersionBump,
)

log = logging.getLogger("tierserve.ingress")
app = FastAPI(title="tierserve", version="0.1.0", description="Ray Serve app with result, semantic, KV and tiered feature caches")

RECS_MODEL = "recs"
# /healthz waits this long for Redis's PONG: it must answer fast whatever Redis does, and a
# loopback PING takes ~0.1 ms, so a miss means "slow", not "the app is down".
HEALTH_REDIS_DEADLINE_S = 0.25
# The Ingress' Redis calls (exact cache, versions, single flight) sit on every request's path:
# shorter than the library default, so a slow Redis costs a request at most this before a bypass.
INGRESS_REDIS_TIMEOUT_S = 0.5
# A recommendation is answered (maybe degraded) or refused within this long. Each of the
# Recommender's Redis calls is bounded by the client's timeout, but a request makes a dozen: with
# Redis stalling for 1 s at a time one took 11 s (tests/e2e/test_slow_redis.py). Past the
# deadline: 503 with a message; the replica's late answer is dropped.
RECOMMEND_DEADLINE_S = 10.0
# An event is answered by the replica within `recommender.event_within_s` (applied, or queued on
# its disk); this deadline is for a replica that cannot answer at all (its threads all stuck).
EVENT_DEADLINE_S = 10.0
# A failed lookup of the recommendations application's Recommender is not repeated for this long:
# each asks Serve's controller, and every event, stats page and /metrics would ask again.
RECS_LOOKUP_RETRY_S = 5.0
IDEMPOTENT = ("recommend",)  # asked again once after a replica failure; an event is never sent twice
RECOMMENDER_RETRY = {
    "recommend": "retry shortly",
    # The replica may have died after the push: the rating may be recorded already. The client's
    # key makes the retry the same event (docs/api.md), so it is applied once either way.
    "record_event": "the event may or may not have been recorded: send it again with the same Idempotency-Key "
                    "header and it is applied once (without one, check the `user_activity` of a recommendation for the user first)",
}


http_guards.install(app)


class RecommenderMissing(Exception):
    """The `recommendations_app` application's Recommender cannot be found (not deployed yet)."""

    def __init__(self, app_name: str | None) -> None:
        super().__init__(f"the recommendations application '{app_name}' is not deployed (yet)")


def _unavailable(deployment: str, exc: BaseException) -> dict[str, Any]:
    log.warning("%s stats failed: %s: %s", deployment, type(exc).__name__, exc)
    return {"status": "unavailable"}


@serve.deployment(name="Ingress", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        settings: dict[str, Any],
        encoder: DeploymentHandle,
        semantic: DeploymentHandle,
        llm: DeploymentHandle,
        recommender: DeploymentHandle | None = None,
    ) -> None:
        self.settings = AppSettings.model_validate(settings)
        if recommender is None and self.settings.recommendations_app is None:
            raise ValueError("the Ingress needs a Recommender: bind one, or name the Serve application "
                             "that serves the recommendations in `recommendations_app`")
        self.encoder, self.semantic, self.llm = encoder, semantic, llm
        self._recommender = recommender
        self._lookup_lock = asyncio.Lock()
        self._lookup_again_at = 0.0
        # fail fast (0.5 s) and never re-send on its own: a write whose reply was lost ran once
        self.redis = make_client(self.settings.redis, socket_timeout_s=INGRESS_REDIS_TIMEOUT_S,
                                 connect_timeout_s=INGRESS_REDIS_TIMEOUT_S)
        cache = self.settings.cache
        self.results = ResultCache(
            self.redis, default_ttl_s=cache.result_ttl_s, max_bytes=cache.result_max_bytes,
            max_entries=cache.result_max_entries, tenant_max_bytes=cache.result_tenant_max_bytes,
            tenant_max_entries=cache.result_tenant_max_entries,
        )
        self.gate = http_guards.Gate(self.settings)
        self.admins = AdminKeys(self.settings.admin_keys) if self.settings.admin_keys else AdminKeys.from_env()
        metrics.TENANT_LABELS = self.settings.metrics_tenant_labels
        # /v1/cache/stats shows every replica's lookups, not the share this replica answered
        metrics.share_lookups(SharedLookupCounts(self.redis))
        llm_cfg = self.settings.llm
        self.model_name = llm_cfg.served_model_name
        self.versions = ModelVersions(self.redis, {self.model_name: llm_cfg.model_version})
        self._refreshing_version = False
        # asyncio client: single flight and the health probe wait for Redis without a thread
        self.aredis = make_async_client(self.settings.redis, socket_timeout_s=INGRESS_REDIS_TIMEOUT_S,
                                        connect_timeout_s=INGRESS_REDIS_TIMEOUT_S)
        # one single-flight table for both routes: their keys never collide (the route is hashed in)
        coalescer = Coalescer(self.aredis)
        self.chat = ChatPath(self.settings, self.results, self._version, encoder, semantic, llm, coalescer)
        self.completion = CompletionPath(self.settings, self.results, self._version, llm, coalescer)

    # ---------------------------------------------------------------- helpers
    async def _recommender_handle(self) -> DeploymentHandle:
        """The bound Recommender, or the `recommendations_app` application's, looked up by name on
        first use: the configs deploy both applications at once, in no set order, so it may not
        exist yet when this replica starts. The lookup asks Serve's controller (a blocking call:
        off the event loop, one at a time) and a failed one is not repeated for
        `RECS_LOOKUP_RETRY_S`; until it succeeds this raises `RecommenderMissing` and the caller
        answers 503 or leaves a gap in a page."""
        if self._recommender is not None:
            return self._recommender
        async with self._lookup_lock:
            if self._recommender is None:
                if time.monotonic() < self._lookup_again_at:
                    raise RecommenderMissing(self.settings.recommendations_app)
                try:
                    self._recommender = await asyncio.to_thread(
                        serve.get_deployment_handle, "Recommender", app_name=self.settings.recommendations_app)
                except Exception as exc:  # noqa: BLE001 - Serve says "not found" in several ways
                    self._lookup_again_at = time.monotonic() + RECS_LOOKUP_RETRY_S
                    raise RecommenderMissing(self.settings.recommendations_app) from exc
        return self._recommender

    async def _recs(self, method: str, *args: Any) -> Any:
        return await getattr(await self._recommender_handle(), method).remote(*args)

    async def _call(self, deployment: str, method: str) -> Any:
        """One argument-less call of a deployment's method; a handle that cannot be had yet
        raises here, inside the awaitable, where `gather(..., return_exceptions=True)` keeps it."""
        if deployment == "Recommender":
            return await self._recs(method)
        handles = {"Encoder": self.encoder, "SemanticCache": self.semantic, "LLM": self.llm}
        return await getattr(handles[deployment], method).remote()

    def _tenant(self, request: Request) -> str:
        return self.gate.tenant(request)

    def _version(self, model: str) -> str | None:
        """The model's version for cache keys, or None when Redis cannot confirm it now: the
        request is then answered uncached (caches/versions.py `confirmed` says why not a guess)."""
        try:
            return self.versions.confirmed(model)
        except Exception:  # noqa: BLE001 - Redis down or slow: unknown, never guessed
            return None

    def _background_refresh(self, model: str) -> None:
        if self._refreshing_version:
            return
        self._refreshing_version = True
        future = asyncio.get_running_loop().run_in_executor(None, self._version, model)
        future.add_done_callback(lambda _: setattr(self, "_refreshing_version", False))

    async def _recommender_call(self, what: str, call: Callable[[], Awaitable[Any]],
                                deadline_s: float | None = None) -> dict[str, Any]:
        """A Recommender answer, or a 503 saying why when the replica failed or died mid-request
        (Serve starts a new one) or missed the deadline: a dependency failure, never a 500."""
        started = time.monotonic()
        try:
            try:
                return dict(await asyncio.wait_for(call(), deadline_s))
            except (TimeoutError, RecommenderMissing):
                raise
            except Exception as exc:  # noqa: BLE001 - whatever Ray raises for a dead or failing replica
                if what not in IDEMPOTENT:
                    raise
                # A read: ask once more; Serve's router has dropped the dead replica, so this
                # reaches another one when there is one (else it waits for the replacement).
                log.warning("recommender %s failed (%s); asking again", what, type(exc).__name__)
                left = None if deadline_s is None else max(0.0, deadline_s - (time.monotonic() - started))
                return dict(await asyncio.wait_for(call(), left))
        except RecommenderMissing as exc:
            log.warning("recommender %s not sent: %s", what, exc)
            return {"status": 503, "message": f"{exc}: nothing was sent to it; retry shortly"}
        except TimeoutError:
            log.warning("recommender %s missed its %.0fs deadline", what, deadline_s)
            return {"status": 503, "message": f"the recommender did not answer within {deadline_s:g}s (a dependency "
                                              f"is slow); {RECOMMENDER_RETRY[what]}"}
        except Exception as exc:  # noqa: BLE001 - whatever Ray raises for a dead or failing replica
            log.warning("recommender %s failed: %s: %s", what, type(exc).__name__, exc)
            return {"status": 503, "message": f"the recommender failed while answering ({type(exc).__name__}); "
                                              f"{RECOMMENDER_RETRY[what]}"}

    # ------------------------------------------------------------------ chat
    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatRequest, request: Request) -> Any:
        return await self.chat.answer(body, request, self._tenant(request))

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        return await self.completion.answer(body, request, self._tenant(request))

    # ------------------------------------------------------ models, embeddings
    async def _model_cards(self) -> list[dict[str, Any]]:
        """The chat/completions model first (clients take data[0]), then the embedding model."""
        try:
            llm, enc = await asyncio.gather(self.llm.info.remote(), self.encoder.info.remote())
        except Exception as exc:  # noqa: BLE001 - whatever Ray raises for a failed replica: a 503, never a 500
            raise ModelUnavailable(f"a model replica failed to answer ({type(exc).__name__}); retry shortly") from exc
        # Informative here: the last version seen, refreshed in the background when old, so a
        # slow Redis never delays this route (chat requests refresh it on their own path).
        version, stale = self.versions.known(llm["id"])
        if stale:
            self._background_refresh(llm["id"])
        return [model_card(llm["id"], max_model_len=llm["max_model_len"], version=version),
                model_card(enc["name"], version=enc["version"], dimensions=enc["dim"])]

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._tenant(request)  # any tenant, but a tenant: a missing or unknown key is a 401
        return {"object": "list", "data": await self._model_cards()}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> Any:
        self._tenant(request)
        # `:path`: hub ids such as "Qwen/Qwen2.5-1.5B-Instruct" contain '/'.
        for card in await self._model_cards():
            if card["id"] == model_id:
                return card
        return JSONResponse(model_not_found(model_id), status_code=404)

    @app.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingRequest, request: Request) -> Any:
        tenant = self._tenant(request)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        try:
            info = await self.encoder.info.remote()
        except Exception as exc:  # noqa: BLE001 - whatever Ray raises for a failed replica
            raise ModelUnavailable(f"the embedding model is unavailable right now ({type(exc).__name__}); "
                                   "retry shortly") from exc
        if body.model not in (None, info["name"]):
            return JSONResponse(error_body(400, f"unknown embedding model '{body.model}'; use '{info['name']}'", "model"), status_code=400)
        if body.dimensions not in (None, info["dim"]):
            # OpenAI's text-embedding-3 models can shorten their vectors; MiniLM was not trained to.
            return JSONResponse(error_body(400, f"'{info['name']}' gives {info['dim']}-dimensional embeddings only: "
                                                f"omit dimensions or send {info['dim']} (got {body.dimensions})", "dimensions"),
                                status_code=400)
        try:
            vectors, tokens = await self.encoder.embed_for_api.remote(texts, tenant)
        except Exception as exc:  # noqa: BLE001 - a failed replica is a 503 that says so, as for chat
            raise ModelUnavailable(f"the embedding model failed to answer ({type(exc).__name__}); retry shortly") from exc
        return embeddings_response(info["name"], vectors, body.encoding_format, tokens)

    # ------------------------------------------------------- recommendations
    @app.post("/v1/recommendations")
    async def recommendations(self, body: RecommendationRequest, request: Request) -> Any:
        started = time.perf_counter()
        tenant = self._tenant(request)
        result = await self._recommender_call("recommend", lambda: self._recs("recommend", body.user_id, body.k, tenant),
                                              RECOMMEND_DEADLINE_S)
        return http_guards.recommendation_response(result, auth_enabled=self.gate.auth_enabled, started=started)

    def _event_sender(self, request: Request) -> str:
        """Who may send events: the admin key, or a tenant in `recommender.event_tenants`
        (401 without a valid key, 403 with one that lacks the right); the name goes in the audit."""
        if self.admins.is_admin(request.headers.get("authorization")):
            return ADMIN_SENDER
        tenant = self._tenant(request)
        if tenant not in self.settings.recommender.event_tenants:
            raise Forbidden(f"tenant '{tenant}' may not send events: user ids are shared by every tenant of this "
                            "deployment, so an event changes what all of them are recommended for that user. Events "
                            "need the admin key, or a tenant listed in the `recommender.event_tenants` setting: ask "
                            f"the operator to add '{tenant}' there")
        return tenant

    @app.post("/v1/events", status_code=202)
    async def events(self, body: EventRequest, request: Request) -> Any:
        started = time.perf_counter()
        sender = self._event_sender(request)
        key = request.headers.get("idempotency-key")
        result = await self._recommender_call(
            "record_event", lambda: self._recs("record_event", body.model_dump(), sender, key),
            EVENT_DEADLINE_S)
        status = result.pop("status", 202)
        # the `cache` label says what became of the event: applied, queued, already_applied, none
        metrics.observe("events", str(result.get("recorded", "none")).replace(" ", "_"), status, started)
        if status >= 400:
            return JSONResponse(error_body(status, result["message"]), status_code=status,
                                headers={"retry-after": "2"} if status == 503 else None)
        return JSONResponse(result, status_code=202)

    # ------------------------------------------------------------ operations
    @app.get("/v1/cache/stats")
    async def cache_stats(self, request: Request) -> Any:
        admin = self.admins.is_admin(request.headers.get("authorization"))
        tenant = None if admin else self._tenant(request)
        try:
            exact = await asyncio.to_thread(self.results.stats)
        except (CacheUnavailable, *REDIS_ERRORS):  # any Redis error (a refused key too): a gap, never a 500
            exact = {"status": "unavailable"}
        # A replica that fails (or is being replaced) leaves a gap in the page, as Redis does above.
        semantic, recs = (part if isinstance(part, dict) else _unavailable(name, part) for name, part in zip(
            ("SemanticCache", "Recommender"),
            await asyncio.gather(self.semantic.stats.remote(), self._recs("stats"), return_exceptions=True),
            strict=True))
        lookups, scope = await asyncio.to_thread(metrics.lookups_by_tenant)
        if tenant is not None:
            return {**tenant_view(tenant, exact=exact, semantic=semantic, lookups=lookups,
                                  recommendations=recs.get("results")), "lookups_scope": scope}
        return {"exact": exact, "semantic": semantic, "recommender": recs, "lookups_by_tenant": lookups,
                "lookups_scope": scope}

    @app.post("/admin/models/{name:path}/version")
    async def bump_version(self, name: str, body: VersionBump, request: Request) -> Any:
        # `:path`: a served model name may be a hub id with '/' ("Qwen/Qwen2.5-1.5B-Instruct"),
        # which clients send as-is or as %2F (decoded before routing).
        self.admins.require(request.headers.get("authorization"))
        if name not in (self.model_name, RECS_MODEL):
            return JSONResponse(error_body(404, f"unknown model '{name}'; known: {self.model_name}, {RECS_MODEL}"), status_code=404)
        try:
            previous = await asyncio.to_thread(self.versions.bump, name, body.version)
        except (redis.RedisError, CacheUnavailable):
            return JSONResponse(error_body(503, "Redis is unreachable: version not changed, retry when it is back"), status_code=503)
        if name == RECS_MODEL:
            try:
                await self._recs("reload", body.version)
            except Exception as exc:  # noqa: BLE001 - whatever Ray raises for a failed replica
                # The version is in Redis already, and every replica follows it there on its own
                # (within a request or the watcher's next look): the reload only hurried one.
                log.warning("recs reload after the bump to %s failed (%s); the replicas follow the version in Redis",
                            body.version, type(exc).__name__)
                return {"model": name, "version": body.version, "previous": previous,
                        "warning": f"the version is stored, but asking a Recommender replica to load it now failed "
                                   f"({type(exc).__name__}); every replica loads it on its own within seconds"}
        elif previous != body.version:
            # Old entries carry the old version in their keys: unreachable already. The purge
            # only gives the memory back, so it runs after the answer.
            purge_in_background(self.results, None, name, previous)
            self.semantic.purge_model.remote(name, previous)
        return {"model": name, "version": body.version, "previous": previous}

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness: always fast. `redis` is `up`, `slow` (no PONG within the deadline) or `down`.
        The asyncio client waits without a thread: a slow Redis cannot queue this behind the
        cache calls (with a thread per ping it once waited 2.5 s behind them)."""
        try:
            await asyncio.wait_for(self.aredis.ping(), HEALTH_REDIS_DEADLINE_S)
            state = "up"
        except TimeoutError:
            state = "slow"
        except (*REDIS_ERRORS, OSError):  # a cluster's own errors too: "down", never a 500
            state = "down"
        return {"status": "ok", "redis": state}

    @app.get("/metrics")
    async def prometheus(self, request: Request) -> PlainTextResponse:
        """The answering replicas' own series (one replica per deployment, labelled with it): a
        page for humans and single-replica development. Prometheus scrapes every node's Ray
        metrics port instead, where each replica's series are complete (docs/operations.md).

        With API keys configured it needs the admin key: its totals (lookups of every tenant,
        with `metrics_tenant_labels` their names) are what `/v1/cache/stats` keeps from tenants."""
        if self.gate.auth_enabled:
            self.admins.require(request.headers.get("authorization"))
        parts: dict[str, tuple[str, bytes]] = {"Ingress": metrics.replica_exposition()}
        names = ("Encoder", "SemanticCache", "LLM", "Recommender")
        results = await asyncio.gather(*(self._call(n, "metrics_text") for n in names), return_exceptions=True)
        for name, part in zip(names, results, strict=True):
            if isinstance(part, tuple):
                parts[name] = part
        return PlainTextResponse(metrics.merge_expositions(parts), media_type="text/plain; version=0.0.4")
