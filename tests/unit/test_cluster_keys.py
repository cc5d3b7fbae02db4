"""Key naming for Redis Cluster (pure): every key one script touches hashes to one slot."""

from __future__ import annotations

from redis.crc import key_slot

from caches.budget import ledger_keys, tenant_keys
from caches.keys import safe_part, tenant_namespace
from caches.redis_client import is_cluster_url, node_url
from caches.result import ResultCache
from caches.semantic.store import BUDGET_PREFIX, entry_key, rank_key
from tests.support import chat_key, scope


def slots(*keys: str) -> set[int]:
    return {key_slot(k.encode()) for k in keys}


def test_cluster_urls() -> None:
    assert is_cluster_url("redis+cluster://10.0.0.1:7000") and is_cluster_url("rediss+cluster://h:7000")
    assert not is_cluster_url("redis://127.0.0.1:6379/0")
    assert node_url("redis+cluster://h:7000") == "redis://h:7000"
    assert node_url("redis://h:6379/0") == "redis://h:6379/0"


def test_the_tenant_is_the_hash_tag_and_cannot_move_it() -> None:
    assert tenant_namespace("res", "acme") == "res.{acme}"
    assert "{" not in safe_part("a{b}") and "}" not in safe_part("a{b}")
    assert safe_part("a{b}") != safe_part("ab")


def test_a_result_put_and_get_touch_one_slot() -> None:
    key = chat_key(tenant="acme", model="m", version="1", request={"messages": [], "temperature": 0})
    books = tenant_keys(ResultCache.NAMESPACE + ".__meta", "acme")
    stats = f"{ResultCache.NAMESPACE}.__meta.{{acme}}:stats"
    assert len(slots(key, *books, stats)) == 1
    assert len(slots(*ledger_keys("res.__meta"))) == 1  # the global ledger: a slot of its own


def test_a_semantic_store_touches_one_slot_across_the_tenants_scopes() -> None:
    one, other = scope(tenant="acme", context="a"), scope(tenant="acme", context="b")
    keys = [entry_key(one, 1), f"{one}:lfu", f"{one}:bytes", entry_key(other, 2), f"{other}:lfu",
            rank_key(one), *tenant_keys(BUDGET_PREFIX, "acme")]
    assert len(slots(*keys)) == 1
    # tenants spread over slots (so over the masters)
    tenants = [f"t{i}" for i in range(50)]
    assert len(slots(*(entry_key(scope(tenant=t), 1) for t in tenants))) > 40


def test_the_recommenders_keys_are_unchanged_on_one_server() -> None:
    from deployments.recommender_keys import RecsKeys

    keys = RecsKeys(cluster=False, counter_name=lambda counter: counter)  # RedisTier on one server
    assert (keys.generation(7), keys.unknown("v1", 7), keys.rated(7)) == (
        "tierserve:recs:gen:7", "tierserve:recs:unknown:v1:7", "tierserve:recs:rated:7")
    assert (keys.pending, keys.audit) == ("tierserve:recs:pending-invalidations", "tierserve:recs:events")
    assert RecsKeys(cluster=False).generation(7) == "tierserve:recs:gen:7"  # feast-only


def test_the_recommenders_multi_key_commands_touch_one_slot_on_a_cluster() -> None:
    from deployments.recommender_keys import RecsKeys, audited_keys

    def counter_name(counter: str) -> str:  # RedisTier.counter_name's shape: the group's tag first
        return "{tierserve:tier:features-user_features:redis#" + str(len(counter) % 8) + "}" + counter

    for keys in (RecsKeys(cluster=True, counter_name=counter_name), RecsKeys(cluster=True)):
        for user in (1, 42, 10**9 + 7):
            assert len(slots(keys.generation(user), keys.unknown("v1", user))) == 1  # the request's MGET
        assert len(slots(keys.pending, keys.audit, *audited_keys(True))) == 1  # an event's MULTI
    tagged = RecsKeys(cluster=True, counter_name=counter_name)
    assert tagged.generation(5) == counter_name("tierserve:recs:gen:5")  # the very counter the tier checks
    assert RecsKeys(cluster=True).generation(5) != RecsKeys(cluster=True).generation(6)
    assert len(slots(*(RecsKeys(cluster=True).generation(u) for u in range(50)))) > 1  # users spread


def test_a_restart_is_a_known_servers_run_id_changing() -> None:
    from caches.redis_client import restarted

    before = {"a:1": "r1", "b:2": "r2"}
    assert restarted(before, before) == []
    assert restarted({}, before) == []  # the first look: nothing to compare with
    assert restarted(before, {"a:1": "r1", "b:2": "r9"}) == ["b:2"]
    assert restarted(before, {"a:1": "r1", "c:3": "r3"}) == []  # a new primary (failover, growth) kept its data
