"""The shared cached flow's guards: deadlines and cache errors become a bypass (pure logic, fakes)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import redis

from caches.result import CacheUnavailable
from deployments.cached_route import EXACT_TIMEOUT_S, STORE_TIMEOUT_S, Degraded, bounded, exact_get, exact_put
from deployments.config import ENCODER_TIMEOUT_S, SEMANTIC_TIMEOUT_S, CacheSettings


def test_bounded_passes_answers_and_turns_slowness_and_errors_into_degraded() -> None:
    async def value() -> int:
        return 7

    async def slow() -> int:
        await asyncio.sleep(5)
        return 0

    async def broken() -> int:
        raise RuntimeError("replica died")

    assert asyncio.run(bounded(value(), 1.0, "x")) == 7
    with pytest.raises(Degraded, match="within 0.01s"):
        asyncio.run(bounded(slow(), 0.01, "semantic lookup"))
    with pytest.raises(Degraded, match="RuntimeError: replica died"):
        asyncio.run(bounded(broken(), 1.0, "encoder"))


class FakeResults:
    """Raises what a real Redis may raise, from the thread it is called on."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.threads = error, []

    def get(self, key: str) -> bytes | None:
        self.threads.append(threading.get_ident())
        if self.error:
            raise self.error
        return b"blob"

    def put(self, key: str, value: bytes, ttl_s: Any = None) -> None:
        self.threads.append(threading.get_ident())
        if self.error:
            raise self.error


@pytest.mark.parametrize("error", [
    CacheUnavailable("down"),
    redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'"),
    redis.ResponseError("BUSY Redis is busy running a script"),
    redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    redis.TimeoutError("timed out"),
])
def test_any_redis_error_is_a_bypass_never_an_exception(error: Exception) -> None:
    results = FakeResults(error)
    assert asyncio.run(exact_get(results, "k")) == (None, False)  # type: ignore[arg-type]
    assert asyncio.run(exact_put(results, "k", b"v")) is False  # type: ignore[arg-type]


def test_redis_calls_run_off_the_event_loop_thread() -> None:
    results = FakeResults()

    async def go() -> tuple[bytes | None, bool]:
        return await exact_get(results, "k")  # type: ignore[arg-type]

    assert asyncio.run(go()) == (b"blob", True)
    assert results.threads and results.threads[0] != threading.get_ident()


