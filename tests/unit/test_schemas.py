"""Request schemas: a JSON boolean where a number is asked is refused, not read as 1 or 0."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from deployments.schemas import ChatRequest, CompletionRequest, EventRequest, RecommendationRequest

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
