"""Shared fixtures: one real Redis per test run (embedded unless REDIS_URL is set), and a real
3-master Redis Cluster (started on first use, embedded unless REDIS_CLUSTER_URL is set).

A test module runs against both by overriding `redis_url` with `tests.support.over_both_backends`
(a fixture parametrised over "single" and "cluster")."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("TIERSERVE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set TIERSERVE_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def single_redis_url() -> Iterator[str]:
    """A real Redis for the whole run: $REDIS_URL if set, else an embedded redis-server."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    from caches.redis_server import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(scope="session")
def cluster_redis_url() -> Iterator[str]:
    """A real Redis Cluster (3 masters, no replicas) for the whole run, as a `redis+cluster://`
    URL: $REDIS_CLUSTER_URL if set, else three embedded cluster-enabled redis-servers."""
    if os.environ.get("REDIS_CLUSTER_URL"):
        yield os.environ["REDIS_CLUSTER_URL"]
        return
    from caches.redis_server import EmbeddedRedisCluster

    with EmbeddedRedisCluster(masters=3) as cluster:
        yield cluster.url


@pytest.fixture(scope="session")
def redis_url(single_redis_url: str) -> str:
    """The Redis most tests run against: the single server."""
    return single_redis_url


@pytest.fixture(params=["single", "cluster"])
def both_redis_urls(request: pytest.FixtureRequest) -> str:
    """The single server, then the cluster: a module that defines
    `def redis_url(both_redis_urls): return both_redis_urls` runs its tests on both."""
    return str(request.getfixturevalue(f"{request.param}_redis_url"))


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on a clean database: every test starts from an empty Redis (every primary of a
    cluster)."""
    from caches.redis_client import is_cluster_url, node_url

    if is_cluster_url(redis_url):
        from redis.cluster import RedisCluster

        cluster = RedisCluster.from_url(node_url(redis_url))
        cluster.flushdb(target_nodes=RedisCluster.PRIMARIES)
        yield cluster  # type: ignore[misc]
        cluster.close()
        return
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()
