"""Legacy `/v1/completions` gets chat's cache layers, exact only; slow cache helpers are a bypass.

Over HTTP against the running app: a greedy completion is a miss then an exact hit (with `Age`),
a streamed miss is stored and replays as a completion chunk stream the `openai` SDK parses, a
request without temperature is never cached, `no-store` stores nothing, and a burst of identical
completions costs one engine call (vLLM's own counter). Then issue 11's deadlines: an Ingress
whose encoder or semantic deadline is 1 ms answers new chat questions with `x-cache: bypass`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from deployments.config import AppSettings
from tests.e2e.conftest import deploy_side_ingress, local_app_config
from tests.e2e.test_answers import chat, engine_requests, hang_up_after_first_chunk
from tests.e2e.test_openai_conformance import conforms


def complete(client: httpx.Client, model: str, prompt: str, *, headers: dict[str, str] | None = None,
             **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "temperature": 0, "max_tokens": 8, **extra}
    return client.post("/v1/completions", json=body, headers=headers or {})


def text(resp: httpx.Response) -> str:
    return resp.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def oa(app_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused", max_retries=0, timeout=180)


def test_a_greedy_completion_is_a_miss_then_an_exact_hit(client: httpx.Client, model_name: str) -> None:
    prompt = f"The capital of France is ({uuid.uuid4().hex[:6]})"
    first = complete(client, model_name, prompt, logprobs=2, echo=True)
    assert first.status_code == 200, first.text
    assert first.headers["x-cache"] == "miss" and "age" not in first.headers
    hit = complete(client, model_name, prompt, logprobs=2, echo=True)
    assert hit.headers["x-cache"] == "exact" and int(hit.headers["age"]) >= 0
    a, b = first.json(), hit.json()
    assert b["id"].startswith("cmpl-") and b["id"] != a["id"] and b["object"] == "text_completion"
    assert b["choices"] == a["choices"] and b["usage"] == a["usage"]  # echo and logprobs as generated
    # another field, another request: nothing is merged
    assert complete(client, model_name, prompt, logprobs=2).headers["x-cache"] == "miss"
    assert complete(client, model_name, prompt + " ").headers["x-cache"] == "miss"


def test_a_streamed_miss_is_stored_and_replays_as_a_completion_stream(oa: openai.OpenAI, model_name: str) -> None:
    prompt = f"One, two, three, ({uuid.uuid4().hex[:6]})"
    args: dict[str, Any] = {"model": model_name, "prompt": prompt, "temperature": 0, "max_tokens": 8, "logprobs": 2}
    fresh = oa.completions.with_raw_response.create(**args, stream=True, stream_options={"include_usage": True})
    assert fresh.headers["x-cache"] == "miss"
    chunks = [conforms(c, chunk_fill={"finish_reason": "length"}) for c in fresh.parse()]
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens or []]
    assert streamed and tokens

    # The stream's `[DONE]` waits (briefly) for the store, so a repeat asked at once finds it. On a
    # CPU-starved box the store may outlast that wait: ask again (no-store: a miss of the repeat
    # must not be what a later try finds) for a few seconds before calling it a miss.
    again = oa.completions.with_raw_response.create(**args, extra_headers={"cache-control": "no-store"})
    for _ in range(5):
        if again.headers["x-cache"] == "exact":
            break
        time.sleep(1.0)
        again = oa.completions.with_raw_response.create(**args, extra_headers={"cache-control": "no-store"})
    assert again.headers["x-cache"] == "exact"
    stored = conforms(again.parse())
    assert stored.choices[0].text == streamed
    assert stored.choices[0].logprobs is not None and stored.choices[0].logprobs.tokens == tokens

    replay = oa.completions.with_raw_response.create(**args, stream=True, stream_options={"include_usage": True})
    assert replay.headers["x-cache"] == "exact"
    replayed = [conforms(c, chunk_fill={"finish_reason": "length"}) for c in replay.parse()]
    assert all(c.object == "text_completion" and c.id.startswith("cmpl-") for c in replayed)
    assert "".join(c.choices[0].text for c in replayed if c.choices) == streamed
    assert [t for c in replayed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens or []] == tokens
    assert any(c.choices and c.choices[0].finish_reason for c in replayed)
    assert replayed[-1].choices == [] and replayed[-1].usage is not None and replayed[-1].usage.completion_tokens > 0


def test_without_temperature_a_completion_is_sampled_and_never_cached(client: httpx.Client, model_name: str) -> None:
    body = {"model": model_name, "prompt": "Once upon a time", "max_tokens": 6}
    for _ in range(3):
        resp = client.post("/v1/completions", json=body)
        assert resp.status_code == 200 and resp.headers["x-cache"] == "bypass"
    sampled = {**body, "temperature": 0.9, "seed": 3}
    assert client.post("/v1/completions", json=sampled).headers["x-cache"] == "bypass"


def test_cache_control_on_completions(client: httpx.Client, model_name: str) -> None:
    private = f"My PIN is {uuid.uuid4().hex[:6]}; it is"
    assert complete(client, model_name, private, headers={"cache-control": "no-store"}).headers["x-cache"] == "miss"
    assert complete(client, model_name, private).headers["x-cache"] == "miss"  # nothing was stored
    assert complete(client, model_name, private).headers["x-cache"] == "exact"
    assert complete(client, model_name, private, headers={"cache-control": "no-cache"}).headers["x-cache"] == "miss"
    assert complete(client, model_name, private, headers={"cache-control": "max-age=0"}).headers["x-cache"] == "miss"


def test_a_burst_of_identical_completions_makes_one_engine_call(app_url: str, client: httpx.Client,
                                                                model_name: str) -> None:
    prompt = f"A cache is ({uuid.uuid4().hex[:6]})"
    before = engine_requests(client)

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=180) as c:
            body = {"model": model_name, "prompt": prompt, "temperature": 0, "max_tokens": 24}
            return await asyncio.gather(*(c.post(f"{app_url}/v1/completions", json=body) for _ in range(8)))

    replies = asyncio.run(go())
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert sorted(r.headers["x-cache"] for r in replies) == ["coalesced"] * 7 + ["miss"]
    assert len({text(r) for r in replies}) == 1
    assert engine_requests(client) - before == 1


# ------------------------------------------------------------------------ deadlines (issue 11)
@pytest.fixture(scope="module", params=["semantic_timeout_s", "encoder_timeout_s"])
def impatient_url(request: pytest.FixtureRequest, app_url: str) -> Iterator[str]:
    """A side Ingress whose semantic (or encoder) deadline is 1 ms: every such call misses it."""
    from ray import serve

    settings = AppSettings.from_args(local_app_config().get("args"))
    setattr(settings.cache, request.param, 0.001)
    name = f"tierserve-{request.param.replace('_', '-')}"
    deploy_side_ingress(name, f"/{name}", settings)
    yield f"{app_url}/{name}"
    serve.delete(name)


def test_a_missed_cache_deadline_is_a_bypass_never_an_error(impatient_url: str, client: httpx.Client,
                                                            model_name: str) -> None:
    question = f"Name a river. ({uuid.uuid4().hex[:6]})"
    with httpx.Client(base_url=impatient_url, timeout=120) as impatient:
        first = chat(impatient, model_name, question)
        assert first.status_code == 200 and first.headers["x-cache"] == "bypass", first.text
        assert first.json()["choices"][0]["message"]["content"]
        assert chat(impatient, model_name, question).headers["x-cache"] == "bypass"  # nothing stored on a bypass
        # the exact layer comes before the deadline-bound calls: an answer stored elsewhere is a hit
        # (no-cache: a fresh answer, stored, whatever an earlier parametrisation left semantically near)
        assert chat(client, model_name, question, headers={"cache-control": "no-cache"}).headers["x-cache"] == "miss"
        assert chat(impatient, model_name, question).headers["x-cache"] == "exact"
        # completions have no semantic step: cached as usual
        prompt = f"Rivers flow ({uuid.uuid4().hex[:6]})"
        assert complete(impatient, model_name, prompt).headers["x-cache"] == "miss"
        assert complete(impatient, model_name, prompt).headers["x-cache"] == "exact"


def test_a_client_that_hangs_up_mid_completion_stream_stores_nothing(app_url: str, client: httpx.Client,
                                                                    model_name: str) -> None:
    prompt = f"Counting slowly from one to twenty: one, ({uuid.uuid4().hex[:6]})"
    body = {"model": model_name, "prompt": prompt, "temperature": 0, "max_tokens": 60, "stream": True}
    assert hang_up_after_first_chunk(app_url, "/v1/completions", body) == "miss"
    after = complete(client, model_name, prompt, max_tokens=60)
    assert after.headers["x-cache"] == "miss"
    assert after.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_streamed_chat_request_the_engine_refuses_is_a_typed_4xx(oa: openai.OpenAI, model_name: str) -> None:
    # The shared flow reads the replica's first line before answering: a refusal is a real 400
    # with OpenAI's error body (as for completions), not a 200 stream carrying an error event.
    with pytest.raises(openai.BadRequestError) as info:
        oa.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "word " * 3000}],
                                   temperature=0, max_tokens=4, stream=True)
    assert "context" in str(info.value).lower() or "length" in str(info.value).lower()