class SlowResults(FakeResults):
    """A Redis that answers, but only after `delay_s` (a stalled server)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def get(self, key: str) -> bytes | None:
        threading.Event().wait(self.delay_s)
        return super().get(key)

    def put(self, key: str, value: bytes, ttl_s: Any = None) -> None:
        threading.Event().wait(self.delay_s)
        super().put(key, value)


def test_a_slow_exact_cache_is_a_bypass_within_its_deadline() -> None:
    results = SlowResults(delay_s=STORE_TIMEOUT_S + 1.5)

    async def go() -> tuple[tuple[bytes | None, bool], bool, float]:
        t0 = time.perf_counter()
        got = await exact_get(results, "k")  # type: ignore[arg-type]
        stored = await exact_put(results, "k", b"v")  # type: ignore[arg-type]
        return got, stored, time.perf_counter() - t0

    got, stored, elapsed = asyncio.run(go())
    assert got == (None, False) and stored is False
    # each gave up at its own deadline (a store waits longer than a lookup), not after the delays
    assert elapsed < EXACT_TIMEOUT_S + STORE_TIMEOUT_S + 1.0


def test_slow_cache_calls_do_not_hold_the_default_executor() -> None:
    """Sixteen stalled lookups at once leave asyncio.to_thread's pool free for everything else
    (it has cpu_count + 4 workers; the exact cache has its own threads)."""
    results = SlowResults(delay_s=1.0)

    async def go() -> float:
        lookups = [asyncio.create_task(exact_get(results, f"k{i}")) for i in range(16)]  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        await asyncio.to_thread(lambda: None)
        waited = time.perf_counter() - t0
        await asyncio.gather(*lookups)
        return waited

    assert asyncio.run(go()) < 0.5


def test_deadline_settings_have_named_defaults_and_must_be_positive() -> None:
    settings = CacheSettings()
    assert (settings.encoder_timeout_s, settings.semantic_timeout_s) == (ENCODER_TIMEOUT_S, SEMANTIC_TIMEOUT_S)
    with pytest.raises(ValueError):
        CacheSettings(semantic_timeout_s=0)


class _DeadRemote:
    async def remote(self, *args: Any) -> Any:
        raise RuntimeError("ActorDiedError: the replica died")


class _DeadLLM:
    info = _DeadRemote()


def test_a_failed_model_replica_is_a_503_never_a_500() -> None:
    from caches.cache_control import CacheControl
    from deployments.cached_route import CachedRoute, ModelUnavailable, Turn
    from deployments.config import AppSettings
    from tests.support import identity

    class Route(CachedRoute):
        route = "chat"

        async def _call(self, request: dict[str, Any], tenant: str) -> dict[str, Any]:
            raise RuntimeError("ActorDiedError: the replica died")

    settings = AppSettings(redis_url="redis://127.0.0.1:1/0")
    route = Route(settings, FakeResults(), lambda m: "1", _DeadLLM())  # type: ignore[arg-type]
    with pytest.raises(ModelUnavailable, match="unavailable"):
        asyncio.run(route._model_identity())
    turn = Turn(ident=identity({"messages": [], "temperature": 0}), control=CacheControl(), request={},
                stream=False, include_usage=False, started=0.0)
    with pytest.raises(ModelUnavailable, match="retry"):
        asyncio.run(route._generate(turn))


def test_a_follower_takes_the_flights_answer_only_when_fresh_enough_for_it() -> None:
    """A flight's answer stays readable for a few seconds after it ends; a request with
    `max-age=5` that joins then must not get a 9-second-old answer as `coalesced`, `Age: 0`."""
    from caches.cache_control import CacheControl
    from caches.chat import CachedAnswer
    from deployments.cached_route import CachedRoute, Turn
    from deployments.config import AppSettings
    from tests.support import identity

    class Flight:
        leader = False

        def __init__(self, stored_at: float) -> None:
            self.outcome = CachedAnswer(stored_at=stored_at, body={"id": "x", "created": 0, "choices": []}).encode()

        async def wait(self) -> bytes:
            return self.outcome

        async def close(self) -> None:
            return None

    class Route(CachedRoute):
        route = "chat"

    route = Route(AppSettings(redis_url="redis://127.0.0.1:1/0"), FakeResults(), lambda m: "1", _DeadLLM())  # type: ignore[arg-type]

    def follow(max_age: str, stored_at: float) -> Any:
        turn = Turn(ident=identity({"messages": [], "temperature": 0}), control=CacheControl.parse(max_age),
                    request={}, stream=False, include_usage=False, started=0.0, flight=Flight(stored_at))  # type: ignore[arg-type]
        return asyncio.run(route._follow(turn))

    assert follow("max-age=5", time.time() - 9) is None  # too old for it: it computes
    shared = follow("max-age=60", time.time() - 9)
    assert shared.headers["x-cache"] == "coalesced" and int(shared.headers["age"]) >= 9


def test_a_stream_whose_client_left_before_its_first_chunk_still_ends_its_flight() -> None:
    """The generator never starts when sending the response head fails (the client hung up):
    its `finally` cannot end the flight, so the response itself must (else the followers wait
    out the lease renewals, up to two minutes)."""
    from deployments.cached_route import ClosingStream

    started: list[int] = []
    closed: list[int] = []

    async def chunks() -> Any:
        started.append(1)
        yield "data: {}\n\n"

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(10)
        return {"type": "http.disconnect"}

    async def gone(_message: dict[str, Any]) -> None:
        raise OSError("the client hung up")

    response = ClosingStream(chunks(), on_close=lambda: closed.append(1), media_type="text/event-stream")
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "method": "POST", "headers": []}
    with pytest.raises(Exception):  # noqa: B017 - starlette's ClientDisconnect or the OSError itself
        asyncio.run(response(scope, receive, gone))
    assert closed == [1] and started == []  # ended, though its generator never ran

    async def fine(_message: dict[str, Any]) -> None:
        return None

    done = ClosingStream(chunks(), on_close=lambda: closed.append(2), media_type="text/event-stream")
    asyncio.run(done(scope, receive, fine))
    assert closed == [1, 2] and started == [1]  # and on a normal end too
