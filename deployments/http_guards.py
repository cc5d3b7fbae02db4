"""What every deployment that answers HTTP applies around its routes: the body limit, who is
asking (API keys, or loopback only), and error bodies that say what to fix.

Two deployments answer HTTP: the Ingress (every route) and, when the recommendations have their
own Serve application (`AppSettings.recommendations_app`), the Recommender at
`/v1/recommendations` (deployments/recommender_http.py). Both install this module on their
FastAPI app, so a client gets the same 401, 413 or 422 from either.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from caches.tenancy import Forbidden, Tenants, Unauthorized
from deployments import metrics
from deployments.cached_route import ModelUnavailable
from deployments.config import AppSettings
from deployments.openai_compat import error_body


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class BodySizeLimit:
    """Reject oversized bodies while reading them: a declared Content-Length over the limit is
    refused before a byte is read, and a chunked upload is cut off as soon as it passes the limit
    (never buffered whole). Within the limit, the body is handed on unchanged."""

    max_bytes = 256 * 1024  # set from the config by `Gate` (one setting per process)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self._refuse(f"request body is {int(declared)} bytes; the limit is {limit} bytes: send less", send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(f"request body is over the limit of {limit} bytes: send less", send)
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only a disconnect can come

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(message: str, send: Send) -> None:
        response = JSONResponse(error_body(413, message), status_code=413)
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


# What to send instead, for the errors about the body as a whole: pydantic's own words ("Field
# required", "JSON decode error" at a character offset shown as a field) do not say what to fix.
BODY_MISSING = "the request needs a JSON object body: send one with Content-Type: application/json"
BODY_NOT_AN_OBJECT = ("the body must be a JSON object sent with Content-Type: application/json (a form or "
                      "text body, or a JSON array, string or number, is not one)")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) of the first problem, saying what to send instead."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    kind = first.get("type")
    if kind == "json_invalid":
        # loc is ("body", character offset): an offset, not a field
        offset = loc[1] if len(loc) > 1 else None
        reason = (first.get("ctx") or {}).get("error") or "not valid JSON"
        at = f" at character {offset}" if isinstance(offset, int) else ""
        return f"the body is not valid JSON: {reason}{at}", None
    if loc == ("body",) and kind == "missing":
        return BODY_MISSING, None
    if loc == ("body",) and kind in ("model_attributes_type", "dict_type", "model_type"):
        return BODY_NOT_AN_OBJECT, None
    where = ".".join(str(p) for p in loc if p != "body") or None
    msg = first.get("msg", "invalid value")
    return (f"{where}: {msg}" if where else msg) + (f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""), where


# The request counter's route label of each API path: a request refused before its route ran (a
# bad body, a missing key) is still a request of that route on the dashboard's error rate. Other
# paths (404s, probes) are not counted: their label would be whatever a client sends.
ROUTE_OF_PATH = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings",
                 "/v1/recommendations": "recommendations", "/v1/events": "events"}


def _count_refused(request: Request, status: int) -> None:
    # rstrip: the recs application sees `/v1/recommendations` as `/v1/recommendations/` (PrefixIsTheRoute)
    route = ROUTE_OF_PATH.get(request.url.path.rstrip("/"))
    if route is not None:
        metrics.observe(route, "none", status, time.perf_counter())


async def _on_unauthorized(request: Request, exc: Unauthorized) -> JSONResponse:
    _count_refused(request, 401)
    return JSONResponse(error_body(401, str(exc), err_type="authentication_error"), status_code=401)


async def _on_model_unavailable(request: Request, exc: ModelUnavailable) -> JSONResponse:
    return JSONResponse(error_body(503, str(exc)), status_code=503, headers={"retry-after": "5"})


async def _on_forbidden(request: Request, exc: Forbidden) -> JSONResponse:
    _count_refused(request, 403)
    return JSONResponse(error_body(403, str(exc), err_type="permission_error"), status_code=403)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _validation_message(exc)
    # OpenAI-compatible routes answer 400 like OpenAI does; the project's own routes answer 422
    # for a body that parses, and 400 for one that does not (as for the parse errors below).
    unparsed = any(e.get("type") == "json_invalid" for e in exc.errors())
    status = 400 if unparsed or request.url.path.startswith(("/v1/chat", "/v1/embeddings", "/v1/completions")) else 422
    _count_refused(request, status)
    return JSONResponse(error_body(status, message, param), status_code=status)


async def _on_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # FastAPI answers a body it cannot parse at all (not UTF-8, an integer over Python's 4,300
    # digits, nesting past its recursion limit) and unknown routes or methods with
    # `{"detail": ...}`; clients of this API read `{"error": {...}}` (also covers fastapi's
    # HTTPException, a subclass). Same status and headers (a 405's `Allow`).
    message = str(exc.detail)
    if message == "There was an error parsing the body":
        message += ": send a JSON object encoded as UTF-8 (integers of at most 4,300 digits, nested at most 64 levels)"
    return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers)


class Gate:
    """Who is asking: the tenant of an API key, or `default` on a keyless deployment, which then
    answers loopback clients only (`auth: auto`) or anyone (`auth: off`, behind a gateway)."""

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self.tenants = Tenants(settings.api_keys) if settings.api_keys else Tenants.from_env()
        BodySizeLimit.max_bytes = settings.max_body_bytes

    @property
    def auth_enabled(self) -> bool:
        return self.tenants.auth_enabled

    def tenant(self, request: Request) -> str:
        if not self.tenants.auth_enabled and self.settings.auth != "off":
            client = request.client.host if request.client else ""
            if not _is_loopback(client):
                # no API keys: the app is a laptop's, open on loopback only (see AppSettings.auth)
                raise Unauthorized("this server has no API keys configured, so it answers loopback clients only: "
                                   "configure TIERSERVE_API_KEYS (or `api_keys`), or set `auth: off` in the config")
        return self.tenants.resolve(request.headers.get("authorization"))


def recommendation_response(result: dict[str, Any], *, auth_enabled: bool, started: float) -> JSONResponse:
    """The HTTP answer for a Recommender result (its `status` popped: 200 unless it says otherwise),
    counted on the request metrics. Shared by both routes that serve recommendations."""
    status = result.pop("status", 200)
    metrics.observe("recommendations", "hit" if result.get("cached") else "miss", status, started)
    if auth_enabled:
        # Which tier held the user's row ("redis": read lately) is shared by every tenant: it
        # would tell one tenant that another asked about this user. A one-tenant (keyless)
        # deployment keeps it, for debugging and benchmarks; the tiers' hit counters are on
        # /metrics for the operator.
        result.pop("sources", None)
    if status != 200:
        return JSONResponse(error_body(status, result["message"]), status_code=status,
                            headers={"retry-after": "2"} if status == 503 else None)
    # Plain JSON types already: a JSONResponse skips FastAPI's jsonable_encoder walk of the items.
    return JSONResponse(result)


def install(app: FastAPI) -> None:
    """The body limit and the error handlers, on one FastAPI app."""
    app.add_middleware(BodySizeLimit)
    app.add_exception_handler(Unauthorized, _on_unauthorized)  # type: ignore[arg-type]
    app.add_exception_handler(ModelUnavailable, _on_model_unavailable)  # type: ignore[arg-type]
    app.add_exception_handler(Forbidden, _on_forbidden)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)  # type: ignore[arg-type]
