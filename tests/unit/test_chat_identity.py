"""The request identity: what the caches may do with a chat request (pure logic, no Redis)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from caches.cache_control import CacheControl, age_seconds
from caches.chat import (
    NON_ANSWER_FIELDS,
    SEMANTIC_EXCLUDED_FIELDS,
    CachedAnswer,
    EncoderIdentity,
    ModelIdentity,
    _semantic_parts,
    request_digest,
    semantic_answer,
    storable,
    without_nulls,
)
from tests.support import ENCODER, FINGERPRINT, identity, model_identity

GREEDY = {"temperature": 0}


def ask(text: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}],
            **GREEDY, **extra}


@pytest.mark.parametrize(("a", "b"), [
    ("What is 3²?", "What is 32?"),  # NFKC would merge these
    ('print("Hello")', 'PRINT("hello")'),  # casefold would
    ("def f():\n    return 1", "def f():\n  return 1"),  # whitespace folding would
    ("Is x >= 5?", "Is x > 5?"),
    ("What is 3 + 4?", "What is three + four?"),
    ("ﬁle", "file"),
    ("Hello", "Hello "),
])
def test_exact_means_exact(a: str, b: str) -> None:
    assert identity(ask(a)).exact_key != identity(ask(b)).exact_key


def test_structure_does_not_change_the_key() -> None:
    base = identity(ask("hi")).exact_key
    reordered = {"temperature": 0, "messages": ask("hi")["messages"]}
    assert identity(reordered).exact_key == base
    # numbers are kept as written (caches.keys.canonical_json): 0.0 is another entry, still greedy
    as_float = identity({**ask("hi"), "temperature": 0.0})
    assert as_float.cacheable and as_float.deterministic and as_float.exact_key != base
    # a top-level null means the default: the routes leave it out before the engine and the
    # identity see the request; one that reaches the identity anyway is not merged with "absent"
    assert identity(without_nulls({**ask("hi"), "seed": None})).exact_key == base
    assert identity({**ask("hi"), "tool_choice": None}).exact_key != base


def test_a_refusal_is_shared_only_with_a_byte_identical_request() -> None:
    # vLLM checks fields outside the identity (`stream_options` without `stream`): the leader's
    # 400 is not the answer to a follower that sent the same identity without that mistake
    leader = {**ask("hi"), "stream_options": {"include_usage": True}}
    refusal = CachedAnswer(stored_at=0.0, body={"error": {}}, status=400, request=request_digest(leader))
    assert identity(leader).exact_key == identity(ask("hi")).exact_key
    assert refusal.answers(leader) and not refusal.answers(ask("hi"))
    assert CachedAnswer(stored_at=0.0, body={}).answers(ask("hi"))  # an answer serves the identity


def test_return_token_ids_is_never_cached() -> None:
    # token ids do not survive a streamed store or a streamed replay: a hit would lack them
    got = identity({**ask("hi"), "return_token_ids": True})
    assert not got.cacheable and "return_token_ids" in (got.reason or "")
    assert identity({**ask("hi"), "return_token_ids": False}).cacheable


@pytest.mark.parametrize("field", sorted(NON_ANSWER_FIELDS))
def test_fields_shown_not_to_change_the_answer_are_left_out(field: str) -> None:
    base = identity(ask("hi"))
    other = identity({**ask("hi"), field: {"x": 1} if field in ("metadata", "stream_options") else "x"})
    assert other.exact_key == base.exact_key and other.semantic_scope == base.semantic_scope


@pytest.mark.parametrize("extra", [
    {"response_format": {"type": "json_object"}},
    {"structured_outputs": {"choice": ["Berlin", "Paris"]}},
    {"logit_bias": {"123": 100}},
    {"bad_words": ["Paris"]},
    {"allowed_token_ids": [1, 2, 3]},
    {"chat_template_kwargs": {"enable_thinking": True}},
    {"max_tokens": 5},
    {"stop": ["."]},
    {"seed": 7},
    {"min_tokens": 3},
    {"some_future_vllm_field": 1},  # unknown: part of the identity
])
def test_every_answer_field_is_in_the_key_and_the_scope(extra: dict[str, Any]) -> None:
    base, other = identity(ask("What is the capital of Germany?")), identity(ask("What is the capital of Germany?", **extra))
    assert other.exact_key != base.exact_key
    assert other.semantic_scope is not None and other.semantic_scope != base.semantic_scope


def test_context_is_in_the_scope_and_only_the_question_is_compared() -> None:
    a = identity(ask("What is the capital of France?"))
    b = identity(ask("what's France's capital city"))
    assert a.semantic_scope == b.semantic_scope and a.exact_key != b.exact_key
    assert b.semantic_text == "what's France's capital city"  # as written, for the guard
    other_system = {**ask("What is the capital of France?"), "messages": [
        {"role": "system", "content": "answer in French"}, {"role": "user", "content": "What is the capital of France?"}]}
    assert identity(other_system).semantic_scope != a.semantic_scope
    earlier = {**ask("x"), "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                        {"role": "user", "content": "What is the capital of France?"}]}
    assert identity(earlier).semantic_scope != a.semantic_scope


def test_tenant_model_version_and_encoder_identity() -> None:
    base = identity(ask("hi"))
    assert identity(ask("hi"), tenant="other").exact_key != base.exact_key
    assert identity(ask("hi"), version="2").exact_key != base.exact_key
    changed = identity(ask("hi"), model_identity=model_identity(fingerprint="e" * 64))
    assert changed.exact_key != base.exact_key and changed.semantic_scope != base.semantic_scope
    new_encoder = identity(ask("hi"), encoder=EncoderIdentity(name="enc", version="2"))
    assert new_encoder.exact_key == base.exact_key  # the exact layer never sees a vector
    assert new_encoder.semantic_scope != base.semantic_scope


def test_only_greedy_sampling_is_cacheable_and_defaults_are_read_not_assumed() -> None:
    no_temperature = {"messages": [{"role": "user", "content": "hi"}]}
    vllm_default = identity(no_temperature)  # the model's config sets no temperature: vLLM uses 1.0
    assert not vllm_default.cacheable and "sampled" in (vllm_default.reason or "")
    assert vllm_default.exact_key is None and vllm_default.semantic_scope is None
    greedy_model = identity(no_temperature, model_identity=model_identity(temperature=0.0))
    assert greedy_model.cacheable and greedy_model.deterministic
    assert not identity(no_temperature, model_identity=model_identity(temperature=0.7)).cacheable
    assert identity({**no_temperature, "temperature": 0}).cacheable
    assert not identity({**no_temperature, "temperature": 0.7, "seed": 1}).cacheable  # a seed is no promise
    allowed = identity({**no_temperature, "temperature": 0.7}, cache_nondeterministic=True)
    assert allowed.cacheable and not allowed.deterministic


@pytest.mark.parametrize(("extra", "why"), [
    ({"n": 2}, "n > 1"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
])
def test_semantic_layer_stays_out_where_a_reworded_answer_cannot_serve(extra: dict[str, Any], why: str) -> None:
    ident = identity(ask("hi", **extra))
    assert ident.cacheable and ident.exact_key is not None
    assert ident.semantic_scope is None and why in (ident.semantic_off or "")


def test_semantic_layer_needs_a_text_question_last() -> None:
    prefill = {**GREEDY, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]}
    assert identity(prefill).semantic_scope is None
    image = {**GREEDY, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:x"}}]}]}
    assert identity(image).semantic_scope is None
    parts = {**GREEDY, "messages": [{"role": "user", "content": [{"type": "text", "text": "what is this"}]}]}
    assert identity(parts).semantic_text == "what is this"
    assert identity(ask("hi"), semantic_enabled=False).semantic_scope is None


def _completion(*finish: str | None, **message: Any) -> dict[str, Any]:
    return {"choices": [{"index": i, "finish_reason": f, "message": {"role": "assistant", "content": "x", **message}}
                        for i, f in enumerate(finish)]}


def test_only_complete_answers_are_stored() -> None:
    assert storable(_completion("stop"))[0]
    assert storable(_completion("length"))[0]  # max_tokens is in the key: the same cut every time
    assert storable(_completion("tool_calls"))[0]
    for bad in ([None], ["abort"], ["error"], ["stop", None], []):
        ok, why = storable(_completion(*bad))
        assert not ok and why
    assert semantic_answer(_completion("stop")) == "x"
    assert semantic_answer(_completion("length")) is None  # a cut answer is not served to others
    assert semantic_answer(_completion("stop", "stop")) is None
    assert semantic_answer(_completion("stop", tool_calls=[{"id": "1"}])) is None
    assert semantic_answer(_completion("stop", content="")) is None


def test_cached_answer_round_trip_and_unreadable_entries() -> None:
    entry = CachedAnswer(stored_at=12.5, body={"choices": []})
    assert CachedAnswer.decode(entry.encode()) == entry
    assert CachedAnswer.decode(b'{"choices": []}') is None  # an older release's entry: a miss


def test_cache_control_parsing() -> None:
    assert CacheControl.parse(None) == CacheControl()
    assert CacheControl.parse("no-cache").no_cache and not CacheControl.parse("no-cache").lookup
    assert CacheControl.parse("No-Store").no_store and CacheControl.parse("no-store").lookup
    assert CacheControl.parse("max-age=60, max-age=5").max_age == 5
    assert not CacheControl.parse("max-age=0").lookup
    assert CacheControl.parse("max-age=abc, private").max_age is None  # malformed: ignored
    ctl = CacheControl.parse('max-age="10"')
    assert ctl.fresh_enough(stored_at=100.0, now=110.0) and not ctl.fresh_enough(stored_at=100.0, now=111.0)
    assert age_seconds(100.0, now=102.9) == 2 and age_seconds(100.0, now=99.0) == 0


def _tools(default: float) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "number", "default": default}}}}}]


@pytest.mark.parametrize(("a", "b"), [
    ({"tools": _tools(1.0)}, {"tools": _tools(1)}),
    ({"chat_template_kwargs": {"budget": 2.0}}, {"chat_template_kwargs": {"budget": 2}}),
    ({"documents": [{"score": 3.0}]}, {"documents": [{"score": 3}]}),
])
def test_a_whole_float_and_an_int_are_two_prompts(a: dict[str, Any], b: dict[str, Any]) -> None:
    # vLLM renders these into the prompt with `tojson`: "1.0" and "1" are different prompts
    one, other = identity(ask("hi", **a)), identity(ask("hi", **b))
    assert one.exact_key != other.exact_key
    if one.semantic_scope is not None or other.semantic_scope is not None:
        assert one.semantic_scope != other.semantic_scope


def test_zero_and_zero_point_zero_are_both_greedy() -> None:
    # two entries now (numbers are kept as written), but both cacheable: greedy is read by value
    for temperature in (0, 0.0):
        assert identity(ask("hi", temperature=temperature)).deterministic
    no_temperature = {"messages": [{"role": "user", "content": "hi"}]}
    for default in (0, 0.0):
        assert identity(no_temperature, model_identity=model_identity(temperature=default)).cacheable


@pytest.mark.parametrize("extra", [
    {"prompt_logprobs": 0},  # 0 asks for them too: each prompt token's own
    {"prompt_logprobs": 3},
    {"echo": True},  # chat: vLLM sets prompt_logprobs = top_logprobs (0) under echo
    {"echo": True, "logprobs": True, "top_logprobs": 2},
    {"return_prompt_text": True},
])
def test_what_only_a_non_stream_body_carries_keys_the_transport(extra: dict[str, Any]) -> None:
    # an answer stored from a stream lacks prompt logprobs and prompt_text: a non-stream request
    # asking for them must never be served it (before: one key for both, a hit lacking them)
    streamed, plain = identity(ask("hi", stream=True, **extra)), identity(ask("hi", **extra))
    assert streamed.cacheable and plain.cacheable
    assert streamed.exact_key != plain.exact_key
    assert plain.exact_key == identity(ask("hi", stream=False, **extra)).exact_key
    # without them, one entry serves both transports
    assert identity(ask("hi", stream=True)).exact_key == identity(ask("hi")).exact_key


def test_the_off_values_of_those_fields_stay_cacheable() -> None:
    for extra in ({"echo": False}, {"return_prompt_text": False}, {"logprobs": True}):
        assert identity(ask("hi", **extra)).cacheable, extra


def test_return_prompt_text_keeps_the_semantic_layer_out() -> None:
    # a reworded question's answer has another prompt text
    assert "return_prompt_text" in SEMANTIC_EXCLUDED_FIELDS
    scope, _, why = _semantic_parts(ask("hi", return_prompt_text=True), tenant="t", model=model_identity(),
                                    version="1", encoder=ENCODER)
    assert scope is None and "return_prompt_text" in (why or "")


def test_the_engines_default_sampling_is_in_every_key() -> None:
    # the generation config's repetition_penalty changes even greedy answers
    plain = ModelIdentity(name="m", fingerprint=FINGERPRINT, default_sampling={"temperature": 0.0})
    penalised = ModelIdentity(name="m", fingerprint=FINGERPRINT,
                              default_sampling={"temperature": 0.0, "repetition_penalty": 1.3})
    a, b = identity(ask("hi"), model_identity=plain), identity(ask("hi"), model_identity=penalised)
    assert a.cacheable and b.cacheable
    assert a.exact_key != b.exact_key and a.semantic_scope != b.semantic_scope
    assert plain.key_part != penalised.key_part


def test_equal_default_sampling_gives_stable_keys() -> None:
    one = ModelIdentity(name="m", fingerprint=FINGERPRINT, default_sampling={"temperature": 0.0, "top_k": 20})
    same = ModelIdentity(name="m", fingerprint=FINGERPRINT, default_sampling={"top_k": 20, "temperature": 0.0})
    assert one.key_part == same.key_part  # key order does not matter
    assert identity(ask("hi"), model_identity=one).exact_key == identity(ask("hi"), model_identity=same).exact_key
    # the same at every start: SHA-256 of the canonical JSON, nothing process-dependent
    canonical = b'{"default_sampling":{"temperature":0.0,"top_k":20}}'
    assert one.sampling_digest == hashlib.sha256(canonical).hexdigest()
    assert ":" not in one.key_part and one.key_part.startswith(f"m@{FINGERPRINT[:16]}.")
