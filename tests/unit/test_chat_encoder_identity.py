"""The chat path files a vector only under the encoder that made it (pure logic; the Encoder and
SemanticCache handles are stand-ins that record calls). During a rolling update replicas of two
encoders answer side by side: a vector from the new one looked up or stored in a scope that names
the old one would mix two embedding spaces in one scope (wrong semantic hits)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from caches.cache_control import CacheControl
from caches.chat import EncoderIdentity
from deployments.chat import ChatPath, ChatTurn, EncoderChanged, vector_from
from deployments.config import AppSettings
from tests.support import ENCODER, identity

NEW_ENCODER = EncoderIdentity(name=ENCODER.name, version="2")
VECTOR = [0.6, 0.8]
QUESTION = {"messages": [{"role": "user", "content": "How do I reset my PIN?"}], "temperature": 0}
ANSWER = {"id": "x", "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "Open Settings."}}]}


class Remote:
    """A handle method: `.remote(...)` gives an awaitable, as Ray Serve's does."""

    def __init__(self, fn: Callable[..., Awaitable[Any]]) -> None:
        self.remote = fn


class FakeEncoder:
    """Answers as the Encoder deployment does; `identity` is the replica that answers next."""

    def __init__(self, ident: EncoderIdentity) -> None:
        self.identity, self.embeds, self.infos = ident, 0, 0
        self.embed_named, self.info = Remote(self._embed), Remote(self._info)

    async def _embed(self, text: str, tenant: str, store: bool) -> Any:
        self.embeds += 1
        return {"vector": VECTOR, "name": self.identity.name, "version": self.identity.version}

    async def _info(self) -> dict[str, Any]:
        self.infos += 1
        return {"name": self.identity.name, "version": self.identity.version, "dim": len(VECTOR)}


class FakeSemantic:
    """A semantic cache that has a near answer for every scope it is asked about."""

    def __init__(self) -> None:
        self.lookups: list[str] = []
        self.stores: list[str] = []
        self.lookup, self.store = Remote(self._lookup), Remote(self._store)

    async def _lookup(self, scope: str, text: str, vector: list[float]) -> dict[str, Any]:
        self.lookups.append(scope)
        return {"status": "hit", "response": "an answer stored for another question", "similarity": 0.97,
                "created": None}

    async def _store(self, scope: str, text: str, vector: list[float], answer: str,
                     answer_vector: list[float]) -> None:
        self.stores.append(scope)


def chat_path(encoder: FakeEncoder, semantic: FakeSemantic) -> ChatPath:
    # a coalescer is passed so that no Redis client is made; no step here reaches it or the LLM
    return ChatPath(AppSettings(), results=None, version_of=lambda model: "1",  # type: ignore[arg-type]
                    encoder=encoder, semantic=semantic, llm=None, coalescer=object())  # type: ignore[arg-type]


def turn_for(encoder: EncoderIdentity, cache_control: str | None = None) -> ChatTurn:
    """A request after an exact miss, its scope built with `encoder` (what ChatPath.answer does)."""
    return ChatTurn(ident=identity(QUESTION, encoder=encoder), control=CacheControl.parse(cache_control),
                    request=QUESTION, stream=False, include_usage=False, started=0.0, layer="miss",
                    encoder=encoder)


def test_a_vector_is_taken_only_from_the_encoder_its_scope_names() -> None:
    assert vector_from({"vector": VECTOR, "name": "enc", "version": "1"}, ENCODER) == VECTOR
    with pytest.raises(EncoderChanged) as changed:
        vector_from({"vector": VECTOR, "name": "enc", "version": "2"}, ENCODER)
    assert changed.value.expected == ENCODER and changed.value.actual == NEW_ENCODER
    # a reply that does not say who made it (a replica from before this check): not trusted
    for unnamed in (VECTOR, {"vector": VECTOR}, {"vector": VECTOR, "name": "enc", "version": None}):
        with pytest.raises(EncoderChanged) as changed:
            vector_from(unnamed, ENCODER)
        assert changed.value.actual is None


def test_a_vector_from_another_encoder_is_neither_looked_up_nor_stored_and_the_scope_follows() -> None:
    encoder, semantic = FakeEncoder(ENCODER), FakeSemantic()
    path = chat_path(encoder, semantic)

    async def go() -> None:
        kept = await path._encoder_identity()
        assert kept == ENCODER and encoder.infos == 1
        encoder.identity = NEW_ENCODER  # the rolling update: the Encoder now runs another model
        turn = turn_for(kept)
        assert await path._lookup_more(turn) is None  # the near answer of the old scope is not served
        assert semantic.lookups == []
        assert turn.layer == "miss"  # the exact layer never sees a vector: its answer is still stored
        await path._store_more(turn, ANSWER)
        assert semantic.stores == [] and encoder.embeds == 1  # nothing filed under the old scope

        # later requests use the encoder that answered, without asking `info` again
        now = await path._encoder_identity()
        assert now == NEW_ENCODER and encoder.infos == 1
        turn = turn_for(now)
        assert turn.ident.semantic_scope != identity(QUESTION).semantic_scope
        hit = await path._lookup_more(turn)
        assert hit is not None and hit[1] == "semantic"
        assert semantic.lookups == [turn.ident.semantic_scope]

    asyncio.run(go())


def test_the_store_embeds_are_checked_too() -> None:
    encoder, semantic = FakeEncoder(ENCODER), FakeSemantic()
    path = chat_path(encoder, semantic)

    async def go() -> None:
        kept = await path._encoder_identity()
        # the lookup's vector came from the scope's encoder, the answer's from a new replica: the
        # answer judge would compare answer vectors of two spaces, so nothing is stored
        turn = turn_for(kept)
        await path._lookup_more(turn)
        encoder.identity = NEW_ENCODER
        await path._store_more(turn, ANSWER)
        assert semantic.stores == []
        # Cache-Control: no-cache (no lookup): the question's own embedding is checked at the store
        turn = turn_for(kept, "no-cache")
        await path._store_more(turn, ANSWER)
        assert semantic.stores == []
        assert await path._encoder_identity() == NEW_ENCODER
        turn = turn_for(NEW_ENCODER, "no-cache")
        await path._store_more(turn, ANSWER)
        assert semantic.stores == [turn.ident.semantic_scope]

    asyncio.run(go())


def test_a_reply_that_does_not_name_its_encoder_changes_no_kept_identity() -> None:
    encoder, semantic = FakeEncoder(ENCODER), FakeSemantic()
    path = chat_path(encoder, semantic)

    async def unnamed(text: str, tenant: str, store: bool) -> list[float]:
        return VECTOR  # what an Encoder replica from before this check answers

    async def go() -> None:
        kept = await path._encoder_identity()
        encoder.embed_named = Remote(unnamed)
        turn = turn_for(kept)
        assert await path._lookup_more(turn) is None and semantic.lookups == []
        await path._store_more(turn, ANSWER)
        assert semantic.stores == []
        assert await path._encoder_identity() == ENCODER  # nothing was learnt

    asyncio.run(go())
