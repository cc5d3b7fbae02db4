"""A real vLLM engine (CPU build) on the tiny random Llama, through vLLM's OpenAI serving layer.

The tiny model's words are noise; what is checked is the machinery: responses and streams in
OpenAI's shape, prefix-cache reuse for a shared system prompt, no reuse across tenants
(cache_salt), and bad input answered as 400s.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from caches.prompts import build_messages
from deployments.config import REPO_ROOT, LLMSettings
from deployments.llm import META_PREFIX, LLMServer, model_fingerprint

TINY = REPO_ROOT / ".models" / "tiny-llama"
SYSTEM = "You are a helpful assistant. " * 30  # several full 32-token blocks


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[LLMServer]:
    if not (TINY / ".ready").exists():
        pytest.fail(f"{TINY} missing: run `make install` (python -m deployments.models)")
    settings = LLMSettings(model=str(TINY), served_model_name="tiny", max_model_len=512, block_size=32,
                           max_tokens_limit=64)
    srv = await LLMServer.create(settings)
    yield srv
    srv.shutdown()


def body(question: str, **extra: object) -> dict:
    return {"model": "tiny", "messages": build_messages(SYSTEM, [{"role": "user", "content": question}]),
            "temperature": 0, "max_tokens": 4, **extra}


pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_shared_prefix_is_reused_within_a_tenant_not_across(server: LLMServer) -> None:
    first = await server.chat(body("first question"), tenant="acme")
    assert first["status"] == 200, first
    second = await server.chat(body("second, different question"), tenant="acme")
    cached = second["body"]["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 32, second["body"]["usage"]
    other = await server.chat(body("second, different question"), tenant="globex")
    assert other["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_completion_shape_n_and_stop(server: LLMServer) -> None:
    result = await server.chat(body("hello", n=2, temperature=0.8, seed=3, stop=["zzz"]), tenant="t")
    assert result["status"] == 200
    out = result["body"]
    assert out["object"] == "chat.completion" and len(out["choices"]) == 2
    assert out["usage"]["completion_tokens"] > 0


async def test_stream_yields_sse_chunks_and_done(server: LLMServer) -> None:
    chunks = [c async for c in server.chat_stream(body("stream me", stream_options={"include_usage": True}), tenant="t")]
    meta, chunks = chunks[0], chunks[1:]
    assert json.loads(meta.removeprefix(META_PREFIX)) == {"fingerprint": server.fingerprint}
    assert chunks[-1].strip() == "data: [DONE]"
    parsed = [json.loads(c[6:]) for c in chunks[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in parsed)
    assert parsed[-1]["usage"]["prompt_tokens"] > 0


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"model": "other"}, "does not exist"),
        ({"messages": [{"role": "user", "content": "word " * 700}]}, "context length"),
        ({"top_p": 5.0}, "top_p"),
        # raised by vLLM's own validator past pydantic (a VLLMValidationError): was a 503
        ({"stream_options": {"include_usage": True}}, "stream=True"),
    ],
)
async def test_bad_requests_are_400s(server: LLMServer, extra: dict, fragment: str) -> None:
    result = await server.chat({**body("x"), **extra}, tenant="t")
    assert result["status"] == 400, result
    assert fragment in result["body"]["error"]["message"]


async def test_bad_stream_request_reports_error_first(server: LLMServer) -> None:
    chunks = [c async for c in server.chat_stream({**body("x"), "model": "other"}, tenant="t")]
    assert chunks[0].startswith(META_PREFIX)
    assert len(chunks) == 2 and json.loads(chunks[1])["status"] == 400


async def test_identity_reads_the_engine_defaults_and_fingerprints_the_model(server: LLMServer) -> None:
    info = server.info()
    assert len(info["fingerprint"]) == 64
    # what vLLM itself will apply to a request without temperature (the model's generation config)
    assert info["default_sampling"] == server.chat_serving.default_sampling_params
    other = model_fingerprint(server.settings.model_copy(update={"extra_engine_args": ["--seed", "1"]}),
                              server.engine.model_config)
    assert other != info["fingerprint"]  # engine settings that change outputs change the identity


# ------------------------------------------------ legacy completions (OpenAIServingCompletion)
def prompt_body(prompt: str, **extra: object) -> dict:
    return {"model": "tiny", "prompt": prompt, "temperature": 0, "max_tokens": 4, **extra}


async def test_completion_is_salted_by_tenant(server: LLMServer) -> None:
    first = await server.complete(prompt_body(SYSTEM + "first"), tenant="acme")
    assert first["status"] == 200, first
    assert first["fingerprint"] == server.fingerprint  # what a cache store would check
    out = first["body"]
    assert out["object"] == "text_completion" and out["choices"][0]["text"] is not None
    assert out["usage"]["completion_tokens"] > 0
    second = await server.complete(prompt_body(SYSTEM + "second, different"), tenant="acme")
    assert second["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 32, second["body"]["usage"]
    other = await server.complete(prompt_body(SYSTEM + "second, different"), tenant="globex")
    assert other["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_completion_n_and_prompt_list(server: LLMServer) -> None:
    result = await server.complete(prompt_body(["one", "two"], n=2, temperature=0.8, seed=1), tenant="t")
    assert result["status"] == 200, result
    assert sorted(c["index"] for c in result["body"]["choices"]) == [0, 1, 2, 3]


async def test_completion_stream_yields_sse_chunks_and_done(server: LLMServer) -> None:
    chunks = [c async for c in server.complete_stream(prompt_body("stream me", stream_options={"include_usage": True}), "t")]
    assert json.loads(chunks[0].removeprefix(META_PREFIX))["fingerprint"] == server.fingerprint
    assert chunks[-1].strip() == "data: [DONE]"
    parsed = [json.loads(c[6:]) for c in chunks[1:-1]]
    assert all(p["object"] == "text_completion" for p in parsed)
    assert parsed[-1]["usage"]["prompt_tokens"] > 0


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"model": "other"}, "does not exist"),
        ({"prompt": "word " * 700}, "context length"),
        ({"top_p": 5.0}, "top_p"),
        ({"prompt": [[]]}, "prompt"),
    ],
)
async def test_bad_completion_requests_are_400s(server: LLMServer, extra: dict, fragment: str) -> None:
    result = await server.complete({**prompt_body("x"), **extra}, tenant="t")
    assert result["status"] == 400, result
    assert fragment in result["body"]["error"]["message"]


async def test_bad_completion_stream_reports_error_first(server: LLMServer) -> None:
    chunks = [c async for c in server.complete_stream({**prompt_body("x"), "model": "other"}, tenant="t")]
    assert chunks[0].startswith(META_PREFIX)
    assert len(chunks) == 2 and json.loads(chunks[1])["status"] == 400


async def test_gpu_tool_calling_args_are_ones_vllm_accepts() -> None:
    """configs/gpu.yaml's engine flags through vLLM's own parser and checks, and the parser named
    is one this vLLM has (Qwen2.5 cannot run here: the flags are what can be checked)."""
    import yaml
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.tool_parsers import ToolParserManager
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from deployments.config import AppSettings
    from deployments.llm import engine_cli_args

    app = yaml.safe_load((REPO_ROOT / "configs" / "gpu.yaml").read_text())["applications"][0]
    settings = AppSettings.model_validate(app["args"]).llm
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(engine_cli_args(settings))
    validate_parsed_serve_args(args)
    assert args.enable_auto_tool_choice and args.tool_call_parser == "hermes"
    assert ToolParserManager.get_tool_parser("hermes").__name__ == "Hermes2ProToolParser"
