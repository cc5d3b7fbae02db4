"""One engine call per burst: identical concurrent misses share one computation (single flight).

Eight users asking the same new question at once should cost one model call, not eight. The
first request for a key becomes the *leader*: it takes a short lease in Redis
(``SET co.lease:{key} token NX PX``) and computes. Every other request for that key, on any
replica, is a *follower*: it waits for the leader's outcome (``co.answer:{key}``, kept for a few
seconds) instead of calling the model. Inside one process followers wait on an event, without
touching Redis; across replicas they poll with a short backoff.

A leader that dies must not strand its followers. The lease is short (:data:`LEASE_S`) and the
leader renews it while it works (every third of the lease); when a follower sees the lease gone
with no outcome published, it takes the lease and computes itself. Followers never wait longer
than :data:`MAX_WAIT_S` in total. Redis unreachable: everybody computes (no coalescing, no
failure). This is Go's ``singleflight`` with a distributed lease, the pattern Varnish and CDNs
call request collapsing.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from caches.redis_client import REDIS_ERRORS

LEASE_S = 3.0  # a leader that stops renewing is given up on after this long
ANSWER_TTL_S = 10.0  # followers read the outcome within this long after it is published
MAX_WAIT_S = 120.0  # a follower computes itself after waiting this long (the HTTP timeout)
POLL_FIRST_S = 0.01  # first poll interval across replicas, then x POLL_GROWTH up to POLL_MAX_S
POLL_GROWTH = 1.5
POLL_MAX_S = 0.1

# KEYS: lease; ARGV: token, ttl_ms. Renew only our own lease.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: lease; ARGV: token. Release only our own lease (another may hold it after ours expired).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Every failure of the lease store means "compute without coalescing", a cluster's own errors
# (RedisClusterException is no RedisError) included.
_ERRORS = (*REDIS_ERRORS, OSError, TimeoutError)


@dataclass
class _Local:
    done: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: bytes | None = None


@dataclass
class Flight:
    """One request's part in a flight. ``leader``: compute, then :meth:`publish`. Otherwise
    :meth:`wait` for the leader's outcome; None means compute yourself (``leader`` says whether
    this request took over the lease meanwhile)."""

    key: str
    leader: bool
    coalescer: Coalescer
    token: str = ""
    local: _Local | None = None
    follows_local: bool = False  # follows a leader in this process (no Redis involved)
    published: bool = False
    closed: bool = False
    heartbeat: asyncio.Task[None] | None = None

    async def wait(self) -> bytes | None:
        return await self.coalescer._wait(self)

    async def close(self) -> None:
        """End this request's part: a leader releases its lease and wakes the local followers."""
        await self.coalescer._close(self)

    async def publish(self, outcome: bytes) -> None:
        """Hand the outcome to every follower (only a leader publishes)."""
        if not self.leader:
            return
        self.published = True
        if self.local is not None:
            self.local.outcome = outcome
        with contextlib.suppress(*_ERRORS):
            await self.coalescer.client.set(self.coalescer.answer_key(self.key), outcome,
                                             px=int(self.coalescer.answer_ttl_s * 1000))


