import json

from deployments.openai_compat import StreamAssembler, completion_from_text, refresh, stream_from_completion


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
