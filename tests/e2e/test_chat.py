"""Chat over HTTP against the running app: misses, exact hits, streaming, the openai client."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest


def ask(client: httpx.Client, model: str, text: str, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 24, **extra}
    return client.post("/v1/chat/completions", json=body)


def test_miss_then_exact_hit(client: httpx.Client, model_name: str) -> None:
    first = ask(client, model_name, "What is the capital of France?")
    assert first.status_code == 200, first.text
    assert first.headers["x-cache"] in ("miss", "semantic")
    answer = first.json()["choices"][0]["message"]["content"]
    assert "Paris" in answer
    second = ask(client, model_name, "What is the capital of France?")
    assert second.status_code == 200
    assert second.headers["x-cache"] == "exact"
    assert second.json()["choices"][0]["message"]["content"] == answer
    # exact means exact: another way of writing it is the semantic layer's business, not this one's
    third = ask(client, model_name, "  what is the CAPITAL of   France?")
    assert third.headers["x-cache"] in ("miss", "semantic")


def test_usage_reports_cached_prompt_tokens(client: httpx.Client, model_name: str) -> None:
    # Two different questions share the deployment's system prompt: the second reuses its KV blocks.
    ask(client, model_name, f"Name a colour. ({uuid.uuid4().hex[:6]})")
    resp = ask(client, model_name, f"Name a fruit. ({uuid.uuid4().hex[:6]})")
    assert resp.headers["x-cache"] in ("miss", "semantic")
    if resp.headers["x-cache"] == "miss":
        usage = resp.json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] > 0


def test_nondeterministic_requests_bypass_the_caches(client: httpx.Client, model_name: str) -> None:
    for _ in range(2):
        resp = ask(client, model_name, "Write one word.", temperature=0.9, seed=1)
        assert resp.status_code == 200
        assert resp.headers["x-cache"] == "bypass"


def test_openai_client_plain_and_streaming(app_url: str, model_name: str) -> None:
    oa = openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused")
    question = f"Say hello to {uuid.uuid4().hex[:6]}."
    plain = oa.chat.completions.create(model=model_name, messages=[{"role": "user", "content": question}],
                                       temperature=0, max_tokens=16)
    assert plain.choices[0].message.content
    assert plain.usage is not None and plain.usage.prompt_tokens > 0

    # The same request streamed is now an exact hit: a cached answer must stream like a fresh one.
    raw = oa.chat.completions.with_raw_response.create(
        model=model_name, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=16,
        stream=True, stream_options={"include_usage": True},
    )
    assert raw.headers["x-cache"] == "exact"
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage is not None

    # A fresh streamed miss, through vLLM's own streaming.
    fresh = oa.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": f"Count to three, {uuid.uuid4().hex[:6]}."}],
        temperature=0, max_tokens=12, stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in fresh if c.choices)


def test_streamed_miss_is_cached(client: httpx.Client, model_name: str) -> None:
    question = f"What is two plus two? ({uuid.uuid4().hex[:6]})"
    with client.stream("POST", "/v1/chat/completions", json={
        "model": model_name, "messages": [{"role": "user", "content": question}], "temperature": 0,
        "max_tokens": 12, "stream": True,
    }) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    streamed = "".join(
        (c["choices"][0].get("delta") or {}).get("content") or ""
        for c in (json.loads(line[6:]) for line in lines[:-1]) if c.get("choices")
    )
    # it did not ask for usage, so it gets no usage chunk (the engine was asked, for the store)
    assert not [line for line in lines[:-1] if json.loads(line[6:]).get("usage")]
    again = ask(client, model_name, question, max_tokens=12)
    assert again.headers["x-cache"] == "exact"
    assert again.json()["choices"][0]["message"]["content"] == streamed
    # a non-streamed answer always has usage, a cached one too (OpenAI clients read it unguarded)
    usage = again.json()["usage"]
    assert usage is not None and usage["completion_tokens"] > 0, again.json()


def test_models_route(client: httpx.Client, model_name: str) -> None:
    data = client.get("/v1/models").json()
    assert data["object"] == "list" and data["data"][0]["id"] == model_name


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
        ({"model": "MODEL", "messages": []}, 400, "messages"),
        ({"model": "MODEL", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
        ({"model": "MODEL", "messages": [{"role": "system", "content": "only a system prompt"}]}, 400, "user"),
        ({"model": "MODEL", "messages": "hello"}, 400, "messages"),
        ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 400, "unknown model"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "max_tokens"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "temperature": 7}, 400, "temperature"),
        # each of these was a 5xx: vLLM's own validator (503), an AttributeError, a TypeError and a
        # UnicodeEncodeError while building the cache key (500)
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
          "stream_options": {"include_usage": True}}, 400, "stream"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "stream_options": True}, 400,
         "stream_options"),
        ({"model": "MODEL", "messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}]}, 400,
         "must be a string"),
        ({"model": "MODEL", "temperature": 0, "messages": [{"role": "user", "content": "hi \ud800"}]}, 400,
         "surrogate"),
    ],
)
def test_bad_chat_requests_get_clear_400s(client: httpx.Client, model_name: str, body: dict, status: int, fragment: str) -> None:
    # sent as ASCII JSON (escapes as written): httpx's json= cannot encode a lone surrogate
    resp = client.post("/v1/chat/completions", content=json.dumps(body).replace("MODEL", model_name),
                       headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert fragment in err["message"], err


def test_prompt_longer_than_context_is_a_400(client: httpx.Client, model_name: str) -> None:
    long_text = "tell me about caching " * 700  # ~2,800 tokens > max_model_len 2048, < body limit
    resp = ask(client, model_name, long_text + uuid.uuid4().hex)
    assert resp.status_code == 400, resp.text
    assert "context length" in resp.json()["error"]["message"]


def test_oversized_body_is_rejected(client: httpx.Client, model_name: str) -> None:
    resp = ask(client, model_name, "x" * 400_000)
    assert resp.status_code == 413
    assert "limit" in resp.json()["error"]["message"]


def test_oversized_chunked_upload_is_cut_off_while_reading(client: httpx.Client) -> None:
    def body() -> Iterator[bytes]:  # no Content-Length: the server must count as it reads
        for _ in range(64):
            yield b" " * 16_384

    resp = client.post("/v1/chat/completions", content=body(), headers={"content-type": "application/json"})
    assert resp.status_code == 413 and "limit" in resp.json()["error"]["message"]


def test_malformed_json_is_a_400(client: httpx.Client) -> None:
    resp = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400


def test_semantic_paraphrase_hits_with_the_real_model(client: httpx.Client, model_name: str) -> None:
    """A near-duplicate rewording (case, a filler word; cosine 0.993) is answered from the semantic
    layer in the default mode. Only answers that stopped by themselves are stored semantically, so
    the run's own system line asks for one word and the budget is ample."""
    def ask_short(tag: str, text: str) -> httpx.Response:
        body = {"model": model_name, "temperature": 0, "max_tokens": 256,
                "messages": [{"role": "system", "content": f"Session {tag}. Reply in one word."},
                             {"role": "user", "content": text}]}
        return client.post("/v1/chat/completions", json=body)

    # Precondition: a complete first answer (only those are stored semantically). The tiny model
    # sometimes rambles past any budget for a given session line, so a few fresh sessions are tried.
    for _ in range(4):
        tag = uuid.uuid4().hex[:8]
        first = ask_short(tag, f"How do I reset my password for account {tag}?")
        assert first.status_code == 200, first.text
        assert first.headers["x-cache"] == "miss"
        if first.json()["choices"][0]["finish_reason"] == "stop":
            break
    else:
        pytest.fail("the model never finished a one-word answer by itself in 4 sessions")
    answer = first.json()["choices"][0]["message"]["content"]
    second = ask_short(tag, f"how do I reset my password for account {tag} please?")
    assert second.status_code == 200, second.text
    assert second.headers["x-cache"] == "semantic", second.headers
    assert float(second.headers["x-cache-similarity"]) >= 0.9
    assert second.json()["choices"][0]["message"]["content"] == answer


def test_semantic_trap_misses(client: httpx.Client, model_name: str) -> None:
    """A minimal edit that changes the meaning (lock / unlock) is never a semantic hit."""
    tag = uuid.uuid4().hex[:8]
    first = ask(client, model_name, f"How do I lock my card {tag}?")
    assert first.status_code == 200, first.text
    second = ask(client, model_name, f"How do I unlock my card {tag}?")
    assert second.status_code == 200, second.text
    assert second.headers["x-cache"] == "miss", second.headers
