"""Every OpenAI route driven with the official `openai` SDK, parsed into its typed objects.

The SDK builds its objects leniently (`construct`: a missing field or a wrong type passes
silently), so each object is checked here the strict way: re-validated with pydantic from its own
dump (types, required fields), dumped again unchanged (round trip), and every field the SDK did
not know (pydantic's `model_extra`, at any depth) must be one of the named vendor extensions below.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
import openai
import pytest
from pydantic import BaseModel

ENCODER = "all-MiniLM-L6-v2"
# Fields vLLM adds to OpenAI's objects (its documented extensions), and tierserve's own on model
# cards. Anything else the SDK cannot place is a conformance failure.
VLLM_EXTRAS = {"prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params", "ec_transfer_params",
               "metrics", "stop_reason", "token_ids", "routed_experts", "reasoning", "created_cache_tokens",
               "multimodal_tokens", "service_tier"}
CARD_EXTRAS = {"max_model_len", "version", "dimensions"}


def extras(obj: Any, path: str = "$") -> dict[str, str]:
    """{path: field name} of every field the SDK kept in `model_extra`, at any depth."""
    found: dict[str, str] = {}
    if isinstance(obj, BaseModel):
        found |= {f"{path}.{k}": k for k in (obj.model_extra or {})}
        for name in type(obj).model_fields:
            found |= extras(getattr(obj, name, None), f"{path}.{name}")
    elif isinstance(obj, list | tuple):
        for i, item in enumerate(obj):
            found |= extras(item, f"{path}[{i}]")
    return found


def missing_required(obj: Any, path: str = "$", relaxed: frozenset[str] = frozenset()) -> list[str]:
    """Required fields the server did not send (construct leaves them unset rather than failing)."""
    found: list[str] = []
    if isinstance(obj, BaseModel):
        for name, field in type(obj).model_fields.items():
            if field.is_required() and name not in obj.model_fields_set and name not in relaxed:
                found.append(f"{path}.{name}")
            found += missing_required(getattr(obj, name, None), f"{path}.{name}", relaxed)
    elif isinstance(obj, list | tuple):
        for i, item in enumerate(obj):
            found += missing_required(item, f"{path}[{i}]", relaxed)
    return found


def conforms(obj: BaseModel, allowed_extras: set[str] = VLLM_EXTRAS, chunk_fill: dict[str, Any] | None = None) -> BaseModel:
    """`chunk_fill`: choice fields a stream chunk may leave null although the SDK's type requires
    them, with a stand-in value for the strict check (legacy completion chunks: see below)."""
    fill = chunk_fill or {}
    missing = missing_required(obj, relaxed=frozenset(fill))
    assert not missing, f"{type(obj).__name__}: required fields missing: {missing}"
    # Serializer warnings off: the strict validation just below reports a wrong type as an error.
    dumped = obj.model_dump(mode="json", by_alias=True, exclude_unset=True, warnings=False)
    for choice in dumped.get("choices") or []:
        choice.update({k: v for k, v in fill.items() if choice.get(k) is None})
    strict = type(obj).model_validate(dumped)  # raises on a wrong type or a missing field
    assert strict.model_dump(mode="json", by_alias=True, exclude_unset=True) == dumped, "does not round-trip"
    unknown = {p: k for p, k in extras(obj).items() if k not in allowed_extras}
    assert not unknown, f"{type(obj).__name__}: fields the SDK cannot parse: {sorted(unknown)}"
    return obj


def conform_all(items: Iterable[BaseModel], allowed_extras: set[str] = VLLM_EXTRAS) -> list[BaseModel]:
    return [conforms(i, allowed_extras) for i in items]


@pytest.fixture(scope="module")
def oa(app_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused", max_retries=0, timeout=180)


def tag() -> str:
    return uuid.uuid4().hex[:6]


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def test_the_checks_catch_what_the_sdk_lets_through() -> None:
    """No app needed: the SDK's lenient parsing accepts each of these; `conforms` must not."""
    from openai._models import construct_type
    from openai.types.chat import ChatCompletion

    good = {"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop", "stop_reason": None}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    conforms(construct_type(type_=ChatCompletion, value=good))
    broken = [
        {**good, "created": "yesterday"},
        {k: v for k, v in good.items() if k != "created"},
        {**good, "choices": [{**good["choices"][0], "finish_reason": None}]},
        {**good, "choices": [{**good["choices"][0], "message": {"role": "assistant", "content": "hi", "bogus": 1}}]},
    ]
    for body in broken:
        with pytest.raises((AssertionError, ValueError)):
            conforms(construct_type(type_=ChatCompletion, value=body))


