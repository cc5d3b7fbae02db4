"""Safety of the recommendation path's caches against real Redis and RocksDB: batches past Lua's
`unpack` cap, Redis errors other than a dead connection, durable pending invalidations, and the
reclaim of dead replicas' RocksDB directories, and the restart check's run ids (one server, and
any one primary of a cluster)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import redis

from caches.admission import MAX_KEYS_PER_SCRIPT
from caches.invalidation import PendingInvalidations
from caches.redis_client import make_client, restarted, run_ids
from caches.redis_server import EmbeddedRedis, EmbeddedRedisCluster, free_port
from caches.tiers.rocksdb import RocksDBTier, claim_dir, reclaim_dead_dirs
from deployments.config import REPO_ROOT
from tests.integration.test_tiered_cache import open_cache, source_for, val

# A heavy user with k=100 asked for ~500 item keys at once; the script failed from ~500 on.
BIG_BATCH = 2_000


def test_a_batch_far_past_luas_unpack_cap_is_read_placed_and_read_back(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    assert BIG_BATCH > 4 * MAX_KEYS_PER_SCRIPT
    keys = [f"t:m:1:{i}" for i in range(BIG_BATCH)]
    cache = open_cache(redis_url, tmp_path / "ssd", cold=source_for(keys), ram=BIG_BATCH * 200)
    try:
        first = cache.get_many(keys)
        assert not first.degraded and not first.missing
        assert first.values == {k: val(k) for k in keys}
        again = cache.get_many(keys)
        assert not again.degraded and again.values == first.values
        assert again.ram_hits > 0  # placed in RAM in chunks, read back from RAM in chunks
        cache.policy.remove(keys)  # the remove script is chunked too
        assert cache.policy.resident_bytes() == 0
    finally:
        cache.close()


def test_redis_refusing_writes_with_oom_degrades_instead_of_raising(tmp_path: Path) -> None:
    keys = [f"t:m:1:{i}" for i in range(50)]
    with EmbeddedRedis() as server:
        cache = open_cache(server.url, tmp_path / "ssd", cold=source_for(keys), invalidation=False)
        admin = redis.Redis.from_url(server.url)
        try:
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)  # every write now answers `OOM command not allowed`
            got = cache.get_many(keys)
            assert got.degraded and got.values == {k: val(k) for k in keys}  # from SSD/cold, no 500
            assert cache.invalidate(keys[:3]) is True  # deletes free memory: Redis allows them
        finally:
            admin.config_set("maxmemory", 0)
            admin.close()
            cache.close()


def test_an_invalidation_that_cannot_reach_redis_says_so(tmp_path: Path) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    cache = open_cache(nowhere, tmp_path / "ssd", cold=source_for(["t:m:1:0"]))
    try:
        assert cache.invalidate(["t:m:1:0"]) is False  # the caller keeps its pending record
    finally:
        cache.close()


def test_pending_invalidations_stay_until_an_apply_reaches_everyone(redis_client: redis.Redis) -> None:
    pending = PendingInvalidations(redis_client, "test:pending")
    pending.arm("7", 0.0)
    pending.arm("8", 3600.0)  # not due yet
    applied: list[list[str]] = []
    assert pending.sweep(lambda users: applied.append(users) or False) == 0  # Redis failed: kept
    assert pending.count() == 2
    assert pending.sweep(lambda users: applied.append(users) or True) == 1
    assert applied == [["7"], ["7"]] and pending.count() == 1
    # A record re-armed after it was read (a newer event of the user) is not settled by the old read.
    pending.arm("9", 0.0)
    stale = pending.due()
    pending.arm("9", 0.0)
    assert pending.settle(stale) == 0 and pending.count() == 2


HOLDER = textwrap.dedent("""
    import sys, time
    from caches.tiers.rocksdb import RocksDBTier, claim_dir
    path = sys.argv[1]
    owner = claim_dir(path)
    db = RocksDBTier(path + "/users")
    print("ready", flush=True)
    if sys.argv[2] == "hold":
        time.sleep(120)
""")


def _run_holder(path: Path, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), mode], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_dead_replicas_rocksdb_directories_are_reclaimed_live_ones_kept(tmp_path: Path) -> None:
    root = tmp_path / "rocksdb"
    live = _run_holder(root / "recommender-live", "hold")
    try:
        _run_holder(root / "recommender-dead", "exit").wait(30)  # exited: its locks are gone
        legacy = RocksDBTier(root / "recommender-legacy" / "users")  # an older build: no owner file
        legacy.put_many({"k": b"v"})
        legacy.close()
        other = root / "embeddings-x"  # another deployment's directory: not ours to judge
        other.mkdir(parents=True)
        ours = root / "recommender-me"
        handle = claim_dir(ours)
        try:
            removed = reclaim_dead_dirs(root, prefix="recommender-", keep=ours)
            assert sorted(p.name for p in removed) == ["recommender-dead", "recommender-legacy"]
            assert (root / "recommender-live").is_dir() and ours.is_dir() and other.is_dir()
            assert not (root / "recommender-dead").exists() and not (root / "recommender-dead.owner").exists()
            # Our own claim is seen as alive from this very process too (flock, not fcntl).
            assert reclaim_dead_dirs(root, prefix="recommender-") == []
        finally:
            handle.close()
    finally:
        live.kill()
        live.wait(30)
    assert [p.name for p in reclaim_dead_dirs(root, prefix="recommender-")] == ["recommender-live", "recommender-me"]


def test_recommendation_results_keep_their_own_budget_apart_from_the_chat_cache(redis_client: redis.Redis) -> None:
    from caches.result import ResultCache
    from deployments.recommender_model import RecommendationResults

    chat = ResultCache(redis_client, max_bytes=1 << 20)
    chat_keys = [chat.key(tenant="t", model="m", version="1", payload=i) for i in range(20)]
    for k in chat_keys:
        chat.put(k, b"x" * 100)
    budget = 20_000
    recs = RecommendationResults(redis_client, max_bytes=budget)
    for user in range(2_000):  # a flood of distinct users: 100x the budget
        recs.put(recs.key(tenant="t", model="recs", version="1", payload={"user": user}), b"y" * 1_000)
        assert int(redis_client.get(recs._bytes_key) or 0) <= budget
    assert all(chat.get(k) == b"x" * 100 for k in chat_keys)  # the chat entries were not evicted


def _run_ids_after_restart(client: redis.Redis) -> dict[str, str]:
    """The run ids once the client reaches every server again (the first call may meet the old,
    closed connection: the client never retries by itself)."""
    deadline = time.monotonic() + 15
    while True:
        try:
            return run_ids(client)
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_restarted_single_server_is_noticed() -> None:
    with EmbeddedRedis() as server:
        client = make_client(server.url)
        before = run_ids(client)
        assert list(before) == ["server"] and restarted(before, run_ids(client)) == []
        server.stop()
        server.start()
        assert restarted(before, _run_ids_after_restart(client)) == ["server"]
        client.close()


def test_a_restart_of_any_one_cluster_primary_is_noticed() -> None:
    """Its own cluster: the session's must not lose a master's keys under other tests."""
    with EmbeddedRedisCluster(masters=3) as cluster:
        client = make_client(cluster.url)
        before = run_ids(client)
        assert len(before) == 3 and restarted(before, run_ids(client)) == []
        node = cluster.nodes[1]
        node.stop()
        node.start()  # same port and nodes.conf: it rejoins with its slots, empty
        cluster._wait_ok(30)
        assert restarted(before, _run_ids_after_restart(client)) == [f"127.0.0.1:{node.port}"]
        client.close()
