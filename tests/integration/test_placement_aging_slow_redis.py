"""The shared sketch's halving (SharedWTinyLFU.age, lua/halve.lua) when a slice's reply is lost.

The halving runs slice by slice. On a slow server a slice's call runs after its client gave up on
the reply: the slices after it were never sent, and nothing did them later (the sketch stayed
half aged: counts in those slices twice what they should be, against the rest); sending the same
slice again would have halved it twice. The halving owed and its progress live in Redis, updated
by each slice's own call: the upkeep's next round (`reconcile_step`) finishes the pass, each slice
halved exactly once. Real Redis: single server and cluster (tests/slow_redis.py for the stall).
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import redis

from caches.admission import SharedWTinyLFU, WTinyLFUConfig
from caches.admission import shared as shared_module
from caches.admission.shared import ADDS, SKETCH
from caches.tiers.redis import RedisTier
from tests.integration.test_placement_slow_redis import KEYS, STALL_S, _read, _server_of, _wait_available
from tests.slow_redis import stalled

ENTRY = 120
BUDGET = 10**5  # a sketch of 4,096 x 4 counters: 8,192 bytes
SLICE_BYTES = 2048  # so the halving runs in 4 slices (one call each), not one
READS = 8  # of KEYS before the halving: their counters are 8 (collisions aside), well under the sample


@pytest.fixture
def redis_url(both_redis_urls: str) -> str:
    return both_redis_urls


def _halved(sketch: bytes) -> bytes:
    """Every 4-bit counter halved once (two a byte)."""
    return bytes((b >> 1) & 0x77 for b in sketch)


def test_a_halving_slice_whose_reply_was_lost_is_done_once_and_the_rest_by_the_next_upkeep(
    redis_client: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_module, "HALVING_CHUNK_BYTES", SLICE_BYTES)
    policy = SharedWTinyLFU(RedisTier(redis_url, shards=1), WTinyLFUConfig(BUDGET, entry_bytes=ENTRY),
                            prefix="test:aging")
    sketch_key, adds_key = policy.key[SKETCH], policy.key[ADDS]
    # A first halving, on a healthy server: the halving script is loaded (an EVALSHA of a script
    # the server never saw would run nothing after the stall, only answer NOSCRIPT).
    redis_client.set(adds_key, policy.cfg.sample - 1)
    assert _read(policy, ["warm-up"]) and policy.agings == 1
    for _ in range(READS):
        assert _read(policy, KEYS)
    assert policy.agings == 1

    halve = policy._halve
    stall = contextlib.ExitStack()
    before: list[bytes] = []

    def first_slice_stalled(*args: Any, **kwargs: Any) -> Any:
        """The halving's first slice is sent to a sleeping server (the tier's connection is warm:
        the record call that decided the halving just used it): it runs, its reply is lost."""
        if not before:
            before.append(redis_client.get(sketch_key) or b"")  # after the deciding read's counts
            stall.enter_context(stalled(*_server_of(policy), STALL_S))
        return halve(*args, **kwargs)

    monkeypatch.setattr(policy, "_halve", first_slice_stalled)
    redis_client.set(adds_key, policy.cfg.sample - 1)  # the next read decides a halving
    with stall:
        _read(policy, KEYS)
    assert before, "no halving was decided"
    expected = _halved(before[0])
    assert any(before[0]) and expected != before[0]
    monkeypatch.setattr(policy, "_halve", halve)
    _wait_available(policy)

    policy.reconcile_step()  # the upkeep's next round (TieredCache.maintain)
    after = redis_client.get(sketch_key) or b""
    wrong = sum(a != e for a, e in zip(after, expected, strict=True))
    assert after == expected, f"{wrong} of {len(expected)} sketch bytes not halved exactly once after the upkeep"
    policy.reconcile_step()  # and a round with nothing owed halves nothing
    assert redis_client.get(sketch_key) == expected
