"""The Recommender's purge of its result cache after a Redis restart (deployments/recommender.py,
`_check_redis_restart`) on a real Redis, single and cluster: it drops the entries
(`recs.{<tenant>}:...`) and nothing else; the per-tenant hit/miss counters and budget books
(`recs.__meta.{<tenant>}:...`) survive and keep counting, and no junk keys appear."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from caches.redis_client import run_ids, scan_keys
from deployments.recommender import RecommenderDeployment
from deployments.recommender_model import RecommendationResults

Recommender = RecommenderDeployment.func_or_class
ENTRY_BYTES = 500


@pytest.fixture
def redis_url(both_redis_urls: str) -> str:
    return both_redis_urls


class _Models:
    """The model lease, as far as the restart check uses it: a replica holding no SSD user rows."""

    @contextlib.contextmanager
    def lease(self) -> Iterator[Any]:
        yield SimpleNamespace(users=SimpleNamespace(tiered=SimpleNamespace(ssd=None, invalidate=lambda keys, broadcast: True)))


def _recommender(client: redis.Redis, results: RecommendationResults) -> Any:
    rec = object.__new__(Recommender)
    rec.redis, rec.results, rec.models = client, results, _Models()
    rec._redis_run_ids = {node: "the run before the restart" for node in run_ids(client)}
    rec._stop = SimpleNamespace(set=lambda: None)  # what __del__ sets (no watcher runs here)
    return rec


def _key(results: RecommendationResults, tenant: str, user: int) -> str:
    return results.key(tenant=tenant, model="recs", version="v1", payload={"user": user, "k": 10, "gen": 1})


def _keys(client: redis.Redis, pattern: str = "*") -> set[str]:
    return {k.decode() for k in scan_keys(client, pattern)}


def test_a_redis_restart_purges_the_entries_and_keeps_the_books(redis_client: redis.Redis) -> None:
    results = RecommendationResults(redis_client, default_ttl_s=3600, max_bytes=16 << 20, tenant_max_bytes=24_000)
    for tenant, users in (("acme", range(20)), ("beta", range(5))):
        for user in users:
            results.put(_key(results, tenant, user), b"x" * ENTRY_BYTES)
    for user in (0, 1, 2, 999):
        results.get(_key(results, "acme", user))  # 3 hits, 1 miss
    results.get(_key(results, "beta", 999))
    before = results.stats()
    assert before["entries"] == 25 and before["by_tenant"] == {"acme": {"hits": 3, "misses": 1},
                                                                "beta": {"hits": 0, "misses": 1}}
    seq = {t: redis_client.get(f"recs.__meta.{{{t}}}:seq") for t in ("acme", "beta")}
    assert all(seq.values())

    _recommender(redis_client, results)._check_redis_restart()

    assert _keys(redis_client, "recs.{*") == set()  # every entry gone
    after = results.stats()
    assert (after["entries"], after["bytes"]) == (0, 0)  # and forgotten by the books
    assert after["by_tenant"] == before["by_tenant"]  # the counters survive
    for tenant, old in seq.items():  # so does the books' report sequence (the forget reports moved it on)
        assert int(redis_client.get(f"recs.__meta.{{{tenant}}}:seq") or 0) > int(old)
    assert not any("__meta.{__meta" in k for k in _keys(redis_client))

    # the books keep counting: hits and misses, the byte totals, the tenant budget
    for user in range(100, 160):
        results.put(_key(results, "acme", user), b"y" * ENTRY_BYTES)
    assert results.get(_key(results, "acme", 159)) is not None and results.get(_key(results, "acme", 1)) is None
    stats = results.stats()
    assert stats["by_tenant"]["acme"] == {"hits": 4, "misses": 2}
    entries = _keys(redis_client, "recs.{*")
    assert entries and all(k.startswith("recs.{acme}:") for k in entries)
    assert stats["entries"] == len(entries) < 60  # the 24 kB tenant budget evicted the oldest
    size = RecommendationResults.entry_size(next(iter(entries)), b"y" * ENTRY_BYTES)
    assert stats["bytes"] == len(entries) * size <= 24_000
    assert int(redis_client.get("recs.__meta.{acme}:bytes")) == stats["bytes"]
    assert redis_client.hlen("recs.__meta.{acme}:sizes") == len(entries)

    # no junk: every key is an entry, a tenant's books, or the global ledger, of a real tenant
    tenants = {"acme", "beta"}
    for key in _keys(redis_client):
        if key.startswith("{recs.__meta}:"):
            continue
        head, _, _ = key.partition(":")
        assert head in {f"recs.{{{t}}}" for t in tenants} | {f"recs.__meta.{{{t}}}" for t in tenants}, key
    ledger_rows = [{f.decode() for f in redis_client.hkeys("{recs.__meta}:tenants:seq")}]
    ledger_rows += [{m.decode() for m in redis_client.zrange(f"{{recs.__meta}}:tenants:{what}", 0, -1)}
                    for what in ("bytes", "entries", "expiry")]
    for rows in ledger_rows:  # the global ledger's rows: real tenants only
        assert rows <= tenants, rows
