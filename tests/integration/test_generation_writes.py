"""Generation-checked writes (caches/generations.py) against real Redis, RocksDB and Feast.

Each test interleaves a read of replica A with a user event recorded through replica B at the
worst moment, deterministically: the event runs inside one of A's tier calls, injected by
wrapping that tier here (no hook in the production code). The event is the Recommender's: the
row pushed through Feast, then B's `invalidate(bump=True)` (generation first, then every copy).
A has no stream consumer, so nothing but the generation checks can save it. After each race the
test looks at every tier's raw bytes: no old row may be servable from any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from caches.admission import SharedWTinyLFU, WTinyLFUConfig
from caches.features import FeatureCache, ident_of
from caches.generations import Generations, unframe
from caches.redis_server import EmbeddedRedis
from caches.tiered import TieredCache
from caches.tiers.feast import FeastTier, FeastView, decode_features
from caches.tiers.redis import RedisTier, shards_for
from caches.tiers.rocksdb import RocksDBTier
from deployments.recommender_model import generation_key
from feature_store import names
from feature_store.events import Activity, UserActivityWriter
from feature_store.pipeline import RepoInfo
from tests.support import item_features, user_cache


@pytest.fixture
def redis_url(both_redis_urls: str) -> str:
    """Every test here that uses Redis runs on the single server and on the 3-master cluster."""
    return both_redis_urls


ROW_BYTES = 700  # a user row's key and framed value are about 600 bytes
NAME = f"features-{names.USER_VIEW}"  # the users cache's name: A and B share its RAM metadata


class OnRead:
    """Runs `then` once, right after the wrapped tier answered a read that asked for `key`."""

    def __init__(self, key: str, then: Callable[[], None]) -> None:
        self.key = key
        self.then = then
        self.fired = False

    def after(self, keys: list[str]) -> None:
        if not self.fired and self.key in keys:
            self.fired = True
            self.then()


class Hooked:
    """A tier (mixed in before it) whose reads can run an event right after they answer."""

    hook: OnRead | None = None

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        found = super().get_many(keys)  # type: ignore[misc]
        if self.hook is not None:
            self.hook.after(keys)
        return found


class HookedRedis(Hooked, RedisTier):
    pass


class HookedRocksDB(Hooked, RocksDBTier):
    pass


class HookedFeast(Hooked, FeastTier):
    pass  # its read returns the old row, read before the event's push


def on_read(tier: object, key: str, then: Callable[[], None]) -> OnRead:
    """Arms a Hooked tier: `then` runs once, right after it answers a read of `key`."""
    assert isinstance(tier, Hooked)
    tier.hook = OnRead(key, then)
    return tier.hook


def replica(repo: RepoInfo, redis_url: str, path: Path, *, ram_budget: int = 1 << 20) -> FeatureCache:
    """A replica with the production wiring of the users cache (TieredCache.open's), with tiers
    that can run an event in the middle of a read, and no stream consumer."""
    def gen_of(key: str) -> str:
        return generation_key(ident_of(key))

    cfg = WTinyLFUConfig(ram_budget, entry_bytes=ROW_BYTES)
    ram = HookedRedis(redis_url, meta_prefix=f"tierserve:tier:{NAME}", group_of=gen_of,
                      shards=shards_for(ram_budget, cfg.entry_bytes))
    policy = SharedWTinyLFU(ram, cfg, prefix=f"tierserve:placement:{NAME}")
    cold = HookedFeast(repo.repo_dir, [FeastView(names.USER_VIEW, names.USER_KEY)])
    gens = Generations(ram.client, gen_of, redis_name=ram.counter_name)
    tiered = TieredCache(ram=ram, ssd=HookedRocksDB(path), cold=cold, policy=policy, ssd_budget_bytes=8 << 20,
                         ttl_s=3600.0, name=NAME, generations=gens)
    return FeatureCache(tiered, view=names.USER_VIEW, entity_key=names.USER_KEY, model_version=repo.model_version)


@pytest.fixture
def pair(repo: RepoInfo, redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[tuple[FeatureCache, FeatureCache]]:
    a = replica(repo, redis_url, tmp_path / "a")
    b = replica(repo, redis_url, tmp_path / "b")
    yield a, b
    a.close()
    b.close()


def event(repo: RepoInfo, writer: UserActivityWriter, b: FeatureCache, user: int) -> Callable[[], None]:
    """The Recommender's event, recorded through replica B: push, then generation + drops."""

    def run() -> None:
        item_id = repo.popular_items[0]
        writer.record(Activity(user, item_id, "rating", 1.0), item_features(writer, item_id), repo.genres)
        assert b.invalidate([user], bump=True)

    return run


def sampled_user(repo: RepoInfo, writer: UserActivityWriter, i: int) -> tuple[int, dict[str, Any]]:
    """The repo's i-th sampled user and its row in the online store now (a sampled user has one)."""
    user = repo.user_ids_sample[i]
    row = writer.current_row(user)
    assert row is not None
    return user, row


def n_ratings(raw: bytes) -> int:
    return int(decode_features(raw)["n_ratings"])


def servable(cache: FeatureCache, client: redis.Redis, user: int) -> dict[str, int]:
    """Every copy of the user's row a tier would serve now (its generation is the current one):
    tier name -> the copy's n_ratings."""
    key = cache.key(user)
    ram = cache.tiered.ram
    assert isinstance(ram, RedisTier)
    current = int(client.get(ram.counter_name(generation_key(user))) or 0)  # Redis names: tagged on a cluster
    out: dict[str, int] = {}
    raw_ram = client.get(ram.physical(key))
    assert cache.tiered.ssd is not None
    raw_ssd = cache.tiered.ssd.get_many([key]).get(key)
    for tier, raw in (("redis", raw_ram), ("rocksdb", raw_ssd)):
        if raw is not None:
            gen, value = unframe(raw)
            if gen == current:
                out[tier] = n_ratings(value)
    return out


def test_a_read_that_straddles_an_event_leaves_no_old_row_in_any_tier(
    pair: tuple[FeatureCache, FeatureCache], repo: RepoInfo, writer: UserActivityWriter, redis_client: redis.Redis
) -> None:
    a, b = pair
    user, before = sampled_user(repo, writer, 0)
    hook = on_read(a.tiered.cold, a.key(user), event(repo, writer, b, user))

    straddling = a.get([user])  # generation read, Feast read (old row), the event, then the fills
    assert hook.fired
    assert straddling.features[user]["n_ratings"] == before["n_ratings"]  # began before the event: old
    assert a.tiered.counters.generation_refused == 1  # RAM refused the old row
    assert redis_client.get(a.tiered.ram.physical(a.key(user))) is None
    assert servable(a, redis_client, user) == {}  # A's SSD copy carries the old generation: dead

    after = a.get([user])
    assert after.sources[user] == "feast" and after.features[user]["n_ratings"] == before["n_ratings"] + 1
    assert a.tiered.counters.generation_stale >= 1  # the dead SSD copy was refused (and deleted)
    again = a.get([user])  # now placed, at the new generation
    assert again.features[user]["n_ratings"] == before["n_ratings"] + 1
    assert set(servable(a, redis_client, user).values()) == {before["n_ratings"] + 1}
    assert b.get([user]).features[user]["n_ratings"] == before["n_ratings"] + 1


def test_a_demotion_after_an_invalidation_does_not_bring_the_old_row_back(
    repo: RepoInfo, writer: UserActivityWriter, redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # A RAM budget of a few rows, so that A's reads of other users demote the target.
    a = replica(repo, redis_url, tmp_path / "a", ram_budget=4 * ROW_BYTES)
    b = replica(repo, redis_url, tmp_path / "b", ram_budget=4 * ROW_BYTES)
    try:
        user, before = sampled_user(repo, writer, 1)
        others = repo.user_ids_sample[2:]
        assert b.get([user]).sources[user] == "feast"  # B placed it in RAM; A has no SSD copy
        assert redis_client.get(a.tiered.ram.physical(a.key(user))) is not None
        # A's demotion reads the RAM copy to write it to its SSD
        hook = on_read(a.tiered.ram, a.key(user), event(repo, writer, b, user))
        for other in others:
            for _ in range(3):  # read more often than the target: it loses its place in RAM to them
                a.get([other])
            if hook.fired:
                break
        assert hook.fired, "no read of A demoted the target: the RAM budget is too large for the test"
        assert a.tiered.ssd is not None
        raw = a.tiered.ssd.get_many([a.key(user)]).get(a.key(user))
        # The race happened: the demotion wrote the old row to A's SSD after the event's drops.
        assert raw is not None and n_ratings(unframe(raw)[1]) == before["n_ratings"]
        assert servable(a, redis_client, user) == {}  # ... under the old generation: never served

        got = a.get([user])
        assert got.sources[user] == "feast" and got.features[user]["n_ratings"] == before["n_ratings"] + 1
        assert a.tiered.counters.generation_stale >= 1
        assert set(servable(a, redis_client, user).values()) <= {before["n_ratings"] + 1}
    finally:
        a.close()
        b.close()


def test_a_promotion_after_an_invalidation_is_refused_by_ram(
    pair: tuple[FeatureCache, FeatureCache], repo: RepoInfo, writer: UserActivityWriter, redis_client: redis.Redis
) -> None:
    a, b = pair
    user, before = sampled_user(repo, writer, 2)
    a.get([user])  # A's SSD and RAM hold the row
    a.tiered.ram.delete_many([a.key(user)])  # RAM lost it (evicted elsewhere): the next read promotes
    a.tiered.policy.remove([a.key(user)])
    # after A's SSD answered with the (then current) row
    hook = on_read(a.tiered.ssd, a.key(user), event(repo, writer, b, user))

    promoted = a.get([user])
    assert hook.fired and promoted.sources[user] == "rocksdb"
    assert a.tiered.counters.generation_refused == 1
    assert redis_client.get(a.tiered.ram.physical(a.key(user))) is None
    assert a.key(user) not in a.tiered.policy.resident_keys()  # the placement forgot the refused write
    assert servable(a, redis_client, user) == {}
    assert a.get([user]).features[user]["n_ratings"] == before["n_ratings"] + 1


def test_without_readable_generations_feast_answers_before_an_unverified_ssd_copy(
    repo: RepoInfo, writer: UserActivityWriter, tmp_path: Path
) -> None:
    user = repo.user_ids_sample[3]
    with EmbeddedRedis() as server:
        a = user_cache(repo, server.url, tmp_path / "a", ttl_s=3600.0, generation_key=generation_key)
        try:
            assert a.get([user]).sources[user] == "feast"  # SSD now holds it
            server.stop()
            down = a.get([user])
            # Its generation is unknown: the copy cannot be verified, so the source answers.
            assert down.degraded and down.sources[user] == "feast"
            assert isinstance(a.tiered.cold, FeastTier)
            a.tiered.cold._store = BrokenStore()  # and with the source gone too: the copy, degraded
            worst = a.get([user])
            assert worst.degraded and worst.sources[user] == "rocksdb"
        finally:
            a.close()


class BrokenStore:
    def get_online_features(self, **_: Any) -> Any:
        raise ConnectionError("online store unreachable")

    def get_feature_view(self, name: str) -> Any:
        raise ConnectionError("registry unreachable")


def test_ram_writes_land_only_at_the_current_generation_in_bounded_calls(
    redis_client: redis.Redis, redis_url: str
) -> None:
    from caches.tiers.redis import MAX_KEYS_PER_CALL

    def counter_of(key: str) -> str:  # two entities; on a cluster a key shares its counter's hash tag
        return f"test:gen:counter:{int(key.rsplit(':', 1)[1]) % 2}"

    tier = RedisTier(redis_url, meta_prefix="test:gen", group_of=counter_of)
    n = 2 * MAX_KEYS_PER_CALL + 500  # three script calls
    items = {f"t:m:1:{i}": b"v" * 10 for i in range(n)}
    expect = {k: (counter_of(k), 0) for k in items}
    redis_client.set(tier.counter_name("test:gen:counter:1"), 3)  # entity 1 moved on: its rows were read before that
    refused = tier.put_checked(items, [], expect)
    assert sorted(refused) == sorted(k for i, k in enumerate(items) if i % 2 == 1)
    names = [tier.physical(k) for k in items]
    assert sum(redis_client.exists(k) for k in names) == n - len(refused)
    assert tier.size_bytes() == sum(len(k) + 10 for i, k in enumerate(items) if i % 2 == 0)
    # Deletes ride along (a placement's demotions), in the same bounded calls.
    deleted = [k for i, k in enumerate(items) if i % 2 == 0]
    assert tier.put_checked({}, deleted, {}) == []
    assert tier.size_bytes() == 0 and not any(redis_client.exists(tier.physical(k)) for k in deleted)
    tier.close()
