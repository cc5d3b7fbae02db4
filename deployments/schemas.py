"""HTTP request and response schemas (pydantic): the API contract of DESIGN.md.

The chat schema checks what the ingress needs to route and cache a request and lets every other
OpenAI field through untouched: vLLM's own request model validates those in the LLM replica.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

MAX_MESSAGES = 256
MAX_ID_LEN = 64
MAX_PROMPTS = 32


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


def _valid_unicode(value: Any, where: str = "") -> None:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"), which is no character: it cannot be
    encoded, hashed into a cache key or tokenised. Refused with where it is, not a 500 later."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise ValueError(f"{where or 'a string'} contains an unpaired UTF-16 surrogate: send valid Unicode text")
    elif isinstance(value, dict):
        for k, v in value.items():
            _valid_unicode(k, where)
            _valid_unicode(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _valid_unicode(v, f"{where}[{i}]")


class _OpenAIRequest(BaseModel):
    """OpenAI-style bodies: unknown fields pass through to the engine, text must be Unicode."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        _valid_unicode(data)
        return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")  # vLLM validates what else it knows
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        # A content part is {"type": ..., ...}; a text part's text is a string (the prompt and the
        # cache keys are built from it before the engine would refuse anything else).
        for j, part in enumerate(content if isinstance(content, list) else ()):
            if not isinstance(part.get("type"), str):
                raise ValueError(f"content[{j}] needs a string 'type' (e.g. 'text')")
            if "text" in part and not isinstance(part["text"], str):
                raise ValueError(f"content[{j}].text must be a string")
            if part["type"] == "text" and "text" not in part:
                raise ValueError(f"content[{j}] of type 'text' needs a 'text' string")
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
    value: Float | None = Field(default=None, ge=0.0, le=5.0)


class VersionBump(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=1, max_length=MAX_ID_LEN, pattern=r"^[A-Za-z0-9._-]+$")
