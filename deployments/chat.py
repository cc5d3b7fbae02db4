"""The chat route's wiring: identity, then exact, semantic, single flight, the model, and storing.

Deployments only wire: what may be cached, under which key and scope, is decided by
:class:`caches.chat.ChatIdentity`; whether an answer is complete by :func:`caches.chat.storable`;
who computes a burst by :mod:`caches.coalesce`. This module calls them in order and moves the
answer between the Encoder, SemanticCache and LLM deployments (see docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray.serve.handle import DeploymentHandle

from caches.cache_control import CacheControl, age_seconds
from caches.chat import CachedAnswer, ChatIdentity, EncoderIdentity, ModelIdentity, semantic_answer, storable
from caches.coalesce import Coalescer, Flight
from caches.prompts import build_messages
from caches.result import CacheUnavailable, ResultCache
from deployments import metrics
from deployments.config import AppSettings
from deployments.llm import META_PREFIX
from deployments.openai_compat import (
    StreamAssembler,
    completion_from_text,
    error_body,
    refresh,
    stream_from_completion,
)
from deployments.schemas import ChatRequest

# How often the ingress re-reads the LLM's identity (fingerprint, engine defaults), in the
# background: a changed model reaches the keys within this long (answers from it are never stored
# under the old identity meanwhile: each answer carries the fingerprint of the replica that wrote it).
IDENTITY_REFRESH_S = 15.0


@dataclasses.dataclass
class _Turn:
    """One chat request on its way through the layers."""

    ident: ChatIdentity
    control: CacheControl
    request: dict[str, Any]
    stream: bool
    include_usage: bool
    started: float
    layer: str = "bypass"  # x-cache of a fresh answer: `miss` when the caches were consulted
    vector: list[float] | None = None
    flight: Flight | None = None


class ChatPath:
    """Everything between a validated chat request and its answer (the Ingress owns one)."""

    def __init__(self, settings: AppSettings, results: ResultCache, version_of: Callable[[str], str],
                 encoder: DeploymentHandle, semantic: DeploymentHandle, llm: DeploymentHandle) -> None:
        self.settings = settings
        self.model_name = settings.llm.served_model_name
        self.results = results
        self.version_of = version_of
        self.encoder, self.semantic, self.llm = encoder, semantic, llm
        self.coalescer = Coalescer(aioredis.Redis.from_url(settings.redis, socket_timeout=0.5,
                                                           socket_connect_timeout=0.5))
        self._model_ident: ModelIdentity | None = None
        self._model_ident_at = 0.0
        self._refreshing = False
        self._encoder_ident: EncoderIdentity | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def _model_identity(self) -> ModelIdentity:
        """The LLM's identity (name, fingerprint, engine defaults), fetched once and refreshed in
        the background so that a changed model reaches the keys without a hop on the hit path."""
        now = time.monotonic()
        if self._model_ident is None:
            await self._refresh_model_identity()
        elif now - self._model_ident_at > IDENTITY_REFRESH_S and not self._refreshing:
            self._refreshing = True
            self._background(self._refresh_model_identity())
        assert self._model_ident is not None
        return self._model_ident

    async def _refresh_model_identity(self) -> None:
        try:
            info = await self.llm.info.remote()
            self._model_ident = ModelIdentity(name=info["id"], fingerprint=info["fingerprint"],
                                              default_sampling=info.get("default_sampling") or {})
            self._model_ident_at = time.monotonic()
        finally:
            self._refreshing = False

    async def _encoder_identity(self) -> EncoderIdentity:
        if self._encoder_ident is None:
            info = await self.encoder.info.remote()
            self._encoder_ident = EncoderIdentity(name=info["name"], version=info["version"])
        return self._encoder_ident

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
            metrics.observe("chat", "none", refused.status_code, started)
            return refused
        sent = body.model_dump(mode="json", exclude_unset=True)
        # the request as the engine gets it: the identity hashes exactly this
        engine_request = {**sent, "messages": build_messages(self.settings.llm.system_prompt, sent["messages"])}
        control = CacheControl.parse(request.headers.get("cache-control"))
        cache = self.settings.cache
        ident = ChatIdentity.build(
            engine_request, tenant=tenant, model=await self._model_identity(), version=self.version_of(body.model),
            encoder=await self._encoder_identity() if cache.semantic_enabled else None,
            cache_nondeterministic=cache.cache_nondeterministic, semantic_enabled=cache.semantic_enabled,
        )
        turn = _Turn(ident=ident, control=control, request=engine_request, stream=body.stream,
                     include_usage=bool((sent.get("stream_options") or {}).get("include_usage")), started=started)
        if ident.lookup_allowed(control):
            hit = await self._lookup(turn)
            if hit is not None:
                return self._reply_cached(turn, *hit)
        elif ident.cacheable and not control.lookup:
            turn.layer = "miss"  # Cache-Control: no-cache / max-age=0: a fresh answer, stored
        if turn.layer == "miss" and ident.coalesce_allowed(control):
            turn.flight = await self.coalescer.join(ident.exact_key or "")
            if not turn.flight.leader:
                outcome = await self._follow(turn)
                if outcome is not None:
                    return outcome
        return await self._generate(turn)

    async def _lookup(self, turn: _Turn) -> tuple[dict[str, Any], str, int, float | None] | None:
        """Exact, then semantic: (completion, layer, age, similarity) of a servable hit, or None
        (turn.layer then says `miss` or `bypass`)."""
        ident, control = turn.ident, turn.control
        turn.layer = "miss"
        try:
            blob = self.results.get(ident.exact_key or "")
        except CacheUnavailable:
            turn.layer = "bypass"
            blob = None
        entry = CachedAnswer.decode(blob) if blob is not None else None
        fresh = entry is not None and control.fresh_enough(entry.stored_at)
        metrics.CACHE_LOOKUPS.labels("exact", ident.tenant, "hit" if fresh else turn.layer).inc()
        if entry is not None and fresh:
            return refresh(entry.body), "exact", age_seconds(entry.stored_at), None
        if turn.layer == "bypass" or ident.semantic_scope is None:
            return None
        text = ident.semantic_text or ""
        turn.vector = await self.encoder.embed.remote(text)
        found = await self.semantic.lookup.remote(ident.semantic_scope, text, turn.vector)
        metrics.CACHE_LOOKUPS.labels("semantic", ident.tenant, found["status"]).inc()
        if found["status"] == "unavailable":
            turn.layer = "bypass"
        created = found.get("created")
        if found["status"] != "hit" or (control.max_age is not None and created is None):
            return None
        if created is not None and not control.fresh_enough(created):
            return None
        completion = completion_from_text(self.model_name, found["response"])
        return completion, "semantic", age_seconds(created) if created is not None else 0, found["similarity"]

    def _reply_cached(self, turn: _Turn, completion: dict[str, Any], layer: str, age: int,
                      similarity: float | None, status: int = 200) -> Any:
        headers = {"x-cache": layer, "age": str(age)}
        if similarity is not None:
            headers["x-cache-similarity"] = f"{similarity:.4f}"
        metrics.observe("chat", layer, status, turn.started)
        if status != 200:
            return JSONResponse(completion, status_code=status, headers=headers)
        if turn.stream:
            return StreamingResponse(stream_from_completion(completion, turn.include_usage),
                                     media_type="text/event-stream", headers=headers)
        return JSONResponse(completion, headers=headers)

    async def _follow(self, turn: _Turn) -> Any | None:
        """A follower of an identical request in flight: its outcome, or None to compute."""
        flight = turn.flight
        assert flight is not None
        try:
            outcome = await flight.wait()
        except BaseException:
            await flight.close()
            raise
        if outcome is None:
            if not flight.leader:
                await flight.close()
                turn.flight = None
            return None
        await flight.close()
        turn.flight = None
        shared = CachedAnswer.decode(outcome)
        if shared is None:
            return None
        body = refresh(shared.body) if shared.status == 200 else shared.body
        return self._reply_cached(turn, body, "coalesced", 0, None, status=shared.status)

    async def _generate(self, turn: _Turn) -> Any:
        headers = {"x-cache": turn.layer}
        if turn.stream:
            return StreamingResponse(self._stream_miss(turn), media_type="text/event-stream", headers=headers)
        try:
            result = await self.llm.chat.remote(turn.request, turn.ident.tenant)
            metrics.observe("chat", turn.layer, result["status"], turn.started)
            await self._finish(turn, result["status"], result["body"], result.get("fingerprint"))
        finally:
            if turn.flight is not None:
                await turn.flight.close()
        if result["status"] != 200:
            return JSONResponse(result["body"], status_code=result["status"])
        return JSONResponse(result["body"], headers=headers)

    async def _finish(self, turn: _Turn, status: int, completion: dict[str, Any] | None,
                      fingerprint: str | None) -> None:
        """After the engine answered: hand the outcome to followers, store what may be stored."""
        ident = turn.ident
        if fingerprint is not None and fingerprint != ident.model.fingerprint:
            # another model answered (a rolling update): its answer is not this identity's
            self._background(self._refresh_model_identity())
            return
        flight = turn.flight
        if status != 200 or completion is None:
            if flight is not None and 400 <= status < 500 and completion is not None:
                # the same request gets the same refusal: followers need not ask again
                await flight.publish(CachedAnswer(stored_at=time.time(), body=completion, status=status).encode())
            return
        complete, _ = storable(completion)
        if not complete:
            return
        entry = CachedAnswer(stored_at=time.time(), body=completion)
        if flight is not None:
            await flight.publish(entry.encode())
        if turn.layer != "miss" or not ident.store_allowed(turn.control):
            return
        try:
            self.results.put(ident.exact_key or "", entry.encode())
        except CacheUnavailable:
            return
        text = semantic_answer(completion)
        if ident.semantic_scope is not None and text is not None:
            if turn.vector is None:  # no lookup happened (Cache-Control: no-cache)
                turn.vector = await self.encoder.embed.remote(ident.semantic_text or "")
            await self.semantic.store.remote(ident.semantic_scope, ident.semantic_text or "", turn.vector, text)

    async def _stream_miss(self, turn: _Turn) -> AsyncIterator[str]:
        """vLLM's stream, forwarded as it comes; stored only when it ended properly. A client that
        hangs up closes this generator mid-way: nothing after the loop runs, nothing is stored."""
        assembler = StreamAssembler()
        status, fingerprint, error = 200, None, None
        try:
            gen = self.llm.options(stream=True).chat_stream.remote(turn.request, turn.ident.tenant)
            first = True
            async for chunk in gen:
                if chunk.startswith(META_PREFIX):
                    fingerprint = json.loads(chunk[len(META_PREFIX):])["fingerprint"]
                    continue
                if first and not chunk.startswith("data:"):
                    # The LLM replica reports a request error as one JSON object instead of SSE lines.
                    error = json.loads(chunk)
                    status = error.pop("status", 400)
                    yield f"data: {json.dumps(error)}\n\n"
                    break
                first = False
                assembler.feed(chunk)
                yield chunk
            metrics.observe("chat", turn.layer, status, turn.started)
            await self._finish(turn, status, error if status != 200 else assembler.completion(), fingerprint)
        finally:
            if turn.flight is not None:
                await turn.flight.close()
