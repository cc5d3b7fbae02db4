"""benchmarks.streams.pairs_stream: labelled pairs -> a query stream (pure logic, no encoder)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.streams import pairs_stream, read_pairs, write_pairs_within

# a paraphrase chain (A~B, B~C), a trap on A (A vs N), a trap sharing its anchor with a paraphrase
# (D~E, D vs F) and a text that is a trap's target and a paraphrase's anchor (G vs H, H~I)
PAIRS = [
    ("A", "B", 1),
    ("B", "C", 1),
    ("A", "N", 0),
    ("D", "E", 1),
    ("D", "F", 0),
    ("G", "H", 0),
    ("H", "I", 1),
]


def _position(rows: list[dict]) -> dict[str, int]:
    return {row["text"]: i for i, row in enumerate(rows)}


def test_each_text_once_and_t_is_the_position() -> None:
    rows = pairs_stream(PAIRS, seed=0)
    texts = [row["text"] for row in rows]
    assert sorted(texts) == sorted({t for a, b, _ in PAIRS for t in (a, b)})
    assert [row["t"] for row in rows] == list(range(len(rows)))


def test_groups_are_the_components_of_the_positive_pairs() -> None:
    rows = pairs_stream(PAIRS, seed=0)
    group = {row["text"]: row["intent"] for row in rows}
    assert group["A"] == group["B"] == group["C"]  # transitively, through B
    assert group["D"] == group["E"] and group["H"] == group["I"]
    # every trap partner and every unpaired text stands alone
    assert len({group[t] for t in ("A", "N", "D", "F", "G", "H")}) == 6


def test_every_pair_anchor_comes_before_its_partner() -> None:
    for seed in range(20):
        where = _position(pairs_stream(PAIRS, seed=seed))
        for a, b, _ in PAIRS:
            assert where[a] < where[b], (seed, a, b)  # so b (a trap's target too) may hit a's answer


def test_deterministic_with_the_seed_and_shuffled_across_seeds() -> None:
    assert pairs_stream(PAIRS, seed=3) == pairs_stream(PAIRS, seed=3)
    orders = {tuple(row["text"] for row in pairs_stream(PAIRS, seed=s)) for s in range(20)}
    assert len(orders) > 1


def test_group_ids_are_opaque() -> None:
    pairs = [("oos question", "oos other # hash", 1), ("cancel my card", "don't cancel my card", 0)]
    rows = pairs_stream(pairs, seed=0)
    ids = [row["intent"] for row in rows]
    # numbered in stream order: no text, no "#" (the stand-in answer's separator), no "oos" prefix
    assert sorted(set(ids)) == ["g0", "g1", "g2"] and ids[0] == "g0"


def test_a_cycle_of_pairs_still_yields_each_text_once() -> None:
    rows = pairs_stream([("A", "B", 1), ("B", "A", 1), ("C", "D", 0)], seed=1)
    assert sorted(row["text"] for row in rows) == ["A", "B", "C", "D"]
    where = _position(rows)
    assert where["C"] < where["D"]


def test_read_pairs_ignores_other_columns_and_blank_rows(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text(
        "id,category,text_a,text_b,label\n"
        "1,negation,Lock my card,Unlock my card,0\n"
        "5,near_repeat,Pay now,  Pay now  ,1\n"
        "2,paraphrase,,empty,1\n"
        "3,near_repeat,same,same,1\n"
        "4,paraphrase,How do I pay?,How can I pay?,1\n",
        encoding="utf-8",
    )
    assert read_pairs(path) == [
        ("Lock my card", "Unlock my card", 0),
        ("Pay now", "  Pay now  ", 1),  # kept as written: padding is what that pair tests
        ("How do I pay?", "How can I pay?", 1),
    ]


def test_pairs_within_keeps_only_rows_whose_two_intents_are_listed(tmp_path: Path) -> None:
    source = tmp_path / "pairs.csv"
    source.write_text("text_a,text_b,intent_a,intent_b,label\n"
                      "a,b,x,x,1\n"   # both tune: kept
                      "c,d,x,y,0\n"   # one held out: dropped (it would leak a held-out intent)
                      "e,f,y,y,1\n", encoding="utf-8")
    out = write_pairs_within(source, {"x"}, tmp_path / "out" / "tune.csv")
    assert out.read_text(encoding="utf-8").splitlines() == ["text_a,text_b,intent_a,intent_b,label", "a,b,x,x,1"]


def test_trap_pairs_mark_their_groups_as_different_and_nothing_else() -> None:
    rows = {r["text"]: r for r in pairs_stream(PAIRS, seed=3)}
    group = {text: row["intent"] for text, row in rows.items()}
    assert rows["N"]["differs_from"] == [group["A"]]  # the trap A vs N, lifted to A's group
    assert group["N"] in rows["B"]["differs_from"]  # B is in A's group: the trap speaks for it too
    assert rows["G"]["differs_from"] == [group["H"]] and group["G"] in rows["I"]["differs_from"]
    assert rows["E"]["differs_from"] == [group["F"]]
    assert all(group["F"] not in rows[t]["differs_from"] for t in "ABCGHIN")  # never paired: unjudged


def test_replay_leaves_unjudged_hits_out_of_precision() -> None:
    from benchmarks.semantic_stream import System, replay

    # query 0 stored; 1 hits it rightly (same group), 2 wrongly (a labelled trap), 3 across
    # groups the labels never compared (unjudged), 4 misses.
    texts, intents = ["a", "b", "c", "d", "e"], ["g0", "g0", "g1", "g2", "g3"]
    judged = [frozenset({"g1"}), frozenset({"g1"}), frozenset({"g0"}), frozenset(), frozenset()]
    stored: dict[int, str] = {}

    def lookup(i: int) -> tuple[str, str | None]:
        return ("hit", stored[0]) if i in (1, 2, 3) else ("miss", None)

    def fake() -> System:
        system = System()
        system.name, system.lookup, system.entries = "fake", lookup, lambda: len(stored)
        system.store = lambda i, a: stored.__setitem__(i, a)
        return system

    out = replay(fake(), texts, intents, "per-query", judged)
    assert (out["hits"], out["correct_hits"], out["wrong_hits"], out["unjudged_hits"]) == (3, 1, 1, 1)
    assert out["precision"] == 0.5 and out["paraphrase_precision"] == 0.5
    plain = replay(fake(), texts, intents, "per-query")
    assert (plain["wrong_hits"], plain["unjudged_hits"]) == (2, 0)  # an intent stream: every miss-match is wrong
