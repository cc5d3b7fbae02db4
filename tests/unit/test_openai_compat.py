import json

from deployments.openai_compat import (
    StreamAssembler,
    completion_from_text,
    is_usage_only,
    refresh,
    stream_from_completion,
    with_usage,
)


def test_cached_completion_replays_as_a_valid_stream_and_reassembles() -> None:
    body = completion_from_text("m", "Paris is the capital.")
    lines = list(stream_from_completion(body, include_usage=True))
    assert lines[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == body["id"] for c in chunks)
    assert chunks[-1]["usage"] == body["usage"] and chunks[-1]["choices"] == []
    asm = StreamAssembler()
    for line in lines:
        asm.feed(line)
    rebuilt = asm.completion()
    assert rebuilt is not None
    assert rebuilt["choices"][0]["message"]["content"] == "Paris is the capital."
    assert rebuilt["choices"][0]["finish_reason"] == "stop"


def test_refresh_gives_a_new_identity_but_same_answer() -> None:
    body = completion_from_text("m", "x")
    again = refresh(body)
    assert again["id"] != body["id"] and again["choices"] == body["choices"]


def test_assembler_without_chunks_has_nothing_to_cache() -> None:
    asm = StreamAssembler()
    asm.feed("data: [DONE]\n\n")
    assert asm.completion() is None


def _chunk(delta: dict | None = None, finish: str | None = None, logprobs: dict | None = None, index: int = 0) -> str:
    choice = {"index": index, "delta": delta or {}, "finish_reason": finish, "logprobs": logprobs}
    return "data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                  "choices": [choice]}) + "\n\n"


def _assemble(*lines: str) -> StreamAssembler:
    asm = StreamAssembler()
    for line in lines:
        asm.feed(line)
    return asm


def test_a_stream_that_ends_with_an_error_chunk_is_not_an_answer() -> None:
    # vLLM reports a failure mid-stream as an error object, then [DONE]
    asm = _assemble(_chunk({"role": "assistant", "content": "The capital"}), _chunk({"content": " of"}),
                    'data: {"error": {"message": "engine died", "code": 500}}\n\n', "data: [DONE]\n\n")
    assert asm.completion() is None and "error" in (asm.problem or "")


def test_a_stream_without_done_or_finish_reason_is_not_an_answer() -> None:
    assert _assemble(_chunk({"content": "Paris"}), _chunk(finish="stop")).completion() is None  # no [DONE]
    assert _assemble(_chunk({"content": "Paris"}), "data: [DONE]\n\n").completion() is None  # no finish reason


def test_streamed_tool_calls_are_merged_and_replayed_exactly() -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": ""}}
    asm = _assemble(
        _chunk({"role": "assistant", "tool_calls": [call]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        _chunk(finish="tool_calls"), "data: [DONE]\n\n")
    done = asm.completion()
    assert done is not None
    message = done["choices"][0]["message"]
    assert message["tool_calls"] == [{"id": "call_1", "type": "function",
                                      "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]
    replay = _assemble(*stream_from_completion({**done, "usage": None}, include_usage=False)).completion()
    assert replay is not None and replay["choices"][0]["message"]["tool_calls"] == message["tool_calls"]
    assert replay["choices"][0]["finish_reason"] == "tool_calls"


def test_streamed_logprobs_are_kept_in_order_and_replayed() -> None:
    lp = [{"token": t, "logprob": -0.1 * i, "bytes": None, "top_logprobs": []} for i, t in enumerate(["Pa", "ris", "."])]
    asm = _assemble(_chunk({"role": "assistant", "content": "Pa"}, logprobs={"content": lp[:1]}),
                    _chunk({"content": "ris."}, logprobs={"content": lp[1:]}), _chunk(finish="stop"), "data: [DONE]\n\n")
    done = asm.completion()
    assert done is not None and done["choices"][0]["logprobs"] == {"content": lp}
    replay = _assemble(*stream_from_completion(done, include_usage=False)).completion()
    assert replay is not None and replay["choices"][0]["logprobs"] == {"content": lp}
    assert replay["choices"][0]["message"]["content"] == "Paris."


def test_an_unknown_delta_field_refuses_to_store() -> None:
    asm = _assemble(_chunk({"content": "x", "audio": {"id": "a1"}}), _chunk(finish="stop"), "data: [DONE]\n\n")
    assert asm.completion() is None and "audio" in (asm.problem or "")


def test_n_choices_each_need_their_finish_reason() -> None:
    lines = [_chunk({"content": "a"}, index=0), _chunk({"content": "b"}, index=1), _chunk(finish="stop", index=0)]
    assert _assemble(*lines, "data: [DONE]\n\n").completion() is None
    done = _assemble(*lines, _chunk(finish="length", index=1), "data: [DONE]\n\n").completion()
    assert done is not None and [c["finish_reason"] for c in done["choices"]] == ["stop", "length"]


def test_a_streamed_request_always_asks_the_engine_for_usage() -> None:
    # the stored answer needs `usage` whichever client streamed it first (a non-streamed hit has it)
    plain = {"model": "m", "stream": True}
    assert with_usage(plain)["stream_options"] == {"include_usage": True}
    assert "stream_options" not in plain  # the caller's request is not changed
    # per-chunk usage stays the client's choice: only with usage it asked for
    assert with_usage({**plain, "stream_options": {"continuous_usage_stats": True}})["stream_options"] == {
        "include_usage": True}
    asked = {**plain, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    assert with_usage(asked) is asked


def test_only_the_usage_chunk_is_usage_only() -> None:
    lines = list(stream_from_completion(completion_from_text("m", "Paris."), include_usage=True))
    assert [is_usage_only(line) for line in lines] == [False] * (len(lines) - 2) + [True, False]
    # a content chunk that carries per-chunk usage is not the usage chunk
    assert not is_usage_only('data: {"choices":[{"index":0,"delta":{"content":"x"}}],"usage":{"total_tokens":3}}\n\n')


def test_the_system_fingerprint_survives_a_store_from_a_stream_and_a_streamed_replay() -> None:
    body = {**completion_from_text("m", "Paris."), "system_fingerprint": "vllm-0.32.0-abc"}
    chunks = [json.loads(line[6:]) for line in list(stream_from_completion(body, include_usage=True))[:-1]]
    assert {c.get("system_fingerprint") for c in chunks} == {"vllm-0.32.0-abc"}
    asm = StreamAssembler()
    for line in stream_from_completion(body, include_usage=True):
        asm.feed(line)
    rebuilt = asm.completion()
    assert rebuilt is not None and rebuilt["system_fingerprint"] == "vllm-0.32.0-abc"
