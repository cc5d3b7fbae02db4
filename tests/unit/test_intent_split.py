import json
from pathlib import Path

from benchmarks.chat_value import summarise, workload
from benchmarks.intent_split import held_out_queries, split_intents


def test_split_is_fixed_disjoint_and_covers_every_intent() -> None:
    intents = {f"intent_{i}" for i in range(77)}
    tune, held = split_intents(intents)
    assert tune.isdisjoint(held) and tune | held == intents
    assert abs(len(tune) - len(held)) <= 1
    assert split_intents(list(reversed(sorted(intents)))) == (tune, held)  # order-independent


def _stream(tmp_path: Path) -> Path:
    path = tmp_path / "s.jsonl"
    rows = [{"t": i, "text": f"question {i}", "intent": f"intent_{i % 10}"} for i in range(200)]
    # a blank line and a row without fields are skipped, not fatal
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n{}\n")
    return path


def test_held_out_queries_keep_stream_order(tmp_path: Path) -> None:
    queries = held_out_queries(_stream(tmp_path))
    _, held = split_intents({f"intent_{i}" for i in range(10)})
    assert queries and all(intent in held for _, intent in queries)
    assert [int(q.split()[1]) for q, _ in queries] == sorted(int(q.split()[1]) for q, _ in queries)


def test_workload_repeats_only_earlier_questions(tmp_path: Path) -> None:
    items = workload(_stream(tmp_path), 60, repeat_share=0.5)
    assert len(items) == 60
    seen: set[str] = set()
    repeats = 0
    fresh = iter(held_out_queries(_stream(tmp_path)))
    for q, _ in items:
        if q in seen:
            repeats += 1
        else:
            assert (q, _) == next(fresh)  # fresh questions arrive in stream order
        seen.add(q)
    assert 15 < repeats < 45


def test_a_semantic_hit_with_another_intents_answer_is_wrong() -> None:
    records = [
        {"status": 200, "x_cache": "miss", "text": "A", "latency_s": 1.0},
        {"status": 200, "x_cache": "miss", "text": "B", "latency_s": 1.0},
        {"status": 200, "x_cache": "semantic", "text": "A", "latency_s": 0.1},  # right: A answered x
        {"status": 200, "x_cache": "semantic", "text": "B", "latency_s": 0.1},  # wrong: B answered y
        {"status": 200, "x_cache": "semantic", "text": "C", "latency_s": 0.1},  # unknown source
        {"status": 503, "x_cache": "none", "text": None, "latency_s": 0.1},
    ]
    out = summarise(records, ["x", "y", "x", "x", "x", "x"], wall_s=2.0, engine_classes={"miss"})
    assert out["wrong_answers"] == 1 and out["semantic_hits_of_unknown_source"] == 1
    assert out["errors"] == 1 and out["engine_s_per_1000"] == 2.0 / 6 * 1000
