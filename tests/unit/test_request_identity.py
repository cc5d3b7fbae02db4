"""The request identity across routes: chat and legacy completions never share a key (pure logic)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from caches.chat import (
    CHAT,
    COMPLETIONS,
    ROUTES,
    VERSION_UNKNOWN,
    VLLM_FALLBACK_TEMPERATURE,
    ChatIdentity,
    RequestIdentity,
)
from tests.support import identity, model_identity

PROMPT = {"prompt": "The capital of France is", "temperature": 0, "max_tokens": 8}


def test_the_route_is_part_of_the_exact_key() -> None:
    # the very same fields on two routes: two entries (the route is hashed with the request)
    body = {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "temperature": 0}
    chat, completion = identity(body, route=CHAT), identity(body, route=COMPLETIONS)
    assert chat.cacheable and completion.cacheable
    assert chat.exact_key != completion.exact_key
    assert completion.route == COMPLETIONS and chat.route == CHAT
    # structure still does not matter within a route; text does
    assert identity({"max_tokens": 8, "temperature": 0, "prompt": PROMPT["prompt"], "stream": True,
                     "user": "u"}, route=COMPLETIONS).exact_key == identity(PROMPT, route=COMPLETIONS).exact_key
    assert identity({**PROMPT, "prompt": "The capital of France is "}, route=COMPLETIONS).exact_key != \
        identity(PROMPT, route=COMPLETIONS).exact_key
    for field in ({"echo": True}, {"logprobs": 2}, {"suffix": "x"}, {"prompt": [1, 2, 3]}, {"best_of": 2}):
        assert identity({**PROMPT, **field}, route=COMPLETIONS).exact_key != identity(PROMPT, route=COMPLETIONS).exact_key


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
def test_an_unknown_model_version_is_never_guessed_into_a_key(route: str) -> None:
    """Redis could not confirm the version (caches/versions.py `confirmed`): no lookup, no store."""
    body = {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "temperature": 0}
    ident = identity(body, route=route, version=None)
    assert not ident.cacheable and ident.reason == VERSION_UNKNOWN
    assert ident.exact_key is None and ident.semantic_scope is None
    assert identity(body, route=route).cacheable  # the same request with its version read


def test_completions_are_exact_only_with_a_reason() -> None:
    ident = identity(PROMPT, route=COMPLETIONS)
    assert ident.semantic_scope is None and ident.semantic_text is None
    assert ident.semantic_off == ROUTES[COMPLETIONS] and "raw prompt" in ident.semantic_off
    # even a body that looks like a chat question gets no semantic scope on this route
    assert identity({**PROMPT, "messages": [{"role": "user", "content": "hi"}]}, route=COMPLETIONS).semantic_scope is None


def test_completions_are_greedy_only_by_the_engines_defaults() -> None:
    no_temperature = {"prompt": "Once upon a time", "max_tokens": 8}
    sampled = identity(no_temperature, route=COMPLETIONS)
    assert not sampled.cacheable and "sampled" in (sampled.reason or "")
    greedy_engine = model_identity(temperature=0.0)
    assert identity(no_temperature, route=COMPLETIONS, model_identity=greedy_engine).cacheable
    assert not identity({**no_temperature, "temperature": 0.7, "seed": 1}, route=COMPLETIONS).cacheable
    assert identity({**no_temperature, "temperature": 0.7}, route=COMPLETIONS, cache_nondeterministic=True).cacheable


def test_unknown_routes_are_refused_and_the_old_name_still_works() -> None:
    with pytest.raises(ValueError, match="unknown route"):
        identity(PROMPT, route="embeddings")
    assert ChatIdentity is RequestIdentity


def _vllm_defaults(module: str) -> dict:
    """`_DEFAULT_SAMPLING_PARAMS` of a vLLM request class, read from its source: importing vLLM
    takes a minute on a small host, and this module only needs one literal of it."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).parent.joinpath(*module.split(".")).with_suffix(".py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "_DEFAULT_SAMPLING_PARAMS":
            return ast.literal_eval(node.value)  # type: ignore[arg-type]
    raise AssertionError(f"no _DEFAULT_SAMPLING_PARAMS in vllm.{module}")


@pytest.mark.parametrize("module", ["entrypoints.openai.chat_completion.protocol",
                                    "entrypoints.openai.completion.protocol"])
def test_vllms_fallback_temperature_is_what_both_request_classes_use(module: str) -> None:
    assert _vllm_defaults(module)["temperature"] == VLLM_FALLBACK_TEMPERATURE


@pytest.mark.parametrize("extra", [
    {"echo": True, "logprobs": 0},  # vLLM: prompt_logprobs = logprobs under echo (0 counts)
    {"echo": True, "logprobs": 2, "max_tokens": 0},  # lm-eval's loglikelihood request
    {"prompt_logprobs": 0},
    {"return_prompt_text": True},
])
def test_completions_that_ask_for_prompt_data_key_the_transport(extra: dict) -> None:
    # a non-stream body carries each choice's prompt_logprobs; an answer stored from a stream does not
    streamed = identity({**PROMPT, "stream": True, **extra}, route=COMPLETIONS)
    plain = identity({**PROMPT, **extra}, route=COMPLETIONS)
    assert streamed.cacheable and plain.cacheable and streamed.exact_key != plain.exact_key


def test_completions_echo_or_logprobs_alone_stay_cacheable() -> None:
    # echo without logprobs: vLLM computes no prompt logprobs on this route
    for extra in ({"echo": True}, {"logprobs": 0}, {"logprobs": 2}, {"echo": False, "logprobs": 0}):
        assert identity({**PROMPT, **extra}, route=COMPLETIONS).cacheable, extra
        # and one entry serves both transports
        assert identity({**PROMPT, **extra}, route=COMPLETIONS).exact_key == \
            identity({**PROMPT, **extra, "stream": True}, route=COMPLETIONS).exact_key
