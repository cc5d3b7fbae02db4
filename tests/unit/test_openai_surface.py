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
