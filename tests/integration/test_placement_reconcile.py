"""The shared placement policy forgets entries whose RAM value Redis expired by TTL, with no read
to tell it (SharedWTinyLFU.reconcile_step, run by TieredCache.maintain): else it counts them as
resident for ever and demotes for room that is free. Real Redis: single server and cluster."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis

from caches.admission import SharedWTinyLFU, WTinyLFUConfig
from caches.tiers.redis import MIN_ENTRIES_PER_SHARD, RedisTier
from tests.integration.test_tiered_cache import VALUE, open_cache, source_for, val

ENTRY = 120  # the entry_bytes open_cache gives the policy
SHORT_TTL_S = 1.0  # long enough that every value is still there when the test looks
GRACE_S = 0.2  # the policy's reconcile grace, shrunk to fit a test (production: RECONCILE_GRACE_S)


@pytest.fixture
def redis_url(both_redis_urls: str) -> str:
    return both_redis_urls


def _sizes(keys: list[str]) -> dict[str, int]:
    return {k: len(k) + VALUE for k in keys}


def _policy(redis_url: str, prefix: str) -> SharedWTinyLFU:
    """One group (shards=1), a budget that places everything: the reconcile alone decides."""
    return SharedWTinyLFU(RedisTier(redis_url, shards=1), WTinyLFUConfig(10**7, entry_bytes=ENTRY), prefix=prefix)


def test_expired_ram_values_leave_the_policys_resident_bytes_by_themselves(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """Sibling of test_expired_ram_values_leave_the_byte_total_by_themselves: the placement
    policy's own byte total also comes back to what is live, with no read of the expired keys."""
    short = [f"exp:m:1:{i}" for i in range(24)]
    live = [f"live:m:1:{i}" for i in range(6)]
    # On the cluster: a budget of 8 hash-tag groups, so every group's sweep is exercised.
    ram = 8 * MIN_ENTRIES_PER_SHARD * ENTRY
    cache = open_cache(redis_url, tmp_path / "ssd", cold=source_for(short + live), ram=ram,
                       ttl_s={"exp": SHORT_TTL_S}, invalidation=False, maintain_every_s=0.1)
    assert cache.ram is not None and isinstance(cache.policy, SharedWTinyLFU)
    policy = cache.policy
    policy.reconcile_grace_s = GRACE_S
    try:
        for k in short + live:
            cache.get_many([k])
        resident = set(policy.resident_keys())
        assert set(short) <= resident and set(live) <= resident
        live_bytes = sum(_sizes(live).values())
        assert policy.resident_bytes() == live_bytes + sum(_sizes(short).values())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and policy.resident_bytes() != live_bytes:
            time.sleep(0.1)
        assert policy.resident_bytes() == live_bytes  # no read of an expired key came
        assert set(policy.resident_keys()) == set(live)
        assert cache.ram.get_many(short) == {}  # all expired (read only now, after the check)
        assert cache.ram.get_many(live) == {k: val(k) for k in live}  # live values untouched
    finally:
        cache.close()


def test_policy_reconcile_is_bounded_and_resumes(redis_client: redis.Redis, redis_url: str) -> None:
    keys = [f"exp:m:1:{i}" for i in range(700)]  # past hash-max-listpack-entries: HSCAN pages
    live = [f"live:m:1:{i}" for i in range(5)]
    policy = _policy(redis_url, "test:reconcile")
    policy.reconcile_grace_s = 0.0
    tier = policy.tier
    sizes = _sizes(keys + live)
    assert policy.admit(sizes).admitted == keys + live
    tier.put_many({k: val(k) for k in keys}, ttl_s=SHORT_TTL_S)
    tier.put_many({k: val(k) for k in live})
    # A first sweep while every value is there: forgets nothing, and sees the settled tick.
    assert policy.reconcile_step(count=50) == 0
    while not policy.reconcile_wrapped:
        assert policy.reconcile_step(count=50) == 0
    time.sleep(SHORT_TTL_S + 0.2)
    assert policy.resident_bytes() == sum(sizes.values())  # nothing read: still counted
    # One step reads one HSCAN page: a hash this big (not listpack-encoded) takes several.
    per_step = [policy.reconcile_step(count=50)]
    assert 0 < per_step[0] < len(keys)
    while not policy.reconcile_wrapped:
        per_step.append(policy.reconcile_step(count=50))
    assert len(per_step) > 1 and sum(per_step) == len(keys)  # each slice once, resumed in order
    assert policy.resident_bytes() == sum(_sizes(live).values())
    assert set(policy.resident_keys()) == set(live)
    assert policy.reconcile_step() == 0  # the next sweep: nothing left to forget


