"""Request schemas: a JSON boolean where a number is asked is refused, not read as 1 or 0; what
would fail later as a 500 (a non-object `stream_options`, a non-string text part, a lone UTF-16
surrogate) is a validation error that says where; OpenAI's explicit nulls mean the default."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from deployments.schemas import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    EventRequest,
    RecommendationRequest,
)

MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


@pytest.mark.parametrize(
    ("schema", "body", "field"),
    [
        (RecommendationRequest, {"user_id": True, "k": 3}, "user_id"),
        (RecommendationRequest, {"user_id": 1, "k": True}, "k"),
        (EventRequest, {"user_id": 1, "item_id": False, "type": "view"}, "item_id"),
        (EventRequest, {"user_id": 1, "item_id": 2, "type": "rating", "value": True}, "value"),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "max_tokens": True}, "max_tokens"),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "temperature": False}, "temperature"),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "seed": True}, "seed"),
        (CompletionRequest, {"model": "m", "prompt": "hi", "n": True}, "n"),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "n": True}, "n"),
    ],
)
def test_a_boolean_is_not_a_number(schema: type[BaseModel], body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        schema.model_validate(body)
    (error,) = err.value.errors()
    assert error["loc"] == (field,)
    assert "not a boolean" in error["msg"]


def test_numbers_still_pass_as_before() -> None:
    assert RecommendationRequest.model_validate({"user_id": 7, "k": 3}).user_id == 7
    assert RecommendationRequest.model_validate({"user_id": "7"}).user_id == 7  # lax: a numeric string
    event = EventRequest.model_validate({"user_id": 1, "item_id": 2, "type": "rating", "value": 4})
    assert event.value == 4.0
    chat = ChatRequest.model_validate({"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": 5})
    assert (chat.temperature, chat.max_tokens) == (0.0, 5)


@pytest.mark.parametrize(
    ("schema", "body", "fragment"),
    [
        # each of these was a 500 further in (an AttributeError, a TypeError, a UnicodeEncodeError)
        (ChatRequest, {"model": "m", "messages": MESSAGES, "stream_options": True}, "stream_options"),
        (CompletionRequest, {"model": "m", "prompt": "hi", "stream_options": "x"}, "stream_options"),
        (ChatRequest, {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}]},
         "content[0].text must be a string"),
        (ChatRequest, {"model": "m", "messages": [{"role": "system", "content": [{"type": "text", "text": None}]},
                                                  *MESSAGES]}, "content[0].text must be a string"),
        (ChatRequest, {"model": "m", "messages": [{"role": "user", "content": [{"text": "hi"}]}]}, "'type'"),
        (ChatRequest, json.loads('{"model": "m", "messages": [{"role": "user", "content": "hi \\ud800"}]}'),
         "messages[0].content contains an unpaired UTF-16 surrogate"),
        (ChatRequest, json.loads('{"model": "m", "messages": [{"role": "user", "content": "hi"}], "x": ["\\udc00"]}'),
         "x[0] contains an unpaired UTF-16 surrogate"),
        (EmbeddingRequest, json.loads('{"input": ["\\ud83d"]}'), "surrogate"),
        (CompletionRequest, {"model": "m", "prompt": [True, False]}, "prompt"),  # token ids are numbers
    ],
)
def test_what_would_fail_later_is_refused_with_where(schema: type[BaseModel], body: dict[str, Any],
                                                     fragment: str) -> None:
    with pytest.raises(ValidationError) as err:
        schema.model_validate(body)
    assert fragment in str(err.value), str(err.value)


def test_explicit_nulls_mean_the_default_and_real_text_passes() -> None:
    chat = ChatRequest.model_validate({"model": "m", "messages": MESSAGES, "stream": None, "n": None})
    assert (chat.stream, chat.n) == (False, 1)
    # a surrogate *pair* is one character (an emoji): valid
    text = json.loads('"\\ud83d\\ude00 ok"')
    assert ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": text}]})
    parts = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    assert ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": parts}]})
    options = ChatRequest.model_validate({"model": "m", "messages": MESSAGES, "stream": True,
                                          "stream_options": {"include_usage": True}})
    assert options.model_dump(mode="json", exclude_unset=True)["stream_options"] == {"include_usage": True}


def nested(depth: int) -> Any:
    """A value `depth` lists deep: [[[...[1]...]]]."""
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [300, 950])
@pytest.mark.parametrize(
    ("schema", "base"),
    [(ChatRequest, {"model": "m", "messages": MESSAGES}), (CompletionRequest, {"model": "m", "prompt": "hi"})],
)
def test_deep_nesting_is_refused_while_validating(schema: type[BaseModel], base: dict[str, Any], depth: int) -> None:
    # past ~255 levels `model_dump(mode="json")` (the engine's body, the cache key) raised: a 500
    with pytest.raises(ValidationError) as err:
        schema.model_validate({**base, "response_format": {"type": "json_schema", "x": nested(depth)}})
    assert "response_format is nested more than 64 levels deep: send a flatter body" in str(err.value), str(err.value)


def test_nesting_within_the_bound_passes_and_serializes() -> None:
    # the body object is level 1: 63 lists in `x` make 64 levels, the most allowed
    chat = ChatRequest.model_validate({"model": "m", "messages": MESSAGES, "x": nested(63)})
    assert chat.model_dump(mode="json", exclude_unset=True)["x"] == nested(63)
    with pytest.raises(ValidationError, match="nested more than 64"):
        ChatRequest.model_validate({"model": "m", "messages": MESSAGES, "x": nested(64)})


@pytest.mark.parametrize(
    ("schema", "body", "where"),
    [
        (ChatRequest, {"model": "m", "messages": MESSAGES, "presence_penalty": float("nan")}, "presence_penalty is NaN"),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "frequency_penalty": float("inf")},
         "frequency_penalty is Infinity"),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "repetition_penalty": float("-inf")},
         "repetition_penalty is -Infinity"),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "top_k": float("nan")}, "top_k is NaN"),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "min_p": float("nan")}, "min_p is NaN"),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "logit_bias": {"42": float("nan")}}, "logit_bias.42 is NaN"),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "x": [{"y": [0, float("inf")]}]}, "x[0].y[1] is Infinity"),
        (CompletionRequest, {"model": "m", "prompt": "hi", "presence_penalty": float("nan")}, "presence_penalty is NaN"),
        (EmbeddingRequest, {"input": "hi", "x": float("nan")}, "x is NaN"),
    ],
)
def test_non_finite_numbers_are_refused_with_where(schema: type[BaseModel], body: dict[str, Any], where: str) -> None:
    # `model_dump(mode="json")` writes NaN and Infinity as null, then the null is dropped as "the
    # default": `presence_penalty: NaN` was the plain request (and hit its cache entry)
    with pytest.raises(ValidationError) as err:
        schema.model_validate(body)
    assert f"{where}, which is not a JSON number: send a finite number" in str(err.value), str(err.value)


def test_json_text_with_nan_is_refused_too() -> None:
    # Python's JSON reader (FastAPI's) takes NaN, Infinity and 1e999 (Infinity)
    body = json.loads('{"model": "m", "messages": [{"role": "user", "content": "hi"}], "min_p": 1e999}')
    with pytest.raises(ValidationError, match="min_p is Infinity"):
        ChatRequest.model_validate(body)


STREAMED = {"model": "m", "messages": MESSAGES, "stream": True}
COMPLETION = {"model": "m", "prompt": "hi"}


@pytest.mark.parametrize(
    ("schema", "body", "field", "message"),
    [
        (ChatRequest, {"model": "m", "messages": MESSAGES, "stream_options": {"include_usage": True}},
         "stream_options", "Stream options can only be defined when `stream=True`."),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "stream": False, "stream_options": {"include_usage": None}},
         "stream_options", "Stream options can only be defined when `stream=True`."),
        (CompletionRequest, {**COMPLETION, "stream_options": {"include_usage": False}},
         "stream_options", "Stream options can only be defined when `stream=True`."),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "user": 123}, "user", "valid string"),
        (CompletionRequest, {**COMPLETION, "user": ["u"]}, "user", "valid string"),
        (ChatRequest, {**STREAMED, "prompt_logprobs": 1}, "prompt_logprobs",
         "`prompt_logprobs` are not available when `stream=True`."),
        (ChatRequest, {**STREAMED, "prompt_logprobs": -1}, "prompt_logprobs",
         "`prompt_logprobs` are not available when `stream=True`."),
        (CompletionRequest, {**COMPLETION, "stream": True, "prompt_logprobs": 2}, "prompt_logprobs",
         "`prompt_logprobs` are not available when `stream=True`."),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "prompt_logprobs": "1"}, "prompt_logprobs",
         "`prompt_logprobs` must be an integer."),
        (CompletionRequest, {**COMPLETION, "prompt_logprobs": -2}, "prompt_logprobs",
         "`prompt_logprobs` must be a positive value or -1."),
        # not in the cache key (they do not change the answer): refused here, or a hit is a 200
        (ChatRequest, {"model": "m", "messages": MESSAGES, "stream_interval": 0}, "stream_interval",
         "`stream_interval` must be an integer of at least 1"),
        (ChatRequest, {**STREAMED, "stream_interval": True}, "stream_interval",
         "`stream_interval` must be an integer of at least 1"),
        (CompletionRequest, {**COMPLETION, "stream_interval": 1.5}, "stream_interval",
         "`stream_interval` must be an integer of at least 1"),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "request_id": 123}, "request_id",
         "`request_id` must be a string"),
        (CompletionRequest, {**COMPLETION, "request_id": ["r"]}, "request_id", "`request_id` must be a string"),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "priority": "high"}, "priority",
         "`priority` must be a 64-bit integer"),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "priority": 1.5}, "priority",
         "`priority` must be a 64-bit integer"),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "priority": True}, "priority",
         "default 0), not a boolean"),
        (CompletionRequest, {**COMPLETION, "priority": 2**63}, "priority", "`priority` must be a 64-bit integer"),
    ],
)
def test_what_vllm_refuses_is_refused_before_the_cache(schema: type[BaseModel], body: dict[str, Any], field: str,
                                                       message: str) -> None:
    # vLLM validates only on a miss: once the plain request was cached, these were 200s from the
    # exact cache (`user` and a refused `stream_options` do not change the key) while cold a 400
    with pytest.raises(ValidationError) as err:
        schema.model_validate(body)
    (error,) = err.value.errors()
    assert error["loc"] == (field,) and message in error["msg"], error


@pytest.mark.parametrize(
    ("schema", "body"),
    [
        (ChatRequest, {**STREAMED, "stream_options": {"include_usage": True}, "user": "alice"}),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "stream_options": {}}),  # vLLM: an empty object passes
        (ChatRequest, {"model": "m", "messages": MESSAGES, "stream_options": None, "user": None}),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "prompt_logprobs": 3}),
        (ChatRequest, {**STREAMED, "prompt_logprobs": 0}),
        (CompletionRequest, {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}, "user": "a"}),
        (CompletionRequest, {**COMPLETION, "prompt_logprobs": -1}),
        (ChatRequest, {**STREAMED, "stream_interval": 4, "request_id": "req-1", "priority": -2}),
        (CompletionRequest, {**COMPLETION, "stream_interval": 1, "request_id": "", "priority": 2**63 - 1}),
        (ChatRequest, {"model": "m", "messages": MESSAGES, "request_id": None, "priority": None}),
    ],
)
def test_what_vllm_takes_still_passes_unchanged(schema: type[BaseModel], body: dict[str, Any]) -> None:
    # the engine's body is this dump: the typed fields must not add, drop or change anything
    assert schema.model_validate(body).model_dump(mode="json", exclude_unset=True) == body


@pytest.mark.parametrize("role", ["system", "developer"])
@pytest.mark.parametrize(
    ("part", "kind"),
    [
        ({"type": "image_url", "image_url": {"url": "http://x/y.png"}}, "image_url"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "input_audio"),
        ({"type": "image_url", "image_url": {"url": "http://x/y.png"}, "text": "a caption"}, "image_url"),
        ({"type": "refusal", "refusal": "no"}, "refusal"),
    ],
)
def test_system_and_developer_messages_take_text_parts_only(role: str, part: dict[str, Any], kind: str) -> None:
    # their text is merged into the leading system message (caches/prompts.build_messages): any
    # other part was dropped silently and the request shared the identity of the one without it
    body = {"model": "m", "messages": [{"role": role, "content": [{"type": "text", "text": "be brief"}, part]},
                                       *MESSAGES]}
    with pytest.raises(ValidationError) as err:
        ChatRequest.model_validate(body)
    (error,) = err.value.errors()
    assert error["loc"] == ("messages", 0, "content"), error
    assert f"content[1] has type '{kind}', but a {role} message takes text parts only" in error["msg"], error


def test_text_parts_still_pass_in_system_messages() -> None:
    parts = [{"type": "text", "text": "be brief"}, {"type": "input_text", "text": "and kind"}]
    body = {"model": "m", "messages": [{"role": "system", "content": parts}, {"role": "developer", "content": "x"},
                                       *MESSAGES]}
    assert ChatRequest.model_validate(body).model_dump(mode="json", exclude_unset=True) == body


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_rating_must_be_a_finite_number(value: float) -> None:
    # NaN was refused as "Input should be greater than or equal to 0", which says nothing useful
    with pytest.raises(ValidationError) as err:
        EventRequest.model_validate({"user_id": 1, "item_id": 2, "type": "rating", "value": value})
    (error,) = err.value.errors()
    assert error["loc"] == ("value",) and error["msg"].startswith("must be a finite number"), error
    # the ingress writes `{field}: {msg}`: "value: must be a finite number (a rating from 0 to 5), not NaN"
    assert "a rating from 0 to 5" in error["msg"], error


def test_a_rating_out_of_range_still_says_so() -> None:
    with pytest.raises(ValidationError) as err:
        EventRequest.model_validate({"user_id": 1, "item_id": 2, "type": "rating", "value": 6})
    assert "less than or equal to 5" in str(err.value)
