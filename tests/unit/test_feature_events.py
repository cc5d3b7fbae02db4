"""Pure rules of feature_store/events.py: the Feast Redis connection string's bound."""

from __future__ import annotations

import pytest

from feature_store.events import unbounded_feast_redis

LOCK_S = 10.0


@pytest.mark.parametrize("value", [None, "", "feast-redis:6379,db=0,socket_timeout=2",
                                   "feast-redis:6379,socket_timeout=3,socket_connect_timeout=1",
                                   "a:1,b:2,password=x=y,socket_timeout=0.5,socket_connect_timeout=2"])
def test_a_socket_timeout_under_the_lock_or_no_redis_is_bounded(value: str | None) -> None:
    assert unbounded_feast_redis(value, bound_s=LOCK_S) is None


@pytest.mark.parametrize(("value", "fragment"), [
    ("feast-redis:6379,db=0,password=x", "no socket_timeout"),  # redis-py's default: block for good
    ("feast-redis:6379,socket_timeout=10", "not under the 10s event lock"),
    # a push is two round trips and maybe a reconnect: 2 x 4 + 4 = 12 s
    ("feast-redis:6379,socket_timeout=4", "2 x socket_timeout + socket_connect_timeout = 12s"),
    ("feast-redis:6379,socket_timeout=3,socket_connect_timeout=5", "= 11s"),
    ("feast-redis:6379,socket_timeout=0", "not under"),
    ("feast-redis:6379,socket_timeout=soon", "not a number"),
])
def test_a_missing_or_too_long_socket_timeout_is_named(value: str, fragment: str) -> None:
    why = unbounded_feast_redis(value, bound_s=LOCK_S)
    assert why is not None and fragment in why