class Coalescer:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        lease_s: float = LEASE_S,
        answer_ttl_s: float = ANSWER_TTL_S,
        max_wait_s: float = MAX_WAIT_S,
    ) -> None:
        self.client = client
        self.lease_s, self.answer_ttl_s, self.max_wait_s = lease_s, answer_ttl_s, max_wait_s
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._local: dict[str, _Local] = {}
        self.counters = {"leaders": 0, "followers": 0, "takeovers": 0, "timeouts": 0}

    @staticmethod
    def lease_key(key: str) -> str:
        return f"co.lease:{key}"

    @staticmethod
    def answer_key(key: str) -> str:
        return f"co.answer:{key}"

    async def join(self, key: str) -> Flight:
        """Join the flight for ``key``: leader or follower (see :class:`Flight`). Every joined
        flight must be closed (:meth:`Flight.close`), also when the request fails or is cancelled."""
        local = self._local.get(key)
        if local is not None:  # a leader in this process: wait on it, not on Redis
            self.counters["followers"] += 1
            return Flight(key, leader=False, coalescer=self, local=local, follows_local=True)
        local = self._local[key] = _Local()
        flight = Flight(key, leader=False, coalescer=self, token=secrets.token_hex(8), local=local)
        try:
            flight.leader = await self._acquire(flight)
        except BaseException:
            # Cancelled (the client hung up) or failed before the flight was handed out: nobody
            # will close it, so its local slot goes now. Left behind, every later identical
            # request in this process would follow it and wait out max_wait_s, for good.
            if self._local.get(key) is local:
                del self._local[key]
            local.done.set()
            raise
        self.counters["leaders" if flight.leader else "followers"] += 1
        if flight.leader and flight.token:
            flight.heartbeat = asyncio.create_task(self._heartbeat(flight))
        return flight

    async def _close(self, flight: Flight) -> None:
        if flight.follows_local or flight.closed:
            return
        flight.closed = True
        if flight.heartbeat is not None:
            flight.heartbeat.cancel()
        local = flight.local
        if local is not None:
            if self._local.get(flight.key) is local:
                del self._local[flight.key]
            local.done.set()
        if flight.leader and flight.token:
            with contextlib.suppress(*_ERRORS):
                await self._release(keys=[self.lease_key(flight.key)], args=[flight.token])

    async def _acquire(self, flight: Flight) -> bool:
        try:
            return bool(await self.client.set(self.lease_key(flight.key), flight.token, nx=True,
                                              px=int(self.lease_s * 1000)))
        except _ERRORS:
            flight.token = ""  # no lease to renew or release: compute without coalescing
            return True

    async def _heartbeat(self, flight: Flight) -> None:
        # Renewed for at most max_wait_s (no request lives longer): a flight that is never closed
        # (a streamed answer whose client left before the stream started) cannot hold the lease,
        # and so its followers, forever; its lease lapses and a follower takes over.
        deadline = time.monotonic() + self.max_wait_s
        while time.monotonic() < deadline:
            await asyncio.sleep(self.lease_s / 3)
            with contextlib.suppress(*_ERRORS):
                await self._renew(keys=[self.lease_key(flight.key)], args=[flight.token, int(self.lease_s * 1000)])
        local = flight.local
        if local is not None and self._local.get(flight.key) is local:
            del self._local[flight.key]  # new requests for the key start a new flight
            local.done.set()

    async def _wait(self, flight: Flight) -> bytes | None:
        local = flight.local
        if local is not None and flight.follows_local:
            try:
                await asyncio.wait_for(local.done.wait(), self.max_wait_s)
            except TimeoutError:
                self.counters["timeouts"] += 1
                return None
            return local.outcome  # None: the leader failed; compute yourself
        return await self._poll(flight)

    async def _poll(self, flight: Flight) -> bytes | None:
        deadline = time.monotonic() + self.max_wait_s
        interval = POLL_FIRST_S
        lease, answer = self.lease_key(flight.key), self.answer_key(flight.key)
        while time.monotonic() < deadline:
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    outcome, ttl = await pipe.get(answer).pttl(lease).execute()
                if outcome is not None:
                    if flight.local is not None:  # for the requests of this process behind us
                        flight.local.outcome = bytes(outcome)
                    return bytes(outcome)
                # no lease and no outcome: the leader died or failed; take over
                if ttl == -2 and await self.client.set(lease, flight.token, nx=True, px=int(self.lease_s * 1000)):
                    flight.leader = True
                    self.counters["takeovers"] += 1
                    flight.heartbeat = asyncio.create_task(self._heartbeat(flight))
                    return None
            except _ERRORS:
                return None
            await asyncio.sleep(interval)
            interval = min(interval * POLL_GROWTH, POLL_MAX_S)
        self.counters["timeouts"] += 1
        return None
