"""HTTP request and response schemas (pydantic): the API contract of DESIGN.md.

The chat schema checks what the ingress needs to route and cache a request and lets every other
OpenAI field through untouched: vLLM's own request model validates those in the LLM replica.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_MESSAGES = 256
MAX_ID_LEN = 64
MAX_PROMPTS = 32
# vLLM's bounds of `priority` (a signed 64-bit integer, its _INT64_MIN/_INT64_MAX)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# A rating's range (the events route)
MIN_RATING, MAX_RATING = 0.0, 5.0


def _not_bool(value: Any) -> Any:
    # pydantic's lax mode reads JSON true/false as 1/0 (and 1.0/0.0): `{"user_id": true}` would
    # be user 1's recommendations, `"max_tokens": true` one token. A boolean where a number is
    # asked is a client bug: say so (422) instead of answering something.
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
# OpenAI allows an explicit null for these and means the default; pydantic would refuse it.
StreamFlag = Annotated[bool, BeforeValidator(lambda v: False if v is None else v)]
ChoiceCount = Annotated[int, BeforeValidator(lambda v: 1 if v is None else _not_bool(v))]

_SURROGATE = re.compile("[\ud800-\udfff]")
# OpenAI bodies nest about 10 levels (a tool's JSON schema a few more). Far deeper bodies fail
# later as a 500: pydantic refuses to serialize past ~255 levels (`model_dump` for the engine and
# the cache key), and Python's recursion limit is ~1000. Refused while validating instead.
MAX_DEPTH = 64


def _where(path: tuple[str | int, ...]) -> str:
    """`messages[0].content`: a JSON path as the error messages name it."""
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
    return out


def _check_json(value: Any, path: tuple[str | int, ...] = (), depth: int = 1) -> None:
    """Walk the whole body once, refusing with where it is what would fail (or be changed) later:

    - a lone UTF-16 surrogate ("\\ud800", which JSON may escape) is no character: it cannot be
      encoded, hashed into a cache key or tokenised;
    - NaN and Infinity (Python's JSON reader takes them, and 1e999 is Infinity) are no JSON
      numbers: `model_dump(mode="json")` turns them into null, which is then dropped as "the
      default", so `presence_penalty: NaN` would be the plain request, and hit its cache entry;
    - nesting deeper than MAX_DEPTH, which cannot be serialized (checked before going deeper, so
      this walk's own recursion stays bounded too).
    """
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise ValueError(f"{_where(path) or 'a string'} contains an unpaired UTF-16 surrogate: send valid Unicode text")
    elif isinstance(value, float):
        if not math.isfinite(value):
            number = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
            raise ValueError(f"{_where(path) or 'the body'} is {number}, which is not a JSON number: send a finite number")
    elif isinstance(value, dict | list):
        if depth > MAX_DEPTH:
            raise ValueError(f"{_where(path[:1]) or 'the body'} is nested more than {MAX_DEPTH} levels deep: send a flatter body")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            if isinstance(k, str):
                _check_json(k, path, depth)  # a key is text too
            _check_json(v, (*path, k), depth + 1)


def _check_stream_options(options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
    # vLLM refuses stream options without streaming, but only on a cache miss: a hit would answer
    # 200 to the body that is a 400 cold. vLLM tests the object it gets for truth: `{}` passes,
    # `{"include_usage": null}` (sent on as it came) does not.
    if options is not None and options.model_dump(exclude_unset=True) and not info.data.get("stream", True):
        raise ValueError("Stream options can only be defined when `stream=True`.")
    return options


def _check_prompt_logprobs(value: Any, info: ValidationInfo) -> Any:
    # vLLM's own check (its `check_logprobs`), here so that a cached answer is not served to a body
    # the engine would refuse. A boolean counts as a number there too (True is 1).
    if value is None:
        return value
    if not isinstance(value, int | float):
        raise ValueError("`prompt_logprobs` must be an integer.")
    if info.data.get("stream") and (value > 0 or value == -1):
        raise ValueError("`prompt_logprobs` are not available when `stream=True`.")
    if value < 0 and value != -1:
        raise ValueError("`prompt_logprobs` must be a positive value or -1.")
    return value


def _refuse(field: str, value: Any, expected: str) -> PydanticCustomError:
    """A refusal saying what to send (no pydantic "Value error, " in front of it)."""
    got = "a boolean" if isinstance(value, bool) else f"{value!r}"[:40]
    return PydanticCustomError("invalid_value", "`{field}` must be {expected}, not {got}",
                               {"field": field, "expected": expected, "got": got})


def _is_int(value: Any) -> bool:
    # A JSON integer: not a boolean (Python's True is 1), a float (1.0) or a numeric string.
    # Stricter than vLLM's lax reading is safe (refused on a hit and a miss alike); and what passes,
    # passes to the engine unchanged.
    return isinstance(value, int) and not isinstance(value, bool)


# vLLM validates these and refuses a bad value with a 400, but they are not in the cache key
# (caches.chat.NON_ANSWER_FIELDS: they do not change the answer), so vLLM sees them only on a miss.
# Checked here, a bad value is refused whether the answer is cached or not.
def _check_stream_interval(value: Any) -> Any:
    if value is not None and not (_is_int(value) and value >= 1):
        raise _refuse("stream_interval", value, "an integer of at least 1 (tokens per streamed chunk)")
    return value


def _check_request_id(value: Any) -> Any:
    if value is not None and not isinstance(value, str):
        raise _refuse("request_id", value, "a string")
    return value


def _check_priority(value: Any) -> Any:
    if value is not None and not (_is_int(value) and INT64_MIN <= value <= INT64_MAX):
        raise _refuse("priority", value, "a 64-bit integer (lower runs earlier; default 0)")
    return value


class _OpenAIRequest(BaseModel):
    """OpenAI-style bodies: unknown fields pass through to the engine, text must be Unicode,
    numbers finite and nesting bounded."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _json_values(cls, data: Any) -> Any:
        _check_json(data)
        return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")  # vLLM validates what else it knows
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


_TEXT_ONLY_ROLES = ("system", "developer")
# Parts whose text vLLM reads from "text" (as caches/prompts.message_text does); "refusal" and
# "thinking" keep theirs elsewhere and would be dropped from a system message.
_TEXT_PART_TYPES = ("text", "input_text", "output_text")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content: str | list[dict[str, Any]] | None,
                    info: ValidationInfo) -> str | list[dict[str, Any]] | None:
        # A content part is {"type": ..., ...}; a text part's text is a string (the prompt and the
        # cache keys are built from it before the engine would refuse anything else).
        role = info.data.get("role")
        for j, part in enumerate(content if isinstance(content, list) else ()):
            if not isinstance(part.get("type"), str):
                raise ValueError(f"content[{j}] needs a string 'type' (e.g. 'text')")
            if "text" in part and not isinstance(part["text"], str):
                raise ValueError(f"content[{j}].text must be a string")
            if part["type"] == "text" and "text" not in part:
                raise ValueError(f"content[{j}] of type 'text' needs a 'text' string")
            # System and developer messages are merged into one leading text system message
            # (caches/prompts.build_messages keeps their text only): an image there would be
            # dropped silently and the request would share the cache entry of the one without it.
            # OpenAI takes text parts only there too.
            if role in _TEXT_ONLY_ROLES and (part["type"] not in _TEXT_PART_TYPES or "text" not in part):
                raise ValueError(f"content[{j}] has type '{part['type']}', but a {role} message takes text parts only "
                                 "(type 'text'): put images and other media in a user message")
        return content


class ChatRequest(_OpenAIRequest):
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: StreamFlag = False
    stream_options: StreamOptions | None = None
    n: ChoiceCount = Field(default=1, ge=1, le=8)
    max_tokens: Int | None = Field(default=None, ge=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    temperature: Float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: Float | None = Field(default=None, gt=0.0, le=1.0)
    seed: Int | None = None
    stop: str | list[str] | None = None
    # `user`, `prompt_logprobs` and the `stream_options` check are vLLM's rules, checked here
    # because vLLM sees a request only on a miss: validity must not depend on whether the answer
    # is cached (`user` is not even in the cache key: it never changes the answer).
    user: str | None = None
    prompt_logprobs: Any = None  # vLLM: a number, -1 or more, none when streaming
    stream_interval: Any = None  # vLLM: an integer >= 1
    request_id: Any = None  # vLLM: a string
    priority: Any = None  # vLLM: a 64-bit integer

    _stream_options = field_validator("stream_options")(_check_stream_options)
    _prompt_logprobs = field_validator("prompt_logprobs")(_check_prompt_logprobs)
    _stream_interval = field_validator("stream_interval")(_check_stream_interval)
    _request_id = field_validator("request_id")(_check_request_id)
    _priority = field_validator("priority")(_check_priority)

    @field_validator("messages")
    @classmethod
    def _needs_user_turn(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" for m in messages):
            raise ValueError("messages must contain at least one message with role 'user'")
        for i, m in enumerate(messages):
            if m.role == "user" and not m.content:
                raise ValueError(f"messages[{i}] (role 'user') has empty content")
        return messages


class EmbeddingRequest(_OpenAIRequest):
    input: str | list[str] = Field(min_length=1)
    model: str | None = None
    # The official SDK asks for base64 unless told otherwise: both must work.
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int | None = Field(default=None, ge=1)  # the route refuses what the model cannot give

    @field_validator("input", mode="before")
    @classmethod
    def _no_token_ids(cls, value: Any) -> Any:
        # OpenAI also takes token ids (its own tokenizer's): they mean nothing to MiniLM's WordPiece.
        if isinstance(value, list) and value and all(isinstance(v, int | list) for v in value):
            raise ValueError("input as token ids is not supported by this embedding model: send text (a string or a list of strings)")
        return value

    @field_validator("input")
    @classmethod
    def _bounded(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if len(texts) > 256:
            raise ValueError("at most 256 inputs per request")
        if any(not t for t in texts):
            raise ValueError("inputs must be non-empty strings")
        if any(len(t) > 8192 for t in texts):
            raise ValueError("each input must be at most 8192 characters")
        return value


class CompletionRequest(_OpenAIRequest):
    """Legacy `/v1/completions`: what the ingress needs to route it; vLLM validates the rest."""

    model: str = Field(min_length=1, max_length=256)
    # Text, texts, token ids or lists of token ids, as OpenAI and vLLM take them.
    prompt: str | list[str] | list[Int] | list[list[Int]] = Field(min_length=1)
    stream: StreamFlag = False
    stream_options: StreamOptions | None = None
    n: ChoiceCount = Field(default=1, ge=1, le=8)
    max_tokens: Int | None = Field(default=None, ge=1)
    temperature: Float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: Float | None = Field(default=None, gt=0.0, le=1.0)
    seed: Int | None = None
    stop: str | list[str] | None = None
    # as on ChatRequest: checked here because vLLM sees only misses
    user: str | None = None
    prompt_logprobs: Any = None
    stream_interval: Any = None
    request_id: Any = None
    priority: Any = None

    _stream_options = field_validator("stream_options")(_check_stream_options)
    _prompt_logprobs = field_validator("prompt_logprobs")(_check_prompt_logprobs)
    _stream_interval = field_validator("stream_interval")(_check_stream_interval)
    _request_id = field_validator("request_id")(_check_request_id)
    _priority = field_validator("priority")(_check_priority)

    @field_validator("prompt")
    @classmethod
    def _bounded(cls, value: str | list[str] | list[Int] | list[list[Int]]) -> str | list[str] | list[Int] | list[list[Int]]:
        if isinstance(value, list) and value and isinstance(value[0], str | list):
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
            if any(not p for p in value):
                raise ValueError("prompts must not be empty")
        return value


UserId = Int


class RecommendationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: UserId = Field(ge=0, le=2**62, description="MovieLens-style integer user id")
    k: Int = Field(default=10, ge=1, le=100)


class RecommendedItem(BaseModel):
    item_id: int
    score: float


class RecommendationResponse(BaseModel):
    user_id: int
    items: list[RecommendedItem]
    model_version: str
    cold_start: bool = False
    degraded: bool = False
    cached: bool = False


class EventRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: UserId = Field(ge=0, le=2**62)
    item_id: Int = Field(ge=0, le=2**62)
    type: Literal["view", "click", "rating"]
    value: Float | None = Field(default=None, ge=MIN_RATING, le=MAX_RATING)

    @field_validator("value", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        # Python's JSON reader takes NaN and Infinity (and 1e999): NaN failed the range check as
        # "greater than or equal to 0", which does not say what is wrong (as on the OpenAI routes)
        if isinstance(value, float) and not math.isfinite(value):
            number = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
            raise PydanticCustomError(
                "finite_number", "must be a finite number (a rating from {low} to {high}), not {number}",
                {"low": f"{MIN_RATING:g}", "high": f"{MAX_RATING:g}", "number": number})
        return value


class VersionBump(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=1, max_length=MAX_ID_LEN, pattern=r"^[A-Za-z0-9._-]+$")
