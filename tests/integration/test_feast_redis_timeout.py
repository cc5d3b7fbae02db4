"""A call to Feast's Redis online store is bounded by the connection string's `socket_timeout`.

Why it matters: an event's read-modify-write of the user row runs under a 10 s lock
(deployments/recommender_events.py). redis-py's default is no socket timeout at all, and it
re-sends a command that timed out (10 tries), so a stalled Feast Redis held the push past the lock,
to land after another replica's update of the same row (a lost rating). The manifests and docs set
`socket_timeout=2`, and UserActivityWriter makes the client try once (`one_try_online_redis`).
This checks, on a real Redis that stalls (DEBUG SLEEP), that the push then fails within the
timeout (the event is queued and replayed), where without a timeout it waits the stall out.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from caches.redis_server import EmbeddedRedis
from caches.tiers.base import TierUnavailable
from caches.tiers.feast import FeastTier, FeastView
from feature_store import names
from feature_store.events import FEAST_REDIS_ENV, FeatureStoreUnavailable, UserActivityWriter
from feature_store.pipeline import RepoInfo
from tests.slow_redis import stalled

STALL_S = 6.0
TIMEOUT_S = 1  # seconds (the manifests say 2)


def redis_repo(repo: RepoInfo, target: Path) -> Path:
    """The module's repo, its online store on Redis (the production feature_store.yaml)."""
    shutil.copytree(repo.repo_dir, target, ignore=shutil.ignore_patterns(".build.lock", "*.tmp", "online_store.db"))
    shutil.copyfile(Path(names.__file__).with_name("feature_store_redis.yaml"), target / "feature_store.yaml")
    return target


@pytest.mark.parametrize("client", ["as the writer makes it", "as Feast makes it"])
def test_a_stalled_feast_redis_push_fails_within_the_socket_timeout(
        repo: RepoInfo, writer: UserActivityWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        client: str) -> None:
    user = int(repo.user_ids_sample[0])
    row = {names.USER_KEY: user, **(writer.current_row(user) or {})}  # a full row, from the SQLite store
    with EmbeddedRedis(workdir=tmp_path / "feast-redis") as server:
        url = urlparse(server.url)
        monkeypatch.setenv(FEAST_REDIS_ENV, f"{url.hostname}:{url.port},db=0,socket_timeout={TIMEOUT_S},"
                                            f"socket_connect_timeout={TIMEOUT_S}")
        on_redis = UserActivityWriter(redis_repo(repo, tmp_path / "repo"))
        store = on_redis._open()
        if client == "as Feast makes it":  # redis-py's own retries: what the writer had before
            store._get_provider().online_store._client = None
        on_redis.push(row)  # a warm pooled connection: the stalled push is really sent
        assert on_redis.current_row(user) is not None
        with stalled(url.hostname or "127.0.0.1", int(url.port or 6379), STALL_S):
            started = time.monotonic()
            try:
                on_redis.push(row)
                failed = False
            except FeatureStoreUnavailable:
                failed = True
            took = time.monotonic() - started
        if client == "as Feast makes it":
            # re-sent after each timeout until the server woke: a stall past the event lock would
            # have held the push past it
            assert not failed and took >= STALL_S * 0.8, (failed, took)
        else:
            assert failed and took < TIMEOUT_S + 1.5, (failed, took)


def test_a_stalled_feast_redis_read_fails_the_tier_within_the_socket_timeout(
        repo: RepoInfo, writer: UserActivityWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cold tier's read on the recommendation path: one try, then the TieredCache answers from
    what it holds (before, the read was re-sent until the server woke, holding an answer thread)."""
    user = int(repo.user_ids_sample[0])
    row = {names.USER_KEY: user, **(writer.current_row(user) or {})}
    with EmbeddedRedis(workdir=tmp_path / "feast-redis") as server:
        url = urlparse(server.url)
        monkeypatch.setenv(FEAST_REDIS_ENV, f"{url.hostname}:{url.port},db=0,socket_timeout={TIMEOUT_S},"
                                            f"socket_connect_timeout={TIMEOUT_S}")
        on_redis = redis_repo(repo, tmp_path / "repo")
        UserActivityWriter(on_redis).push(row)
        tier = FeastTier(on_redis, [FeastView(names.USER_VIEW, names.USER_KEY)])
        key = f"features:{names.USER_VIEW}:v1:{user}"
        assert key in tier.get_many([key])  # a warm pooled connection, and the row is there
        with stalled(url.hostname or "127.0.0.1", int(url.port or 6379), STALL_S):
            started = time.monotonic()
            with pytest.raises(TierUnavailable):
                tier.get_many([key])
            took = time.monotonic() - started
        assert took < TIMEOUT_S + 1.5, took
