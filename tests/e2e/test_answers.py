"""The caches never answer a different question (issue 10), over HTTP against the running app.

Each test is a defect a user met on 13059a0: differently written questions merged by the exact
layer, a sampled answer frozen for everyone, answer-changing fields missing from the semantic
scope, partial streams stored, eight model calls for eight identical requests, a changed model
serving the old model's answers.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.prefix_routing import delete_app
from deployments.config import REPO_ROOT, AppSettings, LLMSettings
from tests.e2e.conftest import deploy_side_ingress, local_app_config, session_handle, wait_running


def chat(client: httpx.Client, model: str, text: str, *, headers: dict[str, str] | None = None,
         **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 16,
            **extra}
    return client.post("/v1/chat/completions", json=body, headers=headers or {})


def content(resp: httpx.Response) -> str:
    return resp.json()["choices"][0]["message"]["content"]


def engine_requests(client: httpx.Client) -> float:
    """Requests the vLLM engine finished (vLLM's own counter, summed over finish reasons)."""
    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "vllm:request_success":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


@pytest.mark.parametrize(("first", "second"), [
    ("What is 3²?", "What is 32?"),
    ('What does print("Hello") do?', 'What does PRINT("hello") do?'),
    ("Fix this:\ndef f():\n    return 1", "Fix this:\ndef f():\n  return 1"),
    ("Is 7 >= 7?", "Is 7 > 7?"),
    ("Spell the word ﬁle.", "Spell the word file."),
])
def test_differently_written_questions_are_never_exact_hits(client: httpx.Client, model_name: str,
                                                            first: str, second: str) -> None:
    a = chat(client, model_name, first)
    assert a.status_code == 200, a.text
    assert chat(client, model_name, first).headers["x-cache"] == "exact"  # the same bytes: a hit
    b = chat(client, model_name, second)
    assert b.status_code == 200
    assert b.headers["x-cache"] not in ("exact", "semantic"), (b.headers["x-cache"], content(b))


def test_json_key_order_and_transport_fields_are_the_same_request(client: httpx.Client, model_name: str) -> None:
    question = f"Name one planet. ({uuid.uuid4().hex[:6]})"
    first = chat(client, model_name, question)
    reordered = {"max_tokens": 16, "temperature": 0.0, "user": "someone", "stream": False,
                 "messages": [{"content": question, "role": "user"}], "model": model_name}
    again = client.post("/v1/chat/completions", json=reordered)
    assert again.headers["x-cache"] == "exact" and content(again) == content(first)


def test_no_temperature_is_the_engines_sampled_default_and_never_cached(client: httpx.Client, model_name: str) -> None:
    # SmolLM2's generation config sets no temperature: vLLM samples at 1.0. Nothing to freeze.
    body = {"model": model_name, "max_tokens": 8, "messages": [{"role": "user", "content": "Say a random word."}]}
    for _ in range(3):
        resp = client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200 and resp.headers["x-cache"] == "bypass"
    sampled = {**body, "temperature": 0.8, "seed": 11}  # a seed is not determinism across batches
    assert client.post("/v1/chat/completions", json=sampled).headers["x-cache"] == "bypass"
    assert client.post("/v1/chat/completions", json=sampled).headers["x-cache"] == "bypass"


@pytest.mark.parametrize("forcing", [
    {"structured_outputs": {"choice": ["Berlin"]}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": {"enum": ["Berlin"]}}}},
])
def test_a_forced_answer_is_not_planted_for_everyone(client: httpx.Client, model_name: str,
                                                     forcing: dict[str, Any]) -> None:
    question = f"What is the capital of France? ({uuid.uuid4().hex[:4]})"
    forced = chat(client, model_name, question, **forcing)
    assert forced.status_code == 200, forced.text
    assert "Berlin" in content(forced)
    plain = chat(client, model_name, question)
    assert plain.headers["x-cache"] == "miss", content(plain)
    assert "Berlin" not in content(plain)
    reworded = chat(client, model_name, question.replace("What is", "Tell me"))
    assert "Berlin" not in content(reworded)


def test_logprobs_are_stored_and_replayed_exactly(client: httpx.Client, model_name: str) -> None:
    question = f"Name a colour. ({uuid.uuid4().hex[:6]})"
    body = {"model": model_name, "temperature": 0, "max_tokens": 6, "logprobs": True, "top_logprobs": 2,
            "messages": [{"role": "user", "content": question}]}
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
        assert resp.headers["x-cache"] == "miss"
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    streamed = [t for c in chunks for ch in c["choices"] for t in ((ch.get("logprobs") or {}).get("content") or [])]
    assert streamed, "vLLM streamed no logprobs"
    again = client.post("/v1/chat/completions", json=body)
    assert again.headers["x-cache"] == "exact"
    replayed = again.json()["choices"][0]["logprobs"]["content"]
    assert [(t["token"], t["logprob"]) for t in replayed] == [(t["token"], t["logprob"]) for t in streamed]


def hang_up_after_first_chunk(app_url: str, path: str, body: dict[str, Any]) -> str:
    """Start a streamed request, read one chunk, close the connection; the answer's x-cache."""
    with httpx.Client(base_url=app_url, timeout=60) as hangs_up, hangs_up.stream("POST", path, json=body) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then the connection closes
        layer = resp.headers["x-cache"]
    time.sleep(1.0)  # the server notices the disconnect
    return layer


def test_a_client_that_hangs_up_mid_stream_stores_nothing(app_url: str, client: httpx.Client, model_name: str) -> None:
    question = f"Count slowly from one to twenty. ({uuid.uuid4().hex[:6]})"
    body = {"model": model_name, "temperature": 0, "max_tokens": 60, "stream": True,
            "messages": [{"role": "user", "content": question}]}
    assert hang_up_after_first_chunk(app_url, "/v1/chat/completions", body) == "miss"
    after = chat(client, model_name, question, max_tokens=60)
    assert after.headers["x-cache"] == "miss"
    assert after.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_cache_control_no_cache_no_store_max_age_and_age(client: httpx.Client, model_name: str) -> None:
    question = f"Name a month. ({uuid.uuid4().hex[:6]})"
    first = chat(client, model_name, question)
    assert first.headers["x-cache"] == "miss" and "age" not in first.headers
    hit = chat(client, model_name, question)
    assert hit.headers["x-cache"] == "exact" and int(hit.headers["age"]) >= 0
    fresh = chat(client, model_name, question, headers={"cache-control": "no-cache"})
    assert fresh.headers["x-cache"] == "miss"  # answered fresh, no lookup...
    time.sleep(2.1)
    after = chat(client, model_name, question)
    assert after.headers["x-cache"] == "exact" and int(after.headers["age"]) >= 2  # ...and stored
    assert chat(client, model_name, question, headers={"cache-control": "max-age=1"}).headers["x-cache"] == "miss"
    assert chat(client, model_name, question, headers={"cache-control": "max-age=600"}).headers["x-cache"] == "exact"

    private = f"My account number is {uuid.uuid4().hex[:8]}; repeat it."
    assert chat(client, model_name, private, headers={"cache-control": "no-store"}).headers["x-cache"] == "miss"
    assert chat(client, model_name, private).headers["x-cache"] == "miss"  # nothing was stored


def _burst(url: str, model: str, question: str, n: int) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=180) as c:
            body = {"model": model, "temperature": 0, "max_tokens": 24, "messages": [{"role": "user", "content": question}]}
            return await asyncio.gather(*(c.post(f"{url}/v1/chat/completions", json=body) for _ in range(n)))

    return asyncio.run(go())


def test_a_burst_of_identical_questions_makes_one_engine_call(app_url: str, client: httpx.Client, model_name: str) -> None:
    question = f"Explain caching in one sentence. ({uuid.uuid4().hex[:6]})"
    before = engine_requests(client)
    replies = _burst(app_url, model_name, question, 8)
    assert all(r.status_code == 200 for r in replies)
    layers = sorted(r.headers["x-cache"] for r in replies)
    assert layers == ["coalesced"] * 7 + ["miss"], layers
    assert len({content(r) for r in replies}) == 1
    assert engine_requests(client) - before == 1


@pytest.fixture(scope="module")
def second_ingress(app_url: str) -> Iterator[str]:
    from ray import serve

    deploy_side_ingress("tierserve-second", "/second", AppSettings.from_args(local_app_config().get("args")))
    yield f"{app_url}/second"
    serve.delete("tierserve-second")


def test_a_burst_across_two_ingress_replicas_makes_one_engine_call(app_url: str, second_ingress: str,
                                                                  client: httpx.Client, model_name: str) -> None:
    question = f"Explain a queue in one sentence. ({uuid.uuid4().hex[:6]})"
    before = engine_requests(client)

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=180) as c:
            body = {"model": model_name, "temperature": 0, "max_tokens": 24,
                    "messages": [{"role": "user", "content": question}]}
            return await asyncio.gather(*(c.post(f"{url}/v1/chat/completions", json=body)
                                          for url in [app_url, second_ingress] * 4))

    replies = asyncio.run(go())
    assert sorted(r.headers["x-cache"] for r in replies) == ["coalesced"] * 7 + ["miss"]
    assert engine_requests(client) - before == 1


