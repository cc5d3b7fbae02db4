"""Wire-format helpers of the OpenAI routes beside chat (pure logic)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

import numpy as np
import pytest
from pydantic import ValidationError

from deployments.openai_surface import embeddings_response, encode_embedding, model_not_found, open_stream
from deployments.schemas import CompletionRequest, EmbeddingRequest


def test_base64_is_little_endian_float32_bytes() -> None:
    vec = np.array([1.0, -2.5, 3.25e-3], dtype=np.float32)
    blob = base64.b64decode(encode_embedding(vec, "base64"))
    assert blob == vec.astype("<f4").tobytes() and len(blob) == 12
    assert np.array_equal(np.frombuffer(blob, dtype="<f4"), vec)
    # float: the same float32 values, exactly
    assert np.array_equal(np.asarray(encode_embedding(vec, "float"), dtype=np.float32), vec)


def test_embeddings_response_shape() -> None:
    out = embeddings_response("m", np.ones((2, 3), dtype=np.float32), "float", 7)
    assert [d["index"] for d in out["data"]] == [0, 1] and out["usage"] == {"prompt_tokens": 7, "total_tokens": 7}


def test_model_not_found_is_openais_404_shape() -> None:
    err = model_not_found("org/x")["error"]
    assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error" and "org/x" in err["message"]


@pytest.mark.parametrize("body", [{"input": [[1, 2]]}, {"input": [1, 2, 3]}, {"input": "x", "encoding_format": "int8"},
                                  {"input": "x", "dimensions": 0}])
def test_embedding_request_refusals(body: dict) -> None:
    with pytest.raises(ValidationError) as info:
        EmbeddingRequest.model_validate(body)
    if isinstance(body["input"], list):
        assert "token ids" in str(info.value)


def test_completion_request_prompt_forms() -> None:
    for prompt in ("x", ["a", "b"], [1, 2], [[1], [2, 3]]):
        CompletionRequest.model_validate({"model": "m", "prompt": prompt})
    for prompt in ("", [], ["a", ""], ["p"] * 33):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"model": "m", "prompt": prompt})


async def _gen(*chunks: str) -> AsyncIterator[str]:
    for c in chunks:
        yield c


META = "meta:"


def test_open_stream_reads_the_meta_and_replays_the_whole_stream() -> None:
    async def run() -> tuple[dict, list[str]]:
        meta, error, stream = await open_stream(_gen(META + '{"fingerprint": "f"}', "data: 1\n\n", "data: [DONE]\n\n"), META)
        assert error is None and stream is not None
        return meta, [c async for c in stream]

    assert asyncio.run(run()) == ({"fingerprint": "f"}, ["data: 1\n\n", "data: [DONE]\n\n"])


def test_open_stream_surfaces_an_error_before_the_stream() -> None:
    err = {"status": 400, "error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": 400}}
    meta, error, stream = asyncio.run(open_stream(_gen(META + "{}", json.dumps(err)), META))
    assert error == err and stream is None
    meta, error, stream = asyncio.run(open_stream(_gen(META + "{}"), META))
    assert error is not None and error["status"] == 503 and stream is None


def _chunk(index: int, text: str, finish: str | None = None, logprobs: dict | None = None, **extra: object) -> str:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": None,
              "prompt_token_ids": None, "token_ids": None, **extra}
    return "data: " + json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "m",
                                  "choices": [choice]}) + "\n\n"


def _lp(tokens: list[str], start: int) -> dict:
    offsets, at = [], start
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [-0.5] * len(tokens),
            "top_logprobs": [{t: -0.5} for t in tokens], "text_offset": offsets}


def test_completion_stream_is_merged_with_its_logprobs_and_replays_exactly() -> None:
    from deployments.openai_surface import CompletionAssembler, completion_stream_from_body

    asm = CompletionAssembler()
    for line in [_chunk(0, " Paris", logprobs=_lp([" Paris"], 0)), _chunk(1, " Rome", logprobs=_lp([" Rome"], 0)),
                 _chunk(0, ", France", "length", _lp([",", " France"], 6)), _chunk(1, ".", "stop", _lp(["."], 5)),
                 'data: {"id":"cmpl-1","object":"text_completion","created":5,"model":"m","choices":[],'
                 '"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n', "data: [DONE]\n\n"]:
        asm.feed(line)
    body = asm.completion()
    assert body is not None and body["object"] == "text_completion"
    first, second = body["choices"]
    assert (first["text"], first["finish_reason"]) == (" Paris, France", "length")
    assert first["logprobs"]["tokens"] == [" Paris", ",", " France"]
    assert first["logprobs"]["text_offset"] == [0, 6, 7]
    assert (second["text"], second["finish_reason"]) == (" Rome.", "stop")
    assert body["usage"]["total_tokens"] == 7
    # replayed as a chunk stream, it reassembles to the very same answer
    replay = list(completion_stream_from_body(body, include_usage=True))
    assert replay[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(line[6:]) for line in replay[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]
    again = CompletionAssembler()
    for line in replay:
        again.feed(line)
    assert again.completion() == body
    without_usage = list(completion_stream_from_body(body, include_usage=False))
    assert all("usage" not in json.loads(line[6:]) for line in without_usage[:-1])


@pytest.mark.parametrize(("lines", "why"), [
    ([_chunk(0, "Hi", "stop")], "no [DONE]"),
    ([_chunk(0, "Hi")] + ["data: [DONE]\n\n"], "no finish reason"),
    ([_chunk(0, "Hi"), 'data: {"error": {"message": "boom", "code": 500}}\n\n', "data: [DONE]\n\n"], "error chunk"),
    ([_chunk(0, "Hi", "stop", token_ids=[1, 2]), "data: [DONE]\n\n"], "token ids cannot be replayed"),
    ([_chunk(0, "Hi", "stop", logprobs={"tokens": ["Hi"], "bogus": [1]}), "data: [DONE]\n\n"], "unknown logprobs"),
])
def test_completion_streams_that_cannot_be_replayed_exactly_are_not_answers(lines: list[str], why: str) -> None:
    from deployments.openai_surface import CompletionAssembler

    asm = CompletionAssembler()
    for line in lines:
        asm.feed(line)
    assert asm.completion() is None, why
