"""OpenAI wire format for the routes beside chat: embeddings, model cards, legacy completions.

Pure helpers (no Ray): the ingress calls them, unit tests check them without a running app.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np

from deployments.openai_compat import StreamAssembler, error_body, sse

OWNER = "tierserve"


def encode_embedding(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """One embedding as OpenAI sends it: a list of floats, or for "base64" the little-endian
    float32 bytes base64-encoded (what OpenAI and vLLM send, and what the SDK decodes with
    `np.frombuffer(..., dtype="float32")`)."""
    row = np.asarray(vector, dtype=np.float32)
    if encoding_format == "base64":
        return base64.b64encode(row.astype("<f4", copy=False).tobytes()).decode("ascii")
    return row.tolist()


def embeddings_response(model: str, vectors: np.ndarray, encoding_format: str, prompt_tokens: int) -> dict[str, Any]:
    return {
        "object": "list",
        "model": model,
        "data": [{"object": "embedding", "index": i, "embedding": encode_embedding(v, encoding_format)}
                 for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def model_card(model_id: str, **extra: Any) -> dict[str, Any]:
    """An OpenAI `model` object; `extra` carries what vLLM's cards add (max_model_len) and ours."""
    return {"id": model_id, "object": "model", "created": 0, "owned_by": OWNER, **extra}


def model_not_found(model_id: str) -> dict[str, Any]:
    """OpenAI's 404 body for an unknown model id (its `code` is a string there)."""
    body = error_body(404, f"The model '{model_id}' does not exist (see GET /v1/models)", "model")
    body["error"]["code"] = "model_not_found"
    return body


def unknown_model(model: str, served: str) -> dict[str, Any]:
    return error_body(400, f"unknown model '{model}'; this server serves '{served}' (see GET /v1/models)", "model")


async def open_stream(chunks: AsyncIterator[str], meta_prefix: str) -> tuple[dict[str, Any], dict[str, Any] | None,
                                                                         AsyncIterator[str] | None]:
    """Read a replica's stream far enough to know whether it failed before its first chunk.

    The LLM replica sends first a meta line (`meta_prefix` + JSON: who answers, never forwarded),
    then SSE lines, or one JSON error object instead of them (see LLMServer.complete_stream).
    Looking before the response starts lets the route answer a real 4xx with an OpenAI error
    body, which the SDK raises as a typed error, instead of a 200 stream carrying an error event.
    Returns (meta, error with its "status" or None, the SSE stream from its first line or None).
    """
    iterator, meta = aiter(chunks), {}
    try:
        first = await anext(iterator)
        while first.startswith(meta_prefix):
            meta.update(json.loads(first[len(meta_prefix):]))
            first = await anext(iterator)
    except StopAsyncIteration:
        return meta, {"status": 503, **error_body(503, "the model returned no output; retry the request")}, None
    if not first.startswith("data:"):
        return meta, json.loads(first), None

    async def replay() -> AsyncIterator[str]:
        yield first
        async for chunk in iterator:
            yield chunk

    return meta, None, replay()


# Legacy completion logprobs are four parallel lists, one entry per token; a stream sends each
# chunk's slice (text offsets already absolute), so concatenating them in order rebuilds the whole.
COMPLETION_LOGPROB_LISTS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
# Choice fields of a completion chunk the assembler knows; any other non-null one (token ids,
# prompt logprobs, ...) makes the stream unreplayable, and an unreplayable answer is not stored.
_COMPLETION_CHOICE_FIELDS = {"index", "text", "logprobs", "finish_reason", "stop_reason"}


class _TextChoice:
    """One choice of a legacy completion stream: text pieces and logprob slices, in order."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.logprobs: dict[str, list[Any]] | None = None
        self.finish: str | None = None
        self.stop_reason: Any = None

    def feed(self, choice: dict[str, Any]) -> str | None:
        unknown = [k for k, v in choice.items() if k not in _COMPLETION_CHOICE_FIELDS and v is not None]
        if unknown:
            return f"choice field {unknown[0]!r}"
        if not isinstance(choice.get("text", ""), str):
            return "non-text choice"
        self.text.append(choice.get("text") or "")
        logprobs = choice.get("logprobs")
        if logprobs:
            if set(logprobs) - set(COMPLETION_LOGPROB_LISTS):
                return "logprobs beyond the four token lists"
            merged = self.logprobs or {name: [] for name in COMPLETION_LOGPROB_LISTS}
            for name in COMPLETION_LOGPROB_LISTS:
                merged[name].extend(logprobs.get(name) or [])
            self.logprobs = merged
        if choice.get("finish_reason"):
            self.finish = choice["finish_reason"]
            self.stop_reason = choice.get("stop_reason")
        return None


class CompletionAssembler(StreamAssembler):
    """:class:`deployments.openai_compat.StreamAssembler` for `text_completion` chunks: the same
    rules (``[DONE]``, no error chunk, a finish reason per choice, nothing unreplayable), with each
    choice's text and completion-style logprobs merged."""

    object_name = "text_completion"

    def _new_choice(self) -> _TextChoice:
        return _TextChoice()

    def _choice_body(self, c: _TextChoice) -> dict[str, Any]:
        return {"text": "".join(c.text), "logprobs": c.logprobs, "finish_reason": c.finish}


def completion_stream_from_body(body: dict[str, Any], include_usage: bool) -> Iterator[str]:
    """Replay a stored `text_completion` as the chunk stream vLLM/OpenAI send: per choice one
    chunk with its whole text, its logprobs and its finish reason, then the usage chunk when asked
    for (vLLM's shape: no choices, only usage), then ``[DONE]``."""
    head = {"id": body["id"], "object": "text_completion", "created": body["created"], "model": body["model"]}
    for choice in body.get("choices", []):
        chunk = {"index": choice.get("index", 0), "text": choice.get("text", ""), "logprobs": choice.get("logprobs"),
                 "finish_reason": choice.get("finish_reason")}
        if "stop_reason" in choice:
            chunk["stop_reason"] = choice["stop_reason"]
        yield sse({**head, "choices": [chunk]})
    if include_usage:
        yield sse({**head, "choices": [], "usage": body.get("usage")})
    yield sse("[DONE]")