@pytest.fixture(scope="module")
def other_weights_url(app_url: str, model_name: str) -> Iterator[str]:
    """The same served name and version, other weights: what changing `llm.model` in the config does."""
    from ray import serve

    from deployments.ingress import Ingress
    from deployments.llm import LLMDeployment

    settings = AppSettings.from_args(local_app_config().get("args"))
    tiny = LLMSettings(**{**settings.llm.model_dump(), "model": str(REPO_ROOT / ".models" / "tiny-llama"),
                          "max_model_len": 512})
    settings.llm = tiny
    handles = [session_handle(n) for n in ("Encoder", "SemanticCache")]
    recommender = session_handle("Recommender")
    llm = LLMDeployment.options(name="LLMOther", ray_actor_options={"num_cpus": 0.1}).bind(tiny.model_dump())
    serve.run(Ingress.bind(settings.model_dump(), *handles, llm, recommender), name="tierserve-other",
              route_prefix="/other", blocking=False)
    wait_running("tierserve-other")
    yield f"{app_url}/other"
    delete_app("tierserve-other")  # an LLM replica's stop can outlast serve.delete's own 60 s wait


def test_other_weights_under_the_same_name_never_get_the_old_answers(other_weights_url: str, client: httpx.Client,
                                                                    model_name: str) -> None:
    question = f"What is the capital of Italy? ({uuid.uuid4().hex[:6]})"
    assert chat(client, model_name, question).headers["x-cache"] == "miss"
    assert chat(client, model_name, question).headers["x-cache"] == "exact"
    with httpx.Client(base_url=other_weights_url, timeout=120) as other:
        assert other.get("/v1/models").json()["data"][0]["id"] == model_name  # same name
        first = chat(other, model_name, question)
        assert first.status_code == 200 and first.headers["x-cache"] == "miss"
        assert chat(other, model_name, question).headers["x-cache"] == "exact"  # its own entry