# ------------------------------------------------------------------------------------- chat
def test_chat_plain_then_cached_replay(oa: openai.OpenAI, model_name: str) -> None:
    messages = user(f"What is the capital of France? ({tag()})")
    fresh = oa.chat.completions.with_raw_response.create(model=model_name, messages=messages, temperature=0, max_tokens=12)
    first = conforms(fresh.parse())
    assert first.object == "chat.completion" and first.choices[0].message.role == "assistant"
    assert first.usage is not None and first.usage.prompt_tokens > 0
    again = oa.chat.completions.with_raw_response.create(model=model_name, messages=messages, temperature=0, max_tokens=12)
    assert again.headers["x-cache"] == "exact"
    assert conforms(again.parse()).choices[0].message.content == first.choices[0].message.content
    # The cached answer replayed as a stream must parse like a fresh stream.
    replay = oa.chat.completions.with_raw_response.create(model=model_name, messages=messages, temperature=0,
                                                          max_tokens=12, stream=True, stream_options={"include_usage": True})
    assert replay.headers["x-cache"] == "exact"
    chunks = conform_all(replay.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first.choices[0].message.content
    assert chunks[-1].usage is not None


def test_chat_stream_with_usage(oa: openai.OpenAI, model_name: str) -> None:
    stream = oa.chat.completions.create(model=model_name, messages=user(f"Count to three. ({tag()})"), temperature=0,
                                        max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = conform_all(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_chat_n_and_logprobs(oa: openai.OpenAI, model_name: str) -> None:
    two = conforms(oa.chat.completions.create(model=model_name, messages=user(f"Name a colour. ({tag()})"),
                                              temperature=0.8, seed=7, n=2, max_tokens=6))
    assert sorted(c.index for c in two.choices) == [0, 1]
    lp = conforms(oa.chat.completions.create(model=model_name, messages=user(f"Say yes. ({tag()})"), temperature=0,
                                             max_tokens=4, logprobs=True, top_logprobs=2))
    content = lp.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_chat_json_object_content_parts_and_multi_turn(oa: openai.OpenAI, model_name: str) -> None:
    js = conforms(oa.chat.completions.create(
        model=model_name, temperature=0, max_tokens=40, response_format={"type": "json_object"},
        messages=user(f"Give a JSON object with a key 'city' for the capital of France. ({tag()})")))
    text = js.choices[0].message.content or ""
    assert text.lstrip().startswith("{")
    if js.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    parts = conforms(oa.chat.completions.create(
        model=model_name, temperature=0, max_tokens=8,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}, {"type": "text", "text": tag()}]}]))
    assert parts.choices[0].message.content
    turns = conforms(oa.chat.completions.create(model=model_name, temperature=0, max_tokens=8, messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": f"What is my name? ({tag()})"},
    ]))
    assert turns.choices[0].message.content


def test_chat_tools_on_the_cpu_model_is_a_clear_400(oa: openai.OpenAI, model_name: str) -> None:
    # SmolLM2 is served without a tool-call parser (configs/gpu.yaml enables one for Qwen2.5).
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    with pytest.raises(openai.BadRequestError) as info:
        oa.chat.completions.create(model=model_name, messages=user("Weather in Paris?"), tools=tools, tool_choice="auto",
                                   temperature=0, max_tokens=8)
    assert "tool" in str(info.value).lower()


