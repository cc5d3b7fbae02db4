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


def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


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


def refresh(body: dict[str, Any], prefix: str = "chatcmpl") -> dict[str, Any]:
    """A stored completion with a fresh id and timestamp: each answer is its own object."""
    return {**body, "id": new_id(prefix), "created": int(time.time())}


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


# Delta fields the assembler knows how to put back together; any other non-null delta field makes
# the stream unreplayable, and an unreplayable answer is not stored.
_TEXT_DELTA_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")


def stream_from_completion(body: dict[str, Any], include_usage: bool) -> Iterator[str]:
    """Replay a complete chat.completion as the chunk sequence vLLM/OpenAI would send: the role,
    then the whole answer in one delta (content, tool calls and token logprobs exactly as
    generated), then the finish reason."""
    head = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"], "model": body["model"]}
    if body.get("system_fingerprint") is not None:  # which build answered, as in a live stream
        head["system_fingerprint"] = body["system_fingerprint"]
    for choice in body.get("choices", []):
        idx = choice.get("index", 0)
        message = dict(choice.get("message") or {})
        message.pop("role", None)
        yield sse({**head, "choices": [{"index": idx, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]})
        delta = {k: v for k, v in message.items() if v is not None and k != "tool_calls"}
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        if any(v not in ("", None) for v in delta.values()) or choice.get("logprobs"):
            yield sse({**head, "choices": [{"index": idx, "delta": delta, "logprobs": choice.get("logprobs"),
                                            "finish_reason": None}]})
        finish = {"index": idx, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")}
        if "stop_reason" in choice:
            finish["stop_reason"] = choice["stop_reason"]
        yield sse({**head, "choices": [finish]})
    if include_usage:
        yield sse({**head, "choices": [], "usage": body.get("usage")})
    yield sse("[DONE]")


# Choice- and chunk-level fields of vLLM's chat chunks that the assembler reads or that carry
# nothing a replay must give back; any other non-null one (e.g. `token_ids`, `prompt_token_ids`
# with `return_token_ids`) makes the stream unreplayable, so it is not stored.
_CHAT_CHOICE_FIELDS = frozenset({"index", "delta", "logprobs", "finish_reason", "stop_reason"})
_CHAT_CHUNK_FIELDS = frozenset({"id", "object", "created", "model", "choices", "usage", "system_fingerprint"})


class _Choice:
    def __init__(self) -> None:
        self.text: dict[str, list[str]] = {}
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.logprobs: list[Any] | None = None
        self.finish: str | None = None
        self.stop_reason: Any = None

    def feed(self, choice: dict[str, Any]) -> str | None:
        """Add one chunk's choice; returns why the stream cannot be replayed, if so."""
        unknown = [k for k, v in choice.items() if k not in _CHAT_CHOICE_FIELDS and v is not None]
        if unknown:
            return f"choice field {unknown[0]!r}"
        delta = choice.get("delta") or {}
        for name, value in delta.items():
            if value is None or name == "role":
                continue
            if name in _TEXT_DELTA_FIELDS and isinstance(value, str):
                self.text.setdefault(name, []).append(value)
            elif name == "tool_calls":
                for call in value:
                    self._merge_call(call)
            else:
                return f"delta field {name!r}"
        logprobs = choice.get("logprobs")
        if logprobs:
            if set(logprobs) - {"content", "refusal"} or logprobs.get("refusal"):
                return "logprobs beyond token content"
            self.logprobs = (self.logprobs or []) + list(logprobs.get("content") or [])
        if choice.get("finish_reason"):
            self.finish = choice["finish_reason"]
            self.stop_reason = choice.get("stop_reason")
        return None

    def _merge_call(self, call: dict[str, Any]) -> None:
        # OpenAI streams a tool call as pieces: id, type and name once, arguments in fragments
        slot = self.tool_calls.setdefault(int(call.get("index", 0)), {"function": {"arguments": ""}})
        for key in ("id", "type"):
            if call.get(key):
                slot[key] = call[key]
        function = call.get("function") or {}
        if function.get("name"):
            slot["function"]["name"] = function["name"]
        slot["function"]["arguments"] += function.get("arguments") or ""

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant"}
        for name, parts in self.text.items():
            message[name] = "".join(parts)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        elif "content" not in message:
            message["content"] = ""
        return message


def with_usage(request: dict[str, Any]) -> dict[str, Any]:
    """A streamed request as the engine gets it: always with the usage chunk. The stored answer
    then carries `usage` whichever client streamed it first, so a later non-streamed hit (whose
    `usage` an OpenAI client reads as always there) or an `include_usage` replay is whole. The
    chunk goes to the client only when it asked (see :func:`is_usage_only`); per-chunk usage
    (`continuous_usage_stats`) stays the client's choice, as vLLM applies it only with usage on."""
    opts = dict(request.get("stream_options") or {})
    if opts.get("include_usage"):
        return request
    opts.pop("continuous_usage_stats", None)
    return {**request, "stream_options": {**opts, "include_usage": True}}


def is_usage_only(chunk: str) -> bool:
    """True for the stream's usage chunk (no choices, only `usage`), as vLLM sends it last."""
    if '"choices":[]' not in chunk and '"choices": []' not in chunk:
        return False  # every other chunk: no JSON parse on the streaming path
    part = chunk.strip()
    if not part.startswith("data: {"):
        return False
    body = json.loads(part[6:])
    return body.get("choices") == [] and body.get("usage") is not None


def is_done(chunk: str) -> bool:
    """True for the stream's end marker alone (``data: [DONE]``), as the engine sends it."""
    return chunk.strip() == "data: [DONE]"


class StreamAssembler:
    """Rebuilds the full completion from vLLM's SSE chunks, so a streamed miss can be cached.

    :meth:`completion` gives an answer only for a stream that ended properly: ``[DONE]`` seen, no
    error chunk (vLLM reports a failure mid-stream as ``data: {"error": ...}`` then ``[DONE]``),
    every choice with its finish reason, and nothing the assembler cannot replay exactly (tool
    call fragments and token logprobs are merged; an unknown delta field refuses). Whether that
    answer may be stored is then :func:`caches.chat.storable`'s call.
    """

    object_name = "chat.completion"
    chunk_fields = _CHAT_CHUNK_FIELDS

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.choices: dict[int, Any] = {}
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.problem: str | None = None  # why this stream cannot be stored, once known

    def feed(self, line: str) -> None:
        for part in line.split("\n"):
            if not part.startswith("data: "):
                continue
            if part == "data: [DONE]":
                self.done = True
                continue
            chunk = json.loads(part[6:])
            if "error" in chunk:
                self.problem = self.problem or f"error chunk: {chunk['error']}"
                continue
            unknown = [k for k, v in chunk.items() if k not in self.chunk_fields and v is not None]
            if unknown:
                self.problem = self.problem or f"cannot replay chunk field {unknown[0]!r}"
            self.head = self.head or {k: chunk[k] for k in ("id", "created", "model", "system_fingerprint")
                                      if chunk.get(k) is not None}
            if chunk.get("usage"):
                self.usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                why = self.choices.setdefault(int(choice.get("index", 0)), self._new_choice()).feed(choice)
                if why is not None:
                    self.problem = self.problem or f"cannot replay {why}"

    def completion(self) -> dict[str, Any] | None:
        """The whole answer, or None when the stream did not end properly (see the class doc)."""
        if self.problem is not None or not self.done or not self.head or not self.choices:
            return None
        if any(c.finish is None for c in self.choices.values()):
            return None
        choices = []
        for i, c in sorted(self.choices.items()):
            choice = {"index": i, **self._choice_body(c)}
            if c.stop_reason is not None:
                choice["stop_reason"] = c.stop_reason
            choices.append(choice)
        return {**self.head, "object": self.object_name, "choices": choices, "usage": self.usage}

    # The route-specific part (chat here; legacy completions in deployments.openai_surface).
    def _new_choice(self) -> Any:
        return _Choice()

    def _choice_body(self, c: Any) -> dict[str, Any]:
        return {"message": c.message(), "finish_reason": c.finish,
                "logprobs": {"content": c.logprobs} if c.logprobs is not None else None}
