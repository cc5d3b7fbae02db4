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

import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

import redis

from caches.result import CacheUnavailable, RedisGuard

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
        self.guard = RedisGuard()
        self._local: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._bump = client.register_script(_BUMP_SCRIPT)

    def current(self, model: str) -> str:
        """The model's version; when Redis is down, the last version seen (or the default)."""
        now = time.monotonic()
        with self._lock:
            cached = self._local.get(model)
        if cached and now - cached[1] < self.cache_s:
            return cached[0]
        try:
            raw = self.guard.call(lambda: self.client.hget(VERSIONS_KEY, model))
        except CacheUnavailable:
            # caches are bypassed while Redis is down, so a stale version cannot serve stale data
            return cached[0] if cached else self._default(model)
        version = raw.decode() if raw is not None else self._default(model)
        with self._lock:
            self._local[model] = (version, now)
        return version

    def bump(self, model: str, version: str) -> str:
        """Set the model's version; returns the previous one (raises CacheUnavailable if Redis is down)."""
        if not version or ":" in version:
            raise ValueError("version must be non-empty and contain no ':'")
        raw = self.guard.call(lambda: self._bump(keys=[VERSIONS_KEY], args=[model, version]))
        previous = raw.decode() if raw is not None else self._default(model)
        with self._lock:
            self._local[model] = (version, time.monotonic())
        return previous

    def all(self) -> dict[str, str]:
        out = dict(self.defaults)
        try:
            stored = self.guard.call(lambda: self.client.hgetall(VERSIONS_KEY))
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
