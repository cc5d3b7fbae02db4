"""OpenAI wire-format helpers for answers that did not come from vLLM (cache hits).

A cached answer must look exactly like a fresh one to an OpenAI client, streamed or not, so these
helpers rebuild a `chat.completion` body or a `chat.completion.chunk` SSE stream from stored text.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def error_body(status: int, message: str, param: str | None = None, err_type: str | None = None) -> dict[str, Any]:
    kind = err_type or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def completion_from_text(model: str, text: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": new_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": None}
        ],
        "usage": usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                           "prompt_tokens_details": {"cached_tokens": 0}},
    }


def refresh(body: dict[str, Any]) -> dict[str, Any]:
    """A stored completion with a fresh id and timestamp: each answer is its own object."""
    return {**body, "id": new_id(), "created": int(time.time())}


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def stream_from_completion(body: dict[str, Any], include_usage: bool) -> Iterator[str]:
    """Replay a complete chat.completion as the chunk sequence vLLM/OpenAI would send."""
    head = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"], "model": body["model"]}
    for choice in body.get("choices", []):
        idx = choice.get("index", 0)
        content = (choice.get("message") or {}).get("content") or ""
        yield sse({**head, "choices": [{"index": idx, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        if content:
            yield sse({**head, "choices": [{"index": idx, "delta": {"content": content}, "finish_reason": None}]})
        yield sse({**head, "choices": [{"index": idx, "delta": {}, "finish_reason": choice.get("finish_reason", "stop")}]})
    if include_usage:
        yield sse({**head, "choices": [], "usage": body.get("usage")})
    yield sse("[DONE]")


class StreamAssembler:
    """Rebuilds the full completion from vLLM's SSE chunks, so a streamed miss can be cached."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.text: dict[int, list[str]] = {}
        self.finish: dict[int, str | None] = {}
        self.usage: dict[str, Any] | None = None

    def feed(self, line: str) -> None:
        for part in line.split("\n"):
            if not part.startswith("data: ") or part == "data: [DONE]":
                continue
            chunk = json.loads(part[6:])
            self.head = self.head or {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
            if chunk.get("usage"):
                self.usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                idx = choice.get("index", 0)
                self.text.setdefault(idx, []).append((choice.get("delta") or {}).get("content") or "")
                if choice.get("finish_reason"):
                    self.finish[idx] = choice["finish_reason"]

    def completion(self) -> dict[str, Any] | None:
        if not self.head or not self.text:
            return None
        return {
            **self.head,
            "object": "chat.completion",
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": "".join(parts)},
                 "finish_reason": self.finish.get(i, "stop"), "logprobs": None}
                for i, parts in sorted(self.text.items())
            ],
            "usage": self.usage,
        }
