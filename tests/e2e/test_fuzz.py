"""Schemathesis against the running app's OpenAPI spec: no generated input gets a 5xx.

Every operation of the spec is fuzzed with schema-conforming (positive) and schema-violating
(negative) inputs and checked with schemathesis' `not_a_server_error`. Chat is fuzzed twice: as
generated (the model name is random, so requests stop at the ingress's checks) and with the
served model's name written in, so that the generated fields reach the cache chain and vLLM;
that part is capped in examples and tokens because each valid request is a real generation.

Why not `schemathesis.pytest.from_fixture`: its lazy loader sets `request.node._nodeid`, which
pytest 9 no longer has (AttributeError in schemathesis 4.32.5). The operations are only known
once the app is up, so each is driven by a Hypothesis test built at run time instead, and every
failure is reported with a curl command that reproduces it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.generation.case import Case

CHAT = ("POST", "/v1/chat/completions")
REQUEST_TIMEOUT_S = 120
EXAMPLES_PER_MODE = 100
LLM_EXAMPLES = 25
# Tokens per fuzzed generation: enough to run decoding, small enough to stay fast on 2 cores.
FUZZ_MAX_TOKENS = 4
# No database (it would write `.hypothesis/` into the checkout); no shrinking: every shrink step
# is another HTTP request, and the reproduction below already names the exact failing request.
PHASES = (Phase.explicit, Phase.generate)


@pytest.fixture(scope="module")
def api_schema(app_url: str) -> Any:
    return schemathesis.openapi.from_url(f"{app_url}/openapi.json", timeout=30)


@pytest.fixture(scope="module")
def operations(api_schema: Any) -> dict[tuple[str, str], Any]:
    found: dict[tuple[str, str], Any] = {}
    for result in api_schema.get_all_operations():
        op = result.ok()  # an unresolvable part of the spec is a failure of its own
        found[(op.method.upper(), op.path)] = op
    return found


def fuzz(operation: Any, mode: GenerationMode, max_examples: int,
         prepare: Callable[[Case], None] | None = None, statuses: list[int] | None = None) -> list[str]:
    """Run generated cases of one operation; the failures, each with a curl reproduction."""
    failures: list[str] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=max_examples, deadline=None, database=None, phases=PHASES,
              suppress_health_check=list(HealthCheck))
    def run(case: Case) -> None:
        if prepare is not None:
            prepare(case)
        try:
            response = case.call_and_validate(checks=[not_a_server_error], timeout=REQUEST_TIMEOUT_S)
            if statuses is not None:
                statuses.append(response.status_code)
        except Exception as exc:
            # Collected rather than raised: Hypothesis would stop at the first one and re-run
            # it; a report of every distinct 5xx is more use to whoever fixes them.
            failures.append(f"{type(exc).__name__}: {exc}\n    reproduce: {case.as_curl_command()}")

    try:
        run()
    except Unsatisfiable:
        # Negative mode on an operation whose every input is valid (GET /v1/models/{model_id}: any
        # string is a model id, answered 200 or 404): there is nothing invalid to send.
        if mode is not GenerationMode.NEGATIVE:
            raise
    return failures


def test_spec_lists_every_route(operations: dict[tuple[str, str], Any]) -> None:
    expected = {CHAT, ("GET", "/v1/models"), ("POST", "/v1/embeddings"), ("POST", "/v1/recommendations"),
                ("POST", "/v1/events"), ("GET", "/v1/cache/stats"), ("POST", "/admin/models/{name}/version"),
                ("GET", "/healthz"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                ("GET", "/v1/models/{model_id}")}
    assert expected <= set(operations), sorted(expected - set(operations))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_no_route_answers_5xx(operations: dict[tuple[str, str], Any], mode: GenerationMode) -> None:
    failures: list[str] = []
    for key, op in sorted(operations.items()):
        if mode is GenerationMode.NEGATIVE and not (op.body or op.path_parameters or op.query):
            continue  # nothing to violate: GET /healthz has no input
        failures += [f"{key[0]} {key[1]}: {f}" for f in fuzz(op, mode, EXAMPLES_PER_MODE)]
    assert not failures, "\n".join(failures)


def test_chat_reaching_the_llm_never_answers_5xx(operations: dict[tuple[str, str], Any], model_name: str) -> None:
    def served_model(case: Case) -> None:
        if not isinstance(case.body, dict):
            return
        case.body["model"] = model_name
        # A generated token budget the app refuses anyway (a 400) is kept; any other is capped.
        for field in ("max_tokens", "max_completion_tokens"):
            value = case.body.get(field)
            if isinstance(value, int | float) and not isinstance(value, bool) and 1 <= value <= 4096:
                case.body[field] = min(value, FUZZ_MAX_TOKENS)
        if "max_tokens" not in case.body and "max_completion_tokens" not in case.body:
            case.body["max_tokens"] = FUZZ_MAX_TOKENS
        # The spec cannot say "at least one user turn with content", so generated conversations
        # rarely have one and stop at the ingress's 400; a final user turn lets them through with
        # every generated message and field before it intact.
        messages = case.body.get("messages")
        if isinstance(messages, list):
            for message in messages:
                if isinstance(message, dict) and message.get("role") == "user" and not message.get("content"):
                    message["content"] = "Hello?"
            messages.append({"role": "user", "content": "Answer in one word: is this a test?"})

    statuses: list[int] = []
    failures = fuzz(operations[CHAT], GenerationMode.POSITIVE, LLM_EXAMPLES, prepare=served_model, statuses=statuses)
    assert not failures, "\n".join(failures)
    # Otherwise this test would pass without one generated request having reached the LLM.
    assert 200 in statuses, f"no generated chat request was answered (statuses {sorted(statuses)})"
