from collections import Counter

from deployments.routing import prefix_key, rendezvous_order


def _body(system: str, question: str) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}


def test_prefix_key_ignores_the_last_user_turn_but_not_tenant_or_system() -> None:
    a = prefix_key((_body("S1", "q1"), "t"))
    assert a == prefix_key((_body("S1", "another question"), "t"))
    assert a != prefix_key((_body("S2", "q1"), "t"))
    assert a != prefix_key((_body("S1", "q1"), "other-tenant"))
    assert prefix_key(("not a body",)) is None


def test_rendezvous_is_stable_and_moves_little_when_a_replica_goes() -> None:
    replicas = ["r1", "r2", "r3"]
    keys = [f"prefix-{i}" for i in range(600)]
    home = {k: rendezvous_order(k, replicas)[0] for k in keys}
    assert home == {k: rendezvous_order(k, list(reversed(replicas)))[0] for k in keys}
    counts = Counter(home.values())
    assert min(counts.values()) > 150  # spread roughly evenly
    after = {k: rendezvous_order(k, ["r1", "r2"])[0] for k in keys}
    moved = [k for k in keys if home[k] != after[k]]
    assert all(home[k] == "r3" for k in moved)  # only r3's prefixes move
