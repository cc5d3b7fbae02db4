"""The one Redis error policy: every Redis error comes out as RedisUnavailable; only those that
say the server is unwell open the breaker."""

from __future__ import annotations

import pytest
import redis

from caches.redis_client import Breaker, RedisUnavailable, server_unwell
from caches.result import CacheUnavailable
from caches.tiers.base import TierUnavailable


def fail(exc: BaseException):  # noqa: ANN201
    def run() -> None:
        raise exc

    return run


@pytest.mark.parametrize(
    ("exc", "opens"),
    [
        (redis.ConnectionError("refused"), True),
        (redis.TimeoutError("timed out"), True),
        (OSError("broken pipe"), True),
        (redis.BusyLoadingError("LOADING Redis is loading the dataset in memory"), True),
        (redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'."), True),
        (redis.ResponseError("BUSY Redis is busy running a script."), True),
        (redis.ResponseError("too many results to unpack"), False),
        (redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), False),
        (redis.exceptions.NoPermissionError("NOPERM this user has no permissions"), False),
    ],
)
def test_every_redis_error_is_redis_unavailable_and_only_server_trouble_opens_the_breaker(
    exc: BaseException, opens: bool
) -> None:
    breaker = Breaker("test", retry_after_s=60)
    with pytest.raises(RedisUnavailable) as caught:
        breaker.call("op", fail(exc))
    assert isinstance(caught.value, TierUnavailable) and isinstance(caught.value, CacheUnavailable)
    assert server_unwell(exc) is opens
    assert breaker.available is not opens
    if opens:  # skipped without calling Redis while open
        with pytest.raises(RedisUnavailable, match="down"):
            breaker.call("op", lambda: pytest.fail("called while the breaker is open"))


def test_a_working_call_returns_its_value() -> None:
    assert Breaker().call("op", lambda x: x + 1, 41) == 42
