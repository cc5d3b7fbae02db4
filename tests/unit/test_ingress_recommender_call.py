"""The Ingress's guard around Recommender calls: a replica that dies mid-request or misses the
deadline is a 503 with a message, never a 500 (pure logic: fake awaitables, no Ray cluster)."""

from __future__ import annotations

import asyncio
from typing import Any

from deployments.ingress import RECOMMENDER_RETRY, Ingress

call = Ingress.func_or_class._recommender_call  # the method, unbound from Serve's wrapper


async def answer() -> dict[str, Any]:
    return {"items": [], "status": 200}


async def died() -> dict[str, Any]:
    raise RuntimeError("ActorDiedError: the actor died unexpectedly before finishing this task")


async def hangs() -> dict[str, Any]:
    await asyncio.sleep(5)
    return {}


def test_answers_pass_through() -> None:
    assert asyncio.run(call(None, "recommend", answer, 1.0)) == {"items": [], "status": 200}


def test_a_dead_replica_is_a_503_that_says_what_to_do() -> None:
    out = asyncio.run(call(None, "record_event", died))
    assert out["status"] == 503
    assert "RuntimeError" in out["message"] and RECOMMENDER_RETRY["record_event"] in out["message"]


def test_a_read_is_asked_again_once_after_a_replica_died_an_event_never() -> None:
    calls: list[str] = []

    def first_dies() -> Any:
        calls.append("x")
        return died() if len(calls) == 1 else answer()

    assert asyncio.run(call(None, "recommend", first_dies, 1.0))["status"] == 200
    assert len(calls) == 2
    calls.clear()
    assert asyncio.run(call(None, "record_event", first_dies, 1.0))["status"] == 503
    assert len(calls) == 1  # the push may have happened: sending it again could count it twice
    assert asyncio.run(call(None, "recommend", died, 1.0))["status"] == 503  # twice dead: 503


def test_a_missed_deadline_is_a_503() -> None:
    out = asyncio.run(call(None, "recommend", hangs, 0.05))
    assert out["status"] == 503 and "within 0.05s" in out["message"]


def test_a_failed_encoder_replica_is_a_503_for_embeddings_not_a_500() -> None:
    from types import SimpleNamespace

    import pytest

    from deployments.cached_route import ModelUnavailable
    from deployments.schemas import EmbeddingRequest

    async def dead(*_: Any) -> Any:
        raise RuntimeError("ActorDiedError: the actor died unexpectedly before finishing this task")

    method = SimpleNamespace(remote=dead)
    ingress = SimpleNamespace(_tenant=lambda request: "default", encoder=SimpleNamespace(info=method, embed_for_api=method))
    with pytest.raises(ModelUnavailable, match="retry shortly"):
        asyncio.run(Ingress.func_or_class.embeddings(ingress, EmbeddingRequest(input="hi"), None))
