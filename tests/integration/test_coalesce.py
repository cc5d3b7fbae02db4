"""Single flight against a real Redis: one leader per burst, across 'replicas', leader death."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from caches.coalesce import Coalescer
from caches.redis_client import make_async_client
from caches.redis_server import free_port

pytestmark = pytest.mark.asyncio


@pytest.fixture
def redis_url(both_redis_urls: str) -> str:
    """Every test here that uses Redis runs on the single server and on the 3-master cluster."""
    return both_redis_urls


@pytest.fixture
async def aclient(redis_url: str, redis_client: object) -> AsyncIterator[aioredis.Redis]:
    client = make_async_client(redis_url)
    yield client
    await client.aclose()


async def _request(co: Coalescer, key: str, calls: list[str], who: str, work_s: float = 0.2) -> tuple[str, bytes]:
    flight = await co.join(key)
    try:
        if not flight.leader:
            outcome = await flight.wait()
            if outcome is not None:
                return "follower", outcome
        calls.append(who)  # the "engine call"
        await asyncio.sleep(work_s)
        answer = f"answer by {who}".encode()
        await flight.publish(answer)
        return "leader", answer
    finally:
        await flight.close()


async def test_a_burst_in_one_process_makes_one_call(aclient: aioredis.Redis) -> None:
    co = Coalescer(aclient)
    calls: list[str] = []
    results = await asyncio.gather(*(_request(co, "k1", calls, f"r{i}") for i in range(8)))
    assert len(calls) == 1
    assert sorted(role for role, _ in results) == ["follower"] * 7 + ["leader"]
    assert {answer for _, answer in results} == {f"answer by {calls[0]}".encode()}
    assert not await aclient.exists(co.lease_key("k1"))  # released


async def test_a_burst_across_replicas_makes_one_call(redis_url: str, aclient: aioredis.Redis) -> None:
    other = make_async_client(redis_url)
    try:
        a, b = Coalescer(aclient), Coalescer(other)
        calls: list[str] = []
        results = await asyncio.gather(*(_request(a if i % 2 else b, "k2", calls, f"r{i}") for i in range(8)))
        assert len(calls) == 1
        assert {answer for _, answer in results} == {f"answer by {calls[0]}".encode()}
        assert a.counters["leaders"] + b.counters["leaders"] == 1
    finally:
        await other.aclose()


async def test_a_dead_leader_is_taken_over_after_its_lease(aclient: aioredis.Redis) -> None:
    co = Coalescer(aclient, lease_s=0.3)
    # a leader on another replica that died: its lease is there, never renewed, nothing published
    await aclient.set(co.lease_key("k3"), "dead-replica", px=300)
    calls: list[str] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    role, answer = await _request(co, "k3", calls, "survivor", work_s=0.0)
    assert (role, answer, calls) == ("leader", b"answer by survivor", ["survivor"])
    assert 0.2 < loop.time() - started < 5  # waited for the lease, not for MAX_WAIT_S
    assert co.counters["takeovers"] == 1


async def test_a_failed_leader_releases_its_followers(aclient: aioredis.Redis) -> None:
    co = Coalescer(aclient)
    leader = await co.join("k4")
    follower = await co.join("k4")
    assert leader.leader and not follower.leader
    waiting = asyncio.create_task(follower.wait())
    await asyncio.sleep(0.05)
    await leader.close()  # failed: nothing published
    assert await asyncio.wait_for(waiting, 2) is None  # computes itself, no long wait


async def test_redis_down_means_no_coalescing_and_no_failure() -> None:
    dead = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2, socket_timeout=0.2)
    co = Coalescer(dead)
    calls: list[str] = []
    results = await asyncio.gather(*(_request(co, "k5", calls, f"r{i}", work_s=0.05) for i in range(3)))
    # in-process followers still share the leader's answer; nobody fails
    assert len(calls) == 1 and len(results) == 3
    await dead.aclose()


async def test_a_flight_never_closed_gives_up_its_lease(aclient: aioredis.Redis) -> None:
    co = Coalescer(aclient, lease_s=0.3, max_wait_s=0.6)
    orphan = await co.join("k6")  # a leader whose request vanished without closing its flight
    assert orphan.leader and orphan.heartbeat is not None
    await asyncio.sleep(0.6 + 0.3 + 0.3)  # renewals stop after max_wait_s, then the lease lapses
    assert orphan.heartbeat.done()
    assert not await aclient.exists(co.lease_key("k6"))
    fresh = await co.join("k6")  # the next request leads at once, not behind the orphan
    assert fresh.leader and not fresh.follows_local
    await fresh.close()


async def test_a_join_cancelled_while_taking_the_lease_leaves_no_flight_behind(aclient: aioredis.Redis) -> None:
    """The client hangs up while the leader's SET NX is in flight: nobody will close that flight,
    so it must not stay registered (every later identical request would wait behind it)."""
    co = Coalescer(aclient, max_wait_s=3.0)
    started = asyncio.Event()
    real_set = aclient.set

    async def slow_set(*args: object, **kwargs: object) -> object:
        started.set()
        await asyncio.sleep(5)
        return await real_set(*args, **kwargs)

    aclient.set = slow_set  # type: ignore[method-assign]
    try:
        task = asyncio.create_task(co.join("k7"))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        aclient.set = real_set  # type: ignore[method-assign]
    fresh = await co.join("k7")  # leads at once: not a follower of the abandoned flight
    assert fresh.leader and not fresh.follows_local
    await fresh.close()


async def test_a_cluster_client_that_cannot_connect_means_no_coalescing_and_no_failure() -> None:
    # RedisClusterException is no RedisError: it must degrade like any other store failure
    from redis.asyncio.cluster import RedisCluster

    dead = RedisCluster(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2, socket_timeout=0.2)
    co = Coalescer(dead)  # type: ignore[arg-type]
    calls: list[str] = []
    results = await asyncio.gather(*(_request(co, "k8", calls, f"r{i}", work_s=0.05) for i in range(3)))
    assert len(calls) == 1 and len(results) == 3
