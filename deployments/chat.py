"""The chat route's wiring: identity, then exact, semantic, single flight, the model, and storing.

Deployments only wire: what may be cached, under which key and scope, is decided by
:class:`caches.chat.RequestIdentity`; whether an answer is complete by :func:`caches.chat.storable`;
who computes a burst by :mod:`caches.coalesce`. The flow shared with legacy completions (exact
lookup, single flight, generate, store, stream miss) is :class:`deployments.cached_route.CachedRoute`;
this module adds the semantic layer (Encoder and SemanticCache deployments, each call under a
deadline from ``cache.encoder_timeout_s`` / ``cache.semantic_timeout_s``: a miss is a bypass).
In verified mode a lookup may answer ``verify``: the model answers (``x-cache: miss`` with
``x-cache-verify: <similarity>``) and the store step, which embeds the answer, lets the cache's
answer judge compare it with the candidate's answer: that verdict is what the mode learns from.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from ray.serve.handle import DeploymentHandle

from caches.cache_control import CacheControl, age_seconds
from caches.chat import CHAT, EncoderIdentity, RequestIdentity, semantic_answer, without_nulls
from caches.coalesce import Coalescer
from caches.prompts import build_messages
from caches.result import ResultCache
from deployments import metrics
from deployments.cached_route import STORE_TIMEOUT_S, CachedRoute, Degraded, Hit, Turn, bounded
from deployments.config import AppSettings
from deployments.openai_compat import (
    StreamAssembler,
    completion_from_text,
    error_body,
    stream_from_completion,
)
from deployments.schemas import ChatRequest

log = logging.getLogger("tierserve.chat")
# The Encoder's identity is asked once per Ingress replica and then kept until an embedding comes
# back from another encoder (each carries its maker's identity: `vector_from`): a cold replica may
# take a while to answer it, so it gets a longer deadline than each embedding does.
ENCODER_INFO_TIMEOUT_S = 10.0
# After the Encoder failed to say who it is, requests go without the semantic layer for this long
# instead of each waiting out the deadline again.
ENCODER_INFO_RETRY_S = 5.0


class EncoderChanged(Degraded):
    """An embedding came from another encoder than the one the request's semantic scope names (a
    rolling update, or replicas of two encoder versions side by side): its vector is in another
    embedding space, so comparing or storing it in that scope could give wrong hits."""

    def __init__(self, expected: EncoderIdentity, actual: EncoderIdentity | None) -> None:
        made_by = f"{actual.name} {actual.version}" if actual is not None else "an encoder that did not say"
        super().__init__(f"encoder: vector made by {made_by}, scope names {expected.name} {expected.version}")
        self.expected, self.actual = expected, actual


def vector_from(reply: Any, expected: EncoderIdentity) -> list[float]:
    """The vector of an Encoder `embed` reply, only when the replica that made it is `expected`
    (the encoder the request's semantic scope names); :class:`EncoderChanged` otherwise. A reply
    that does not name its encoder (a replica older than this check) is not trusted either: when
    unsure, no semantic layer."""
    actual = None
    named = isinstance(reply, dict) and all(isinstance(reply.get(k), str) for k in ("name", "version"))
    if named:
        actual = EncoderIdentity(name=reply["name"], version=reply["version"])
    if actual != expected:
        raise EncoderChanged(expected, actual)
    return reply["vector"]


@dataclasses.dataclass
class ChatTurn(Turn):
    """A chat request's turn, with the encoder its semantic scope names: every vector stored or
    looked up for it must come from that encoder (None: no semantic layer for this request)."""

    encoder: EncoderIdentity | None = None


class ChatPath(CachedRoute):
    """Everything between a validated chat request and its answer (the Ingress owns one)."""

    route = CHAT
    id_prefix = "chatcmpl"

    def __init__(self, settings: AppSettings, results: ResultCache, version_of: Callable[[str], str | None],
                 encoder: DeploymentHandle, semantic: DeploymentHandle, llm: DeploymentHandle,
                 coalescer: Coalescer | None = None) -> None:
        super().__init__(settings, results, version_of, llm, coalescer)
        self.encoder, self.semantic = encoder, semantic
        self._encoder_ident: EncoderIdentity | None = None
        self._encoder_ident_failed_at = -ENCODER_INFO_RETRY_S

    # ------------------------------------------------------------------- hooks
    def _call(self, request: dict[str, Any], tenant: str) -> Awaitable[dict[str, Any]]:
        return self.llm.chat.remote(request, tenant)

    def _call_stream(self, request: dict[str, Any], tenant: str) -> AsyncIterator[str]:
        return self.llm.options(stream=True).chat_stream.remote(request, tenant)

    def _assembler(self) -> StreamAssembler:
        return StreamAssembler()

    def _replay(self, body: dict[str, Any], include_usage: bool) -> Iterator[str]:
        return stream_from_completion(body, include_usage)

    # ---------------------------------------------------------- semantic layer
    async def _encoder_identity(self) -> EncoderIdentity | None:
        """None when the Encoder does not say who it is in time: no semantic layer this request."""
        if self._encoder_ident is None:
            if time.monotonic() - self._encoder_ident_failed_at < ENCODER_INFO_RETRY_S:
                return None
            try:
                info = await bounded(self.encoder.info.remote(), ENCODER_INFO_TIMEOUT_S, "encoder info")
            except Degraded as exc:
                self._encoder_ident_failed_at = time.monotonic()
                log.warning("semantic layer skipped for %.0fs: %s", ENCODER_INFO_RETRY_S, exc)
                return None
            self._encoder_ident = EncoderIdentity(name=info["name"], version=info["version"])
        return self._encoder_ident

    async def _embed(self, text: str, tenant: str, encoder: EncoderIdentity, *,
                     store: bool = True) -> list[float]:
        """The text's vector, made by `encoder` (else :class:`EncoderChanged`, and the identity kept
        here becomes the one that answered, so later requests use its scope); cached under the
        tenant's scope (no tenant learns what another sent), unless `store` is False (a no-store
        request)."""
        # embed_named: an Encoder of the previous release has no such method (Degraded: no semantic
        # layer until the rollout is done), and never answers a vector without its maker's name
        reply = await bounded(self.encoder.embed_named.remote(text, tenant, store),
                              self.settings.cache.encoder_timeout_s, "encoder")
        try:
            return vector_from(reply, encoder)
        except EncoderChanged as exc:
            self._encoder_changed(exc)
            raise

    def _encoder_changed(self, exc: EncoderChanged) -> None:
        """Keep the identity of the encoder that answered, if it said; one that did not leaves the
        kept identity as it is (nothing was learnt), and so does a change another request already
        took in."""
        if exc.actual is not None and self._encoder_ident == exc.expected:
            log.warning("encoder changed (%s); semantic scopes follow it from now on", exc)
            self._encoder_ident = exc.actual

    async def _lookup_more(self, turn: Turn) -> Hit | None:
        """The semantic layer, after an exact miss. A deadline missed or an error: bypass. A vector
        from another encoder than the scope's: a miss without the semantic layer."""
        ident, control = turn.ident, turn.control
        if not isinstance(turn, ChatTurn) or turn.encoder is None or ident.semantic_scope is None:
            return None
        encoder = turn.encoder
        text = ident.semantic_text or ""
        try:
            # no-store: the question may be answered from the cache, but leaves nothing in it
            turn.vector = await self._embed(text, ident.tenant, encoder, store=not control.no_store)
            found = await bounded(self.semantic.lookup.remote(ident.semantic_scope, text, turn.vector),
                                  self.settings.cache.semantic_timeout_s, "semantic lookup")
        except EncoderChanged as exc:
            # the vector is in another embedding space than the scope's entries: this request goes
            # without the semantic layer (no lookup, no store); the exact layer never sees a vector,
            # so it stays a miss whose answer the exact cache keeps
            log.warning("semantic lookup skipped: %s", exc)
            metrics.lookup("semantic", ident.tenant, "unavailable")
            turn.vector, turn.encoder = None, None
            return None
        except Degraded as exc:
            log.warning("semantic lookup skipped: %s", exc)
            metrics.lookup("semantic", ident.tenant, "unavailable")
            turn.layer = "bypass"
            return None
        metrics.lookup("semantic", ident.tenant, found["status"])
        if found["status"] == "unavailable":
            turn.layer = "bypass"
        if found["status"] == "verify":
            # verified mode explores: the model answers this one although a cached answer was near;
            # storing that answer (a miss's usual step) judges the cached one against it
            turn.verify = float(found["similarity"])
            return None
        created = found.get("created")
        if found["status"] != "hit" or (control.max_age is not None and created is None):
            return None
        if created is not None and not control.fresh_enough(created):
            return None
        completion = completion_from_text(self.model_name, found["response"])
        return completion, "semantic", age_seconds(created) if created is not None else 0, found["similarity"]

    async def _store_more(self, turn: Turn, completion: dict[str, Any]) -> None:
        """Single text answers that stopped by themselves go to the semantic layer too; the answer
        has already been given, so a slow or failing layer only loses this entry."""
        ident = turn.ident
        text = semantic_answer(completion)
        if not isinstance(turn, ChatTurn) or turn.encoder is None or ident.semantic_scope is None or text is None:
            return
        encoder = turn.encoder
        try:
            if turn.vector is None:  # no lookup happened (Cache-Control: no-cache)
                turn.vector = await self._embed(ident.semantic_text or "", ident.tenant, encoder)
            # the answer's embedding goes with it: the answer judge compares it with the candidates'
            # (both vectors from the scope's encoder, like the question's: else nothing is stored)
            answer_vector = await self._embed(text, ident.tenant, encoder)
            await bounded(self.semantic.store.remote(ident.semantic_scope, ident.semantic_text or "", turn.vector, text,
                                                     answer_vector),
                          max(self.settings.cache.semantic_timeout_s, STORE_TIMEOUT_S), "semantic store")
        except Degraded as exc:
            log.warning("semantic store skipped: %s", exc)

    # -------------------------------------------------------------------- route
    def _check_chat(self, body: ChatRequest) -> JSONResponse | None:
        if body.model != self.model_name:
            return JSONResponse(
                error_body(400, f"unknown model '{body.model}'; this server serves '{self.model_name}' (see GET /v1/models)", "model"),
                status_code=400,
            )
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is not None and max_tokens > self.settings.llm.max_tokens_limit:
            return JSONResponse(
                error_body(400, f"max_tokens must be between 1 and {self.settings.llm.max_tokens_limit} (got {max_tokens})", "max_tokens"),
                status_code=400,
            )
        return None

    async def answer(self, body: ChatRequest, request: Request, tenant: str) -> Any:
        """The answer to one chat request, from the first layer that has it."""
        started = time.perf_counter()
        refused = self._check_chat(body)
        if refused is not None:
            metrics.observe(self.route, "none", refused.status_code, started)
            return refused
        sent = without_nulls(body.model_dump(mode="json", exclude_unset=True))
        # the request as the engine gets it: the identity hashes exactly this
        engine_request = {**sent, "messages": build_messages(self.settings.llm.system_prompt, sent["messages"])}
        control = CacheControl.parse(", ".join(request.headers.getlist("cache-control")) or None)
        cache = self.settings.cache
        # read once: the scope and every vector checked against it name the same encoder, even if
        # another request meanwhile finds that the Encoder changed
        encoder = await self._encoder_identity() if cache.semantic_enabled else None
        ident = RequestIdentity.build(
            engine_request, tenant=tenant, model=await self._model_identity(), version=await self._version(body.model),
            encoder=encoder, cache_nondeterministic=cache.cache_nondeterministic,
            semantic_enabled=cache.semantic_enabled, route=CHAT,
        )
        turn = ChatTurn(ident=ident, control=control, request=engine_request, stream=body.stream,
                        include_usage=bool((sent.get("stream_options") or {}).get("include_usage")),
                        started=started, encoder=encoder)
        return await self._serve(turn)
