"""Longest-cached-prefix routing (caches.prefix_affinity): pure logic, no Ray."""

from collections import Counter

from caches.prefix_affinity import (
    PrefixTable,
    chain_of_call,
    choose_home,
    overloaded,
    prefix_chain,
    rendezvous_order,
)

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
DOC = "Here is my contract. " + "Clause: the tenant pays on the first of the month. " * 20


def _conversation(turns: int, first: str = DOC) -> list[list[dict]]:
    """The message lists of a conversation's turns 1..turns (each ends with a user message)."""
    messages = [SYSTEM, {"role": "user", "content": first}]
    out = [list(messages)]
    for t in range(1, turns):
        messages += [{"role": "assistant", "content": f"answer {t}"}, {"role": "user", "content": f"follow-up {t}?"}]
        out.append(list(messages))
    return out


def test_chain_is_cumulative_and_tenant_salted() -> None:
    a = prefix_chain("acme", [SYSTEM, {"role": "user", "content": "q"}])
    b = prefix_chain("acme", [SYSTEM, {"role": "user", "content": "other"}])
    c = prefix_chain("globex", [SYSTEM, {"role": "user", "content": "q"}])
    assert a is not None and b is not None and c is not None
    assert a.hashes[0] == b.hashes[0] and a.hashes[1] != b.hashes[1]
    assert a.hashes[0] != c.hashes[0]  # another tenant's warm replica is no help (cache_salt)
    assert a.root == 1 and a.lengths[0] < a.lengths[1] == a.total
    # role is part of the hash: the same text as a system or a user message is another prompt
    assert prefix_chain("t", [{"role": "user", "content": "x"}]).hashes != prefix_chain(
        "t", [{"role": "system", "content": "x"}]).hashes


def test_chain_of_call_reads_llm_call_arguments_only() -> None:
    assert chain_of_call(({"messages": [SYSTEM]}, "t")) is not None
    assert chain_of_call(("not a body", "t")) is None
    assert chain_of_call(({"messages": []}, "t")) is None
    assert chain_of_call(({"prompt": "x"}, "t")) is None
    assert chain_of_call(({"messages": [SYSTEM]},)) is None


def test_every_turn_of_a_conversation_follows_its_first_turn() -> None:
    replicas = ["r1", "r2"]
    for c in range(20):
        table = PrefixTable()
        homes = []
        for messages in _conversation(5, first=f"{DOC} conversation {c}"):
            chain = prefix_chain("acme", messages)
            home, why = choose_home(chain, table, replicas)
            table.record(chain, home)
            homes.append((home, why))
        assert len({h for h, _ in homes}) == 1, homes
        assert [why for _, why in homes] == ["root"] + ["prefix"] * 4


def test_without_the_table_a_conversation_still_has_one_home() -> None:
    # A turn arriving through another Ingress replica (an empty table) goes where turn 1 went.
    replicas = ["r1", "r2", "r3"]
    turns = _conversation(4)
    homes = {choose_home(prefix_chain("acme", m), PrefixTable(), replicas)[0] for m in turns}
    assert len(homes) == 1


def test_conversations_spread_when_they_share_only_a_short_system_prompt() -> None:
    replicas = ["r1", "r2"]
    table = PrefixTable()
    homes = Counter()
    for c in range(200):
        chain = prefix_chain("acme", [SYSTEM, {"role": "user", "content": f"question {c} " * 10}])
        home, why = choose_home(chain, table, replicas)
        table.record(chain, home)
        homes[home] += 1
        assert why == "root"  # the system prompt alone covers too little of the prompt
    assert min(homes.values()) > 60


def test_a_long_shared_system_prompt_keeps_its_home() -> None:
    system = {"role": "system", "content": "Rules of the billing desk. " * 60}
    table = PrefixTable()
    first = prefix_chain("acme", [system, {"role": "user", "content": "q0?"}])
    home, _ = choose_home(first, table, ["r1", "r2"])
    table.record(first, home)
    for q in range(1, 30):
        chain = prefix_chain("acme", [system, {"role": "user", "content": f"q{q}?"}])
        assert choose_home(chain, table, ["r1", "r2"]) == (home, "prefix")


def test_a_moved_conversation_is_followed_and_dead_replicas_forgotten() -> None:
    table = PrefixTable()
    turns = _conversation(3)
    first = prefix_chain("acme", turns[0])
    table.record(first, "r2")  # e.g. the load escape sent turn 1 to r2, whatever the root says
    assert choose_home(prefix_chain("acme", turns[1]), table, ["r1", "r2"]) == ("r2", "prefix")
    table.forget_replica("r2")
    assert len(table) == 0
    assert choose_home(prefix_chain("acme", turns[1]), table, ["r1"])[1] == "root"
    # a replica not among the candidates (gone) is not chosen even if the table still names it
    table.record(first, "r9")
    assert choose_home(prefix_chain("acme", turns[1]), table, ["r1", "r2"])[1] == "root"


def test_table_is_bounded_lru() -> None:
    table = PrefixTable(max_entries=10)
    for c in range(11):
        table.record(prefix_chain("t", [{"role": "user", "content": f"q{c}"}]), "r1")
    assert len(table) == 10  # q0, the least recently used, is gone
    old = prefix_chain("t", [{"role": "user", "content": "q0"}])
    assert table.longest(old, {"r1"}) is None


def test_overload_escape() -> None:
    assert not overloaded(5, [1, 5], threshold=4)
    assert overloaded(6, [1, 6], threshold=4)
    assert not overloaded(None, [0, 9])
    assert not overloaded(3, [])


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
