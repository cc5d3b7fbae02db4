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


def _ingress_without_recs() -> Any:
    """An Ingress as far as the handle lookup uses it: `recommendations_app` names an application
    that is not deployed yet."""
    from types import MethodType, SimpleNamespace

    cls = Ingress.func_or_class
    # not an instance of the class: Serve's ingress wrapper has an async __del__
    fake = SimpleNamespace(settings=SimpleNamespace(recommendations_app="recs"), _recommender=None,
                           _lookup_again_at=0.0)
    for name in ("_recommender_handle", "_recs", "_call"):
        setattr(fake, name, MethodType(getattr(cls, name), fake))
    return fake


def test_a_missing_recs_application_is_a_503_that_says_nothing_was_sent(monkeypatch: Any) -> None:
    from ray import serve

    from deployments.ingress import RecommenderMissing

    lookups: list[str] = []

    def not_found(name: str, app_name: str) -> Any:
        lookups.append(app_name)
        raise KeyError(f"Application '{app_name}' not found")

    monkeypatch.setattr(serve, "get_deployment_handle", not_found)
    ingress = _ingress_without_recs()

    async def scenario() -> list[dict[str, Any]]:
        ingress._lookup_lock = asyncio.Lock()
        out = [await call(ingress, what, lambda w=what: ingress._recs(w), 1.0) for what in ("record_event", "recommend")]
        try:
            await ingress._call("Recommender", "stats")
        except RecommenderMissing:
            out.append({"stats": "gap"})
        return out

    event, recs, stats = asyncio.run(scenario())
    assert event["status"] == 503 and "'recs' is not deployed" in event["message"], event
    assert "nothing was sent" in event["message"] and "may or may not" not in event["message"]
    assert recs["status"] == 503 and stats == {"stats": "gap"}
    # one lookup, not one per call: each asks Serve's controller
    assert lookups == ["recs"]


def test_the_recs_handle_is_looked_up_once_when_it_exists(monkeypatch: Any) -> None:
    from ray import serve

    handle = object()
    lookups: list[str] = []

    def found(name: str, app_name: str) -> Any:
        lookups.append(app_name)
        return handle

    monkeypatch.setattr(serve, "get_deployment_handle", found)
    ingress = _ingress_without_recs()

    async def twice() -> list[Any]:
        ingress._lookup_lock = asyncio.Lock()
        return [await ingress._recommender_handle(), await ingress._recommender_handle()]

    assert asyncio.run(twice()) == [handle, handle] and lookups == ["recs"]
