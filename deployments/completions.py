"""The legacy completions route's wiring: checks, the request identity, then the shared cached
flow (:class:`deployments.cached_route.CachedRoute`) with vLLM's own OpenAIServingCompletion (in
the LLM replica) as the engine, streamed or not.

The client's raw prompt is the whole input: no chat template, no system prompt added. Cached like
chat, exact only (:data:`caches.chat.ROUTES` says why no semantic layer): greedy requests only,
Cache-Control, ``Age`` on hits, ``x-cache: exact|coalesced|miss|bypass``, one engine call per
burst, complete answers only, from the model the identity names. A streamed miss is reassembled
from its `text_completion` chunks (text and completion-style logprobs merged; anything else
refuses to store) and a cached answer asked with ``stream: true`` is replayed as a chunk stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from caches.cache_control import CacheControl
from caches.chat import COMPLETIONS, RequestIdentity, without_nulls
from deployments import metrics
from deployments.cached_route import CachedRoute, Turn
from deployments.openai_compat import StreamAssembler, error_body
from deployments.openai_surface import CompletionAssembler, completion_stream_from_body, unknown_model
from deployments.schemas import CompletionRequest

ROUTE = COMPLETIONS


class CompletionPath(CachedRoute):
    """Everything between a validated `/v1/completions` request and its answer (the Ingress owns one)."""

    route = COMPLETIONS
    id_prefix = "cmpl"

    # ------------------------------------------------------------------- hooks
    def _sampling_defaults(self, info: dict[str, Any]) -> dict[str, Any]:
        # vLLM's completion serving reads the same generation config as chat; the replica reports
        # its own copy so that a difference between the two can never go unnoticed here.
        reported = info.get("completion_default_sampling")
        return reported if reported is not None else (info.get("default_sampling") or {})

    def _call(self, request: dict[str, Any], tenant: str) -> Awaitable[dict[str, Any]]:
        return self.llm.complete.remote(request, tenant)

    def _call_stream(self, request: dict[str, Any], tenant: str) -> AsyncIterator[str]:
        return self.llm.options(stream=True).complete_stream.remote(request, tenant)

    def _assembler(self) -> StreamAssembler:
        return CompletionAssembler()

    def _replay(self, body: dict[str, Any], include_usage: bool) -> Iterator[str]:
        return completion_stream_from_body(body, include_usage)

    # -------------------------------------------------------------------- route
    def _check(self, body: CompletionRequest) -> JSONResponse | None:
        if body.model != self.model_name:
            return JSONResponse(unknown_model(body.model, self.model_name), status_code=400)
        limit = self.settings.llm.max_tokens_limit
        if body.max_tokens is not None and body.max_tokens > limit:
            return JSONResponse(error_body(400, f"max_tokens must be between 1 and {limit} (got {body.max_tokens})",
                                           "max_tokens"), status_code=400)
        return None

    async def answer(self, body: CompletionRequest, request: Request, tenant: str) -> Any:
        started = time.perf_counter()
        refused = self._check(body)
        if refused is not None:
            metrics.observe(ROUTE, "none", refused.status_code, started)
            return refused
        sent = without_nulls(body.model_dump(mode="json", exclude_unset=True))
        cache = self.settings.cache
        ident = RequestIdentity.build(
            sent, tenant=tenant, model=await self._model_identity(), version=await self._version(body.model),
            encoder=None, cache_nondeterministic=cache.cache_nondeterministic, route=COMPLETIONS,
        )
        turn = Turn(ident=ident, control=CacheControl.parse(", ".join(request.headers.getlist("cache-control")) or None), request=sent,
                    stream=body.stream, include_usage=bool((sent.get("stream_options") or {}).get("include_usage")),
                    started=started)
        return await self._serve(turn)
