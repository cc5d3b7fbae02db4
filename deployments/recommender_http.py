"""`RecommenderHTTP`: the Recommender answering `POST /v1/recommendations` itself, one Serve hop.

Through the Ingress a recommendation takes two hops: Serve's proxy -> Ingress -> Recommender. This
deployment is the same Recommender (deployments/recommender.py) with a FastAPI route, deployed
as its own Serve application at `/v1/recommendations` (`build_recs_app`, the configs' `recs`
application), so the proxy hands the request straight to the replica that holds the index and
the feature tiers. The route keeps everything the Ingress's route gives a client: the body limit,
API keys (or loopback only), the same 401/413/422 bodies (deployments/http_guards.py), the request
metrics, `sources` dropped when tenants are configured, and an answer (maybe the fallback list)
within `answer_within_s` of the replica taking the request. Before that the request waits in
Serve's proxy, which answers for itself (plain text): a 503 past the configs'
`max_queued_requests`, a 408 past `request_timeout_s`.

The price (docs/architecture.md): whichever process serves HTTP, Serve's proxy answers 500 for the
requests it held when it dies (ray-project/ray#47219). Through the Ingress, a Recommender replica
that dies mid-request is asked again on another one; here its in-flight requests get the 500.
`recommendations_app: null` keeps the two-hop route.

Events, stats and reloads still come through the Ingress, which reaches this application's
replicas by name (`AppSettings.recommendations_app`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from ray import serve
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments import http_guards
from deployments.config import AppSettings
from deployments.recommender import Recommender
from deployments.schemas import RecommendationRequest

log = logging.getLogger("tierserve.recommender")

# Where the configs deploy it: Serve's proxy routes by the longest matching prefix, so this
# application takes `/v1/recommendations` and the Ingress (at `/`) keeps every other route.
RECS_ROUTE_PREFIX = "/v1/recommendations"


class PrefixIsTheRoute:
    """Serve hands a request over with its application's prefix as `root_path`, so
    `/v1/recommendations` reaches the app as the route path "" (and FastAPI allows no route "" on
    a Serve ingress). Take it as "/": without this, Starlette answers it with a 307 to
    `/v1/recommendations/`, and a client would send its POST twice."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("root_path") and scope["path"] == scope["root_path"]:
            scope = {**scope, "path": scope["path"] + "/", "raw_path": scope["path"].encode() + b"/"}
        await self.app(scope, receive, send)


recs_api = FastAPI(title="tierserve recommendations", version="0.1.0",
                   description="POST /v1/recommendations, answered by the Recommender replica itself")
http_guards.install(recs_api)
recs_api.add_middleware(PrefixIsTheRoute)


@serve.deployment(name="Recommender", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(recs_api)
class RecommenderHTTP(Recommender):
    def __init__(self, settings: dict[str, Any]) -> None:
        app = AppSettings.model_validate(settings)
        super().__init__(app.redis, app.state_dir, app.recommender.model_dump())
        self.gate = http_guards.Gate(app)
        here = serve.get_replica_context().app_name
        if here != app.recommendations_app:
            # Legitimate for a twin (a benchmark's Feast-only arm, a test's keyed copy); in a
            # deployment it means the Ingress's events, stats and bumps go to another application.
            log.warning("this recommendations application is '%s' but `recommendations_app` names '%s': the "
                        "Ingress does not reach these replicas for events, stats and version bumps",
                        here, app.recommendations_app)

    @recs_api.post("/")
    async def recommendations(self, body: RecommendationRequest, request: Request) -> Any:
        started = time.perf_counter()
        tenant = self.gate.tenant(request)
        try:
            result = await self._answer(body.user_id, body.k, tenant)
        except Exception as exc:  # noqa: BLE001 - a defect on the path: a 503 that says so, never a 500
            log.exception("recommendation for user %s failed", body.user_id)
            result = {"status": 503, "message": f"the recommender failed while answering ({type(exc).__name__}); "
                                                "retry shortly"}
        return http_guards.recommendation_response(result, auth_enabled=self.gate.auth_enabled, started=started)

    async def _answer(self, user_id: int, k: int, tenant: str) -> dict[str, Any]:
        """`Recommender.recommend` without a thread blocked on the answer: the event loop waits
        for the answer thread, so one replica serves `max_ongoing_requests` at once."""
        future = self._answers.submit(self._recommend_leased, user_id, k, tenant)
        try:
            # On the deadline wait_for cancels the wrapped future, which cancels the answer only if
            # it has not started (a running one finishes in its thread, as in `recommend`).
            return await asyncio.wait_for(asyncio.wrap_future(future), self.settings.answer_within_s)
        except TimeoutError:
            # off the event loop: the fallback reads this replica's event queue (SQLite)
            return await asyncio.to_thread(self._too_late, future, user_id, k)
        except asyncio.CancelledError:
            future.cancel()  # the client hung up: an answer still queued is never computed
            raise

