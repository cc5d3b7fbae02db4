"""Each tier on its own, against the real thing: Redis, RocksDB, a Feast repo built by the pipeline."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from caches.redis_server import free_port
from caches.tiers.base import NO_EXPIRY, Tier, TierUnavailable
from caches.tiers.feast import FeastTier, FeastView, decode_features
from caches.tiers.redis import RedisTier
from caches.tiers.rocksdb import RocksDBLocked, RocksDBTier

# One small repo per machine, reused across test modules and runs: build_repo is a no-op when
# the same inputs were already built there.
SMALL_LIMIT = 3000
FEAST_REPO_DIR = Path(os.environ.get("TIERSERVE_TEST_FEAST_REPO", f"/tmp/tierserve-test-feast-{os.getuid()}"))


@pytest.fixture
def redis_url(both_redis_urls: str) -> str:
    """Every test here that uses Redis runs on the single server and on the 3-master cluster."""
    return both_redis_urls


def small_feast_repo(shared_data: Path) -> Any:
    from feature_store.pipeline import build_repo

    return build_repo(shared_data / "movielens_latest_small_2015" / "ratings.csv", FEAST_REPO_DIR,
                      limit=SMALL_LIMIT, progress=False)


@pytest.fixture(scope="module")
def feast_repo(shared_data: Path) -> Any:
    return small_feast_repo(shared_data)


def test_redis_tier_roundtrip_bytes_and_ttl(redis_url: str, redis_client: redis.Redis) -> None:
    tier = RedisTier(redis_url, meta_prefix="test:tiers")
    assert isinstance(tier, Tier)
    tier.put_many({"ns:m:1:a": b"xx", "ns:m:1:b": b"yyy"})
    tier.put_many({"ns:m:1:t": b"z"}, ttl_s=0.2)
    assert tier.get_many(["ns:m:1:a", "ns:m:1:b", "ns:m:1:nope"]) == {"ns:m:1:a": b"xx", "ns:m:1:b": b"yyy"}
    assert tier.size_bytes() == (8 + 2) + (8 + 3) + (8 + 1)
    tier.put_many({"ns:m:1:a": b"x"})  # overwrite: bytes follow the new size
    assert tier.size_bytes() == (8 + 1) + (8 + 3) + (8 + 1)
    tier.put_and_delete({"ns:m:1:c": b"c"}, ["ns:m:1:b"])
    assert tier.get_many(["ns:m:1:b", "ns:m:1:c"]) == {"ns:m:1:c": b"c"}
    time.sleep(0.3)
    assert tier.get_many(["ns:m:1:t"]) == {}
    assert tier.reconcile() == 1  # the expired key's size is forgotten
    assert tier.size_bytes() == (8 + 1) + (8 + 1)
    assert tier.delete_many(["ns:m:1:a", "ns:m:1:c"]) == 2
    assert tier.size_bytes() == 0
    st = tier.stats()
    assert st.hits >= 3 and st.misses >= 2


EXPIRY_SLACK_S = 0.05  # a PX write lands a round trip after its ms were computed


def test_redis_tier_reads_and_writes_an_expiry_per_value(redis_url: str, redis_client: redis.Redis) -> None:
    """What the tiered cache's moves rely on: a read says when each value expires (its PTTL), a
    write gives each value its own (the time a moved row has left), one already expired is not
    written and takes any older copy with it; the byte total follows. On the cluster the batch
    spans several hash-tag groups (one script call each), the generation-checked put too."""

    def counter_of(key: str) -> str:  # a key's generation counter, in its group on a cluster
        return f"test:expiry:counter:{key}"

    tier = RedisTier(redis_url, meta_prefix="test:expiry", shards=4, group_of=counter_of)
    soon, later, never, default, gone = (f"ns:m:1:{n}" for n in ("soon", "later", "never", "default", "gone"))
    values = {soon: b"s", later: b"ll", never: b"nnn", default: b"dddd", gone: b"ggggg"}
    tier.put_many({gone: b"old"})  # an older copy, replaced below by an expired value
    t0 = time.time()
    tier.put_many(values, ttl_s=60, expires_at={soon: t0 + 0.3, later: t0 + 5, never: NO_EXPIRY, gone: t0 - 1})
    got = tier.get_many([*values, "ns:m:1:missing"])
    assert got == {k: v for k, v in values.items() if k != gone}
    assert got.expires_at[never] == NO_EXPIRY
    assert t0 + 0.2 < got.expires_at[soon] <= t0 + 0.3 + EXPIRY_SLACK_S
    assert t0 + 4.9 < got.expires_at[later] <= t0 + 5 + EXPIRY_SLACK_S
    assert t0 + 59.9 < got.expires_at[default] <= time.time() + 60 + EXPIRY_SLACK_S  # no expiry of its own: ttl_s
    assert redis_client.ttl(tier.physical(never)) == -1
    assert tier.size_bytes() == sum(len(k) + len(v) for k, v in values.items() if k != gone)

    # The generation-checked put: per-value expiries too; a refused put changes nothing.
    redis_client.set(tier.counter_name(counter_of(default)), 1)
    t1 = time.time()
    refused = tier.put_checked({later: b"L", default: b"D", never: b"N"}, [soon],
                               {k: (counter_of(k), 0) for k in (later, default, never)},
                               expires_at={later: t1 + 2, default: t1 + 2, never: t1 - 1})
    assert refused == [default]
    got = tier.get_many([soon, later, never, default])
    assert got == {later: b"L", default: b"dddd"}  # soon deleted, never expired on the write
    assert t1 + 1.9 < got.expires_at[later] <= t1 + 2 + EXPIRY_SLACK_S
    assert got.expires_at[default] > t1 + 59  # refused: the old value and its expiry stay
    assert tier.size_bytes() == len(later) + 1 + len(default) + 4
    tier.delete_many([later, default])
    assert tier.size_bytes() == 0
    tier.close()


def test_each_cache_has_its_own_tier_bytes_series(redis_url: str, redis_client: redis.Redis,
                                                  tmp_path: Path) -> None:
    """The user and the item feature caches each have their own tiers: one gauge series each, not
    one series that whichever wrote last overwrites (as the Recommender's page once showed)."""
    from prometheus_client import REGISTRY

    from caches import metrics

    def gauge(tier: str, cache: str) -> float | None:
        return REGISTRY.get_sample_value("tierserve_tier_bytes", {"tier": tier, "namespace": cache})

    users = RedisTier(redis_url, meta_prefix="test:bytes-users", cache="test-users")
    items = RedisTier(redis_url, meta_prefix="test:bytes-items", cache="test-items")
    users.put_many({"features:u:1": b"x" * 100})
    items.put_many({"features:i:1": b"y" * 10})
    assert gauge("redis", "test-users") == users.size_bytes() > gauge("redis", "test-items") == items.size_bytes()
    ssd_users, ssd_items = RocksDBTier(tmp_path / "u", cache="test-users"), RocksDBTier(tmp_path / "i", cache="test-items")
    ssd_users.put_many({"features:u:1": b"x" * 100})
    ssd_items.put_many({"features:i:1": b"y" * 10})
    assert gauge("rocksdb", "test-users") == ssd_users.size_bytes() > gauge("rocksdb", "test-items") == ssd_items.size_bytes()
    assert metrics.BYTES.name == "tierserve_tier_bytes"
    users.delete_many(["features:u:1"])
    items.delete_many(["features:i:1"])
    ssd_users.close()
    ssd_items.close()


def test_redis_tier_down_raises_tier_unavailable_fast() -> None:
    tier = RedisTier(f"redis://127.0.0.1:{free_port()}/0")
    t0 = time.perf_counter()
    with pytest.raises(TierUnavailable):
        tier.get_many(["ns:m:1:a"])
    with pytest.raises(TierUnavailable):  # breaker open: no new connect attempt
        tier.put_many({"ns:m:1:a": b"x"})
    assert time.perf_counter() - t0 < 1.0
    assert tier.stats().errors >= 1


def test_rocksdb_tier_multiget_ttl_and_reopen(tmp_path: Path) -> None:
    tier = RocksDBTier(tmp_path / "db")
    tier.put_many({f"ns:m:1:{i}": bytes([i]) * 10 for i in range(100)})
    tier.put_many({"ns:m:1:ttl": b"soon gone"}, ttl_s=0.2)
    got = tier.get_many(["ns:m:1:3", "ns:m:1:50", "ns:m:1:missing"])
    assert got == {"ns:m:1:3": b"\x03" * 10, "ns:m:1:50": b"\x32" * 10}
    size = tier.size_bytes()
    time.sleep(0.25)
    assert tier.get_many(["ns:m:1:ttl"]) == {}
    assert tier.size_bytes() < size
    tier.close()
    again = RocksDBTier(tmp_path / "db")  # sizes rebuilt from disk
    assert len(list(again.keys())) == 100
    assert again.size_bytes() == sum(len(f"ns:m:1:{i}") + 10 for i in range(100))
    again.close()


def test_rocksdb_tier_reads_and_writes_an_expiry_per_value(tmp_path: Path) -> None:
    """A read says when each value expires (its header), a write takes one per value; a value
    written already expired replaces the older copy and reads as a miss. Kept across a reopen."""
    tier = RocksDBTier(tmp_path / "db")
    tier.put_many({"ns:m:1:gone": b"old"})
    t0 = time.time()
    tier.put_many({"ns:m:1:soon": b"s", "ns:m:1:never": b"n", "ns:m:1:default": b"d", "ns:m:1:gone": b"g"}, ttl_s=60,
                  expires_at={"ns:m:1:soon": t0 + 0.2, "ns:m:1:never": NO_EXPIRY, "ns:m:1:gone": t0 - 1})
    got = tier.get_many(["ns:m:1:soon", "ns:m:1:never", "ns:m:1:default", "ns:m:1:gone"])
    assert got == {"ns:m:1:soon": b"s", "ns:m:1:never": b"n", "ns:m:1:default": b"d"}
    assert got.expires_at["ns:m:1:soon"] == t0 + 0.2 and got.expires_at["ns:m:1:never"] == NO_EXPIRY
    assert t0 + 60 <= got.expires_at["ns:m:1:default"] <= time.time() + 60
    tier.close()
    again = RocksDBTier(tmp_path / "db")
    assert again.get_many(["ns:m:1:soon"]).expires_at == {"ns:m:1:soon": t0 + 0.2}
    time.sleep(max(0.0, t0 + 0.25 - time.time()))
    assert again.get_many(["ns:m:1:soon", "ns:m:1:never"]) == {"ns:m:1:never": b"n"}
    again.close()


DISK_FULL = "IO error: No space left on device: While appending to file: 000009.log"


class FailingRdict:
    """The tier's real Rdict, except that the calls named in `failing` raise what rocksdict raises
    on a full or broken disk (a bare Exception). The Rdict's own methods are read-only, so the
    failure is injected by standing in for the handle (`tier._db`)."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.failing: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)

    def _maybe_fail(self, op: str) -> None:
        if op in self.failing:
            raise Exception(DISK_FULL)  # noqa: TRY002 - exactly what rocksdict raises

    def write(self, batch: Any) -> None:
        self._maybe_fail("write")
        self.db.write(batch)

    def get(self, keys: Any) -> Any:
        self._maybe_fail("get")
        return self.db.get(keys)


def failing_disk(tier: RocksDBTier, monkeypatch: pytest.MonkeyPatch) -> FailingRdict:
    handle = FailingRdict(tier._db)
    monkeypatch.setattr(tier, "_db", handle)
    return handle


def test_rocksdb_io_errors_are_tier_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = RocksDBTier(tmp_path / "db")
    tier.put_many({"ns:m:1:a": b"old", "ns:m:1:b": b"bb"})
    size = tier.size_bytes()
    disk = failing_disk(tier, monkeypatch)
    disk.failing = {"write"}
    with pytest.raises(TierUnavailable, match="No space left on device") as err:
        tier.put_many({"ns:m:1:a": b"new value", "ns:m:1:c": b"c"})
    assert isinstance(err.value.__cause__, Exception) and str(err.value.__cause__) == DISK_FULL
    # The refused write changed nothing: sizes describe the disk, the old value is still served.
    assert tier.size_bytes() == size and "ns:m:1:c" not in tier
    assert tier.get_many(["ns:m:1:a", "ns:m:1:c"]) == {"ns:m:1:a": b"old"}
    with pytest.raises(TierUnavailable, match="No space left on device"):
        tier.delete_many(["ns:m:1:a"])
    # A refused delete still takes effect here (it may be an invalidation): never served again.
    assert tier.get_many(["ns:m:1:a", "ns:m:1:b"]) == {"ns:m:1:b": b"bb"} and "ns:m:1:a" not in tier
    disk.failing = {"get"}
    with pytest.raises(TierUnavailable, match="No space left on device"):
        tier.get_many(["ns:m:1:b"])
    assert tier.stats().errors == 3
    disk.failing = set()  # the disk works again: the next write lands the delete it refused
    tier.put_many({"ns:m:1:c": b"c"})
    assert tier.get_many(["ns:m:1:a", "ns:m:1:b", "ns:m:1:c"]) == {"ns:m:1:b": b"bb", "ns:m:1:c": b"c"}
    monkeypatch.undo()
    tier.close()
    again = RocksDBTier(tmp_path / "db")  # the delete reached the disk, not only the index
    assert sorted(again.keys()) == ["ns:m:1:b", "ns:m:1:c"]
    assert again.get_many(["ns:m:1:a"]) == {}
    again.close()


def test_rocksdb_path_locked_by_another_process_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "locked-db"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from caches.tiers.rocksdb import RocksDBTier
            t = RocksDBTier({str(path)!r})
            print("open", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2], text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        with pytest.raises(RocksDBLocked) as err:
            RocksDBTier(path)
        assert str(path) in str(err.value)
        assert "locked by another process" in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    RocksDBTier(path).close()  # the lock dies with its process


class CountingStore:
    """Wraps a FeatureStore to count online reads (one per view per batch is the contract)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.calls = 0

    def get_online_features(self, **kw: Any) -> Any:
        self.calls += 1
        return self.store.get_online_features(**kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_feast_tier_one_call_per_view_and_unknown_is_a_miss(feast_repo: Any) -> None:
    from feature_store.pipeline import open_store

    store = CountingStore(open_store(feast_repo.repo_dir))
    tier = FeastTier(views=[FeastView("user_features", "user_id"), FeastView("item_features", "item_id")], store=store)
    v = feast_repo.model_version
    users = [f"features:user_features:{v}:{u}" for u in feast_repo.user_ids_sample[:5]]
    items = [f"features:item_features:{v}:{i}" for i in feast_repo.popular_items[:5]]
    unknown = [f"features:user_features:{v}:987654321", f"features:item_features:{v}:not-an-int"]
    got = tier.get_many(users + items + unknown)
    assert store.calls == 2
    assert set(got) == set(users + items)
    feats = decode_features(got[users[0]])
    assert set(feats) >= {"n_ratings", "mean_rating", "embedding"}
    assert len(feats["embedding"]) == feast_repo.embedding_dim


def test_feast_tier_unreachable_raises_tier_unavailable(tmp_path: Path) -> None:
    tier = FeastTier(tmp_path / "no-repo", [FeastView("user_features", "user_id")])
    with pytest.raises(TierUnavailable):
        tier.get_many(["features:user_features:v:1"])
