"""`never_sent` (caches/admission/shared.py): which failed Redis calls surely never reached the
server, so the placement policy may count their reads later (the others may have run, their
reply lost: counting them again would count them twice). On redis-py's own errors, no server
needed (tests/integration/test_placement_slow_redis.py has the real slow and stopped servers)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
import redis

from caches.admission.shared import never_sent
from caches.redis_client import Breaker, make_client
from caches.redis_server import free_port
from caches.tiers.base import TierUnavailable


def test_never_sent_tells_a_call_that_never_left_from_one_that_may_have_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The classification, on redis-py's own errors: refused and connect-timeout connections and
    a call the breaker skipped never reached a server; a read timeout or a script error may have
    come after the command ran."""
    nobody = make_client(f"redis://127.0.0.1:{free_port()}")  # nothing listens there

    def failure(fn: Callable[[], object], breaker: Breaker | None = None) -> BaseException:
        with pytest.raises(TierUnavailable) as info:
            (breaker or Breaker("test")).call("test", fn)
        return info.value

    breaker = Breaker("test", retry_after_s=60.0)
    refused = failure(nobody.ping, breaker)
    assert "refused" in str(refused.__cause__).lower() and never_sent(refused)
    assert not breaker.available and never_sent(failure(nobody.ping, breaker))  # skipped by the breaker

    def read_timeout() -> object:
        raise redis.TimeoutError("Timeout reading from 127.0.0.1:6379")

    def script_error() -> object:
        raise redis.ResponseError("Error running script: too many results to unpack")

    assert not never_sent(failure(read_timeout))
    assert not never_sent(failure(script_error))
    assert not never_sent(RuntimeError("not a Redis failure"))

    def connect_times_out(self: socket.socket, address: object) -> None:
        raise TimeoutError("timed out")  # what a socket whose connect timeout expires raises

    monkeypatch.setattr(socket.socket, "connect", connect_times_out)
    timed_out = failure(nobody.ping)
    assert "connecting" in str(timed_out.__cause__) and never_sent(timed_out)
