"""Model version registry in Redis: the version is part of every cache key and semantic scope.

A bump writes the new version to one Redis hash. Old entries become unreachable at once for any
replica that has seen the new version, because their keys carry the old one; the background purge
(:func:`purge_old_versions`) then only reclaims memory, it is not needed for correctness.

How fast replicas see a bump: each replica caches a version for :data:`VERSION_CACHE_S` (0.5 s) and
then re-reads the hash (one HGET, ~0.1 ms, at most twice a second per model). A short TTL was
chosen over pub/sub: pub/sub drops messages while a replica is disconnected, and a stream needs a
reader thread per process; a TTL has no missed-message case and bounds staleness by construction
(worst case 0.5 s plus one round trip, inside the ~1 s promise). The replica that bumps sees the
new version immediately.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, Protocol, TypeVar

import redis

from caches.redis_client import Breaker
from caches.result import CacheUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

VERSIONS_KEY = "models.__versions"
# Staleness bound for a bump seen from another replica (see module doc).
VERSION_CACHE_S = 0.5

# Atomic get-and-set so two concurrent bumps each learn the version they replaced.
_BUMP_SCRIPT = """
local prev = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return prev
"""


class ModelVersions:
    def __init__(
        self, client: redis.Redis, defaults: Mapping[str, str], *, cache_s: float = VERSION_CACHE_S
    ) -> None:
        self.client = client
        self.defaults = dict(defaults)
        self.cache_s = cache_s
        self.guard = Breaker("model versions")
        self._local: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._bump = client.register_script(_BUMP_SCRIPT)

    def confirmed(self, model: str) -> str:
        """The model's version as Redis holds it (read within the last `cache_s`); raises
        CacheUnavailable when it cannot be read now. For cache keys: a guessed version (the last
        one seen, or the configured default on a replica that never read one) can name entries of
        a version that was bumped away, and a cache whose own Redis calls still succeed (its
        breaker is not this one, and one timed-out read is not an outage) would serve them."""
        now = time.monotonic()
        with self._lock:
            cached = self._local.get(model)
        if cached and now - cached[1] < self.cache_s:
            return cached[0]
        raw = self.guard.call("versions.get", self.client.hget, VERSIONS_KEY, model)
        version = raw.decode() if raw is not None else self._default(model)
        with self._lock:
            self._local[model] = (version, now)
        return version

    def current(self, model: str) -> str:
        """The model's version; when Redis cannot be read, the last version seen (or the
        default). For what to load and serve (the Recommender keeps its model through an
        outage), never for a cache key: see `confirmed`."""
        try:
            return self.confirmed(model)
        except CacheUnavailable:
            with self._lock:
                cached = self._local.get(model)
            return cached[0] if cached else self._default(model)

    def known(self, model: str) -> tuple[str, bool]:
        """(the last version seen, whether it is older than the cache period) without touching
        Redis: for answers where the version is informative only (`/v1/models`), which must not
        wait on a slow Redis. Never seen: the default, stale."""
        with self._lock:
            cached = self._local.get(model)
        if cached is None:
            return self._default(model), True
        return cached[0], time.monotonic() - cached[1] >= self.cache_s

    def bump(self, model: str, version: str) -> str:
        """Set the model's version; returns the previous one (raises CacheUnavailable if Redis is down)."""
        if not version or ":" in version:
            raise ValueError("version must be non-empty and contain no ':'")
        raw = self.guard.call("versions.bump", lambda: self._bump(keys=[VERSIONS_KEY], args=[model, version]))
        previous = raw.decode() if raw is not None else self._default(model)
        with self._lock:
            self._local[model] = (version, time.monotonic())
        return previous

    def all(self) -> dict[str, str]:
        out = dict(self.defaults)
        try:
            stored = self.guard.call("versions.all", self.client.hgetall, VERSIONS_KEY)
        except CacheUnavailable:
            return out
        out.update({k.decode(): v.decode() for k, v in stored.items()})
        return out

    def _default(self, model: str) -> str:
        return self.defaults.get(model, "1")


class _Purgeable(Protocol):
    def delete_model_version(self, model: str, version: str | None = None) -> int: ...


def purge_old_versions(
    result_cache: _Purgeable | None, semantic_cache: _Purgeable | None, model: str, old_version: str
) -> dict[str, Any]:
    """Delete a model version's entries from both caches (call it after :meth:`ModelVersions.bump`)."""
    out: dict[str, Any] = {"model": model, "version": old_version}
    for name, cache in (("result", result_cache), ("semantic", semantic_cache)):
        if cache is None:
            continue
        try:
            out[name] = cache.delete_model_version(model, old_version)
        except CacheUnavailable as exc:
            # nothing is served from an old version anyway; the purge can be retried later
            out[name] = f"skipped: {exc}"
    return out


def purge_in_background(
    result_cache: _Purgeable | None, semantic_cache: _Purgeable | None, model: str, old_version: str
) -> threading.Thread:
    """Run :func:`purge_old_versions` in a daemon thread so the admin call returns at once."""
    thread = threading.Thread(
        target=purge_old_versions,
        args=(result_cache, semantic_cache, model, old_version),
        name=f"purge-{model}-{old_version}",
        daemon=True,
    )
    thread.start()
    return thread


class Leased(Generic[T]):
    """The current value of something swappable (a model version's caches), handed out in
    leases: `swap` installs a new value at once, and the old one is closed only when the last
    lease taken on it ends, so a reload never closes caches an in-flight request is using."""

    def __init__(self, value: T, close: Callable[[T], None]) -> None:
        self._value = value
        self._close = close
        self._leases: dict[int, int] = {id(value): 0}
        self._retired: dict[int, T] = {}
        self._lock = threading.Lock()

    @property
    def current(self) -> T:
        return self._value

    @contextlib.contextmanager
    def lease(self) -> Iterator[T]:
        with self._lock:
            value = self._value
            self._leases[id(value)] += 1
        try:
            yield value
        finally:
            self._release(value)

    def swap(self, new: T) -> T:
        with self._lock:
            old, self._value = self._value, new
            self._leases[id(new)] = 0
            self._retired[id(old)] = old
        self._release(old, taken=False)
        return old

    def in_flight(self, value: T) -> int:
        with self._lock:
            return self._leases.get(id(value), 0)

    def _release(self, value: T, *, taken: bool = True) -> None:
        key = id(value)
        with self._lock:
            if taken:
                self._leases[key] -= 1
            if key not in self._retired or self._leases[key] > 0:
                return
            del self._retired[key], self._leases[key]
        try:
            self._close(value)
        except Exception:  # closing old caches must never fail a request that merely finished last
            log.exception("closing a retired value failed")
