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
