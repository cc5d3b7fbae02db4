"""The legacy completions route's wiring: checks, then the model through vLLM's own
OpenAIServingCompletion (in the LLM replica), streamed or not.

The client's raw prompt is the whole input: no chat template, no system prompt added. Not cached
yet: every answer is fresh and says `x-cache: bypass`. Only the exact cache fits this route (a raw
prompt has no "last user question" for the semantic layer to compare); it belongs at the one
marked place in `answer`, keyed by the request identity of caches/chat.py, storing only complete
greedy answers from the fingerprint that `meta`/`result["fingerprint"]` carry.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from ray.serve.handle import DeploymentHandle

from deployments import metrics
from deployments.config import AppSettings
from deployments.llm import META_PREFIX
from deployments.openai_compat import error_body
from deployments.openai_surface import open_stream, unknown_model
from deployments.schemas import CompletionRequest

ROUTE = "completions"


class CompletionPath:
    """Everything between a validated `/v1/completions` request and its answer (the Ingress owns one)."""

    def __init__(self, settings: AppSettings, llm: DeploymentHandle) -> None:
        self.settings, self.llm = settings, llm
        self.model_name = settings.llm.served_model_name

    def _check(self, body: CompletionRequest) -> JSONResponse | None:
        if body.model != self.model_name:
            return JSONResponse(unknown_model(body.model, self.model_name), status_code=400)
        limit = self.settings.llm.max_tokens_limit
        if body.max_tokens is not None and body.max_tokens > limit:
            return JSONResponse(error_body(400, f"max_tokens must be between 1 and {limit} (got {body.max_tokens})",
                                           "max_tokens"), status_code=400)
        return None

    async def answer(self, body: CompletionRequest, tenant: str) -> Any:
        started = time.perf_counter()
        refused = self._check(body)
        if refused is not None:
            metrics.observe(ROUTE, "none", refused.status_code, started)
            return refused
        request = body.model_dump(mode="json", exclude_unset=True)
        # cache lookup goes here (exact only: see the module docstring). Until then: bypass.
        layer = "bypass"
        headers = {"x-cache": layer}
        if body.stream:
            _meta, error, stream = await open_stream(
                self.llm.options(stream=True).complete_stream.remote(request, tenant), META_PREFIX)
            if stream is None:  # the replica refused the request: a real 4xx before any chunk
                error = error or {}
                status = error.pop("status", 503)
                metrics.observe(ROUTE, layer, status, started)
                return JSONResponse(error, status_code=status)
            metrics.observe(ROUTE, layer, 200, started)
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        result = await self.llm.complete.remote(request, tenant)
        metrics.observe(ROUTE, layer, result["status"], started)
        if result["status"] != 200:
            return JSONResponse(result["body"], status_code=result["status"])
        return JSONResponse(result["body"], headers=headers)