def test_policy_reconcile_spares_an_entry_admitted_before_its_value_is_written(
    redis_client: redis.Redis, redis_url: str
) -> None:
    """admit places a key before the cache writes its value: forgetting it in that gap would
    leave a RAM value no eviction ever picks. Only entries that stood still for the grace go."""
    policy = _policy(redis_url, "test:grace")
    key = "exp:m:1:new"
    policy.reconcile_grace_s = 60.0
    assert policy.admit(_sizes([key])).admitted == [key]  # no value yet (the write is on its way)
    for _ in range(3):
        assert policy.reconcile_step() == 0
    assert policy.resident_keys() == [key]
    policy.reconcile_grace_s = GRACE_S
    time.sleep(GRACE_S + 0.1)
    # The first step still checks against the old settled tick, then settles the one it saw a
    # grace ago; the second forgets the entry: its value never came.
    assert [policy.reconcile_step(), policy.reconcile_step()] == [0, 1]
    assert policy.resident_bytes() == 0


def test_maintain_survives_a_failing_policy_reconcile(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = open_cache(redis_url, tmp_path / "ssd", invalidation=False, maintain_every_s=None)
    assert cache.ram is not None and isinstance(cache.policy, SharedWTinyLFU)
    calls: list[str] = []
    real = cache.ram.reconcile_step

    def ram_step(*args: Any, **kwargs: Any) -> int:
        calls.append("ram")
        return real(*args, **kwargs)

    def down(*args: Any, **kwargs: Any) -> Any:
        calls.append("policy")
        raise redis.ConnectionError("connection refused")

    monkeypatch.setattr(cache.ram, "reconcile_step", ram_step)
    monkeypatch.setattr(cache.policy, "_reconcile", down)
    cache.policy.admit({"exp:m:1:0": 100})  # a field to check: the script call is made
    try:
        assert cache.maintain() == 0  # through the breaker: swallowed, retried next round
        assert calls == ["ram", "policy"]  # both ran; the failure stayed inside maintain
    finally:
        cache.close()


def test_a_ram_value_no_region_holds_is_deleted_after_the_grace(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """The admit script ran (its victims left the placement) but its reply was lost to a slow
    Redis: nobody deleted the victims' values, which then sat in RAM outside the budget until
    their TTL. The upkeep deletes a value no region holds once it has seen it so for the grace
    (a demotion's value stands without a region for a moment, before its own delete)."""
    keys = [f"orph:m:1:{i}" for i in range(40)]
    budget = 10 * (len(keys[0]) + VALUE)  # ten rows in RAM
    cache = open_cache(redis_url, tmp_path / "ssd", cold=source_for([*keys, "orph:m:1:new"]), ram=budget,
                       invalidation=False, maintain_every_s=None)
    assert cache.ram is not None and isinstance(cache.policy, SharedWTinyLFU)
    policy = cache.policy
    policy.reconcile_grace_s = GRACE_S
    try:
        for _ in range(3):
            for k in keys[:10]:
                cache.get_many([k])
        held = set(policy.resident_keys())
        assert held and held <= set(cache.ram.get_many(list(held)))
        # The lost reply: the script evicts to make room, the cache never hears of its victims.
        policy.admit({"orph:m:1:new": len("orph:m:1:new") + VALUE})
        victims = held - set(policy.resident_keys())
        assert victims and set(cache.ram.get_many(list(victims))) == victims  # values left behind
        cache.maintain()  # noted, not deleted yet: it may be a demotion between its admit and delete
        assert set(cache.ram.get_many(list(victims))) == victims
        time.sleep(GRACE_S + 0.1)
        cache.maintain()
        assert cache.ram.get_many(list(victims)) == {}  # gone, their bytes given back
        still = set(policy.resident_keys()) - {"orph:m:1:new"}
        assert set(cache.ram.get_many(list(still))) == still  # the placement's own values stay
        assert cache.ram.size_bytes() == sum(len(k) + VALUE for k in still)
    finally:
        cache.close()