# ------------------------------------------------------------------------------- embeddings
def test_embeddings_default_base64_and_float_agree(oa: openai.OpenAI) -> None:
    texts = ["hello world", f"cache me {tag()}"]
    default = conforms(oa.embeddings.create(model=ENCODER, input=texts))  # the SDK asks for base64, decodes it
    floats = conforms(oa.embeddings.create(model=ENCODER, input=texts, encoding_format="float"))
    assert default.object == "list" and default.model == ENCODER and [d.index for d in default.data] == [0, 1]
    for a, b in zip(default.data, floats.data, strict=True):
        assert len(a.embedding) == 384
        assert np.array_equal(np.asarray(a.embedding, dtype=np.float32), np.asarray(b.embedding, dtype=np.float32))
    # Asked for explicitly, base64 comes back as sent: little-endian float32 bytes.
    raw = oa.embeddings.create(model=ENCODER, input="hello world", encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(raw.data[0].embedding), dtype="<f4")
    assert np.array_equal(decoded, np.asarray(floats.data[0].embedding, dtype=np.float32))
    assert abs(float(np.linalg.norm(decoded)) - 1.0) < 1e-4
    # Usage counts MiniLM's WordPiece tokens with [CLS] and [SEP]: "hello world" is 4.
    assert (raw.usage.prompt_tokens, raw.usage.total_tokens) == (4, 4)
    assert floats.usage.prompt_tokens > 8


def test_embeddings_dimensions_and_token_input(oa: openai.OpenAI) -> None:
    assert len(oa.embeddings.create(model=ENCODER, input="x y", dimensions=384).data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as info:
        oa.embeddings.create(model=ENCODER, input="x y", dimensions=128)
    assert info.value.body["param"] == "dimensions" and "384" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        oa.embeddings.create(model=ENCODER, input=[[101, 7592, 102]])
    assert "token ids" in info.value.body["message"]


# ------------------------------------------------------------------------------ completions
def test_completions_plain(oa: openai.OpenAI, model_name: str) -> None:
    resp = oa.completions.with_raw_response.create(model=model_name, prompt=f"The capital of France is ({tag()})",
                                                   temperature=0, max_tokens=8, logprobs=2)
    assert resp.headers["x-cache"] == "miss"  # greedy: cached (exact only, see the route)
    out = conforms(resp.parse())
    assert out.object == "text_completion" and out.choices[0].text
    assert out.choices[0].logprobs is not None and out.choices[0].logprobs.tokens
    assert out.usage is not None and out.usage.completion_tokens > 0
    many = conforms(oa.completions.create(model=model_name, prompt=["Once upon", "Roses are"], n=2, temperature=0.7,
                                          seed=1, max_tokens=4))
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]


def test_completions_stream_with_usage(oa: openai.OpenAI, model_name: str) -> None:
    resp = oa.completions.with_raw_response.create(model=model_name, prompt=f"One, two, ({tag()})", temperature=0,
                                                   max_tokens=8, stream=True, stream_options={"include_usage": True})
    assert resp.headers["x-cache"] == "miss"
    # The SDK types each chunk as a `Completion`, whose choices require a finish_reason; OpenAI's
    # own stream sends null there until the last chunk, as vLLM does: only that is relaxed.
    chunks = [conforms(c, chunk_fill={"finish_reason": "length"}) for c in resp.parse()]
    assert all(c.object == "text_completion" for c in chunks)
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0


@pytest.mark.parametrize("stream", [False, True])
def test_completions_errors_are_typed_4xx(oa: openai.OpenAI, model_name: str, stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oa.completions.create(model="no-such-model", prompt="x", max_tokens=4, stream=stream)
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        oa.completions.create(model=model_name, prompt="x", max_tokens=10**6, stream=stream)
    # Past the context window: refused by vLLM, still a 400 before any stream starts.
    with pytest.raises(openai.BadRequestError) as info:
        oa.completions.create(model=model_name, prompt="word " * 3000, max_tokens=4, stream=stream)
    assert "context" in str(info.value).lower() or "length" in str(info.value).lower()


# ----------------------------------------------------------------------------------- models
def test_models_list_and_retrieve(oa: openai.OpenAI, model_name: str) -> None:
    cards = conform_all(oa.models.list(), CARD_EXTRAS)
    ids = [c.id for c in cards]
    assert ids[0] == model_name and ENCODER in ids
    assert all(c.object == "model" for c in cards)
    for model_id in (model_name, ENCODER):
        card = conforms(oa.models.retrieve(model_id), CARD_EXTRAS)
        assert card.id == model_id
    for unknown in ("no-such-model", "org/no-such-model"):  # ids may hold a '/'
        with pytest.raises(openai.NotFoundError) as info:
            oa.models.retrieve(unknown)
        assert info.value.body["code"] == "model_not_found" and unknown in info.value.body["message"]
