"""The fault matrix's pure parts (benchmarks/fault_checks.py): staleness, lost writes, windows,
budgets and the table."""

from __future__ import annotations

import pytest

from benchmarks.fault_checks import (
    FRESH,
    STALE_ANNOUNCED,
    STALE_FEATURES,
    STALE_RATED_ITEM,
    UNCHECKED,
    AcceptedEvent,
    RecsAnswer,
    Window,
    classify,
    final_reads,
    freshness,
    lost_writes,
    markdown,
    redis_budget,
)


def answer(user: int = 1, sent_at: float = 10.0, status: int = 200, n: int | None = 5,
           items: tuple[int, ...] = (100, 101)) -> RecsAnswer:
    body: dict = {"items": [{"item_id": i, "score": 0.5} for i in items]}
    if n is not None:
        body["user_activity"] = {"n_ratings": n, "last_ts": 0}
    return RecsAnswer(user, sent_at, status, body)


EVENT = AcceptedEvent(user_id=1, item_id=7, n_ratings=5, received_at=9.0)


def test_an_answer_sent_after_the_event_with_its_row_is_fresh() -> None:
    assert classify(answer(n=5), [EVENT]) == FRESH
    assert classify(answer(n=6), [EVENT]) == FRESH  # a later event moved it further


def test_an_answer_behind_the_event_row_is_stale() -> None:
    assert classify(answer(n=4), [EVENT]) == STALE_FEATURES


def test_recommending_an_item_rated_in_an_accepted_event_is_stale() -> None:
    assert classify(answer(n=5, items=(7, 100)), [EVENT]) == STALE_RATED_ITEM


def test_staleness_the_event_answer_announced_is_counted_apart() -> None:
    pending = AcceptedEvent(user_id=1, item_id=7, n_ratings=5, received_at=9.0, pending=True)
    assert classify(answer(n=4), [pending]) == STALE_ANNOUNCED
    assert classify(answer(n=5), [pending]) == FRESH


def test_a_queued_event_announces_that_answers_do_not_show_it_yet() -> None:
    queued = AcceptedEvent(user_id=1, item_id=7, n_ratings=None, received_at=9.0, queued=True)
    assert classify(answer(n=4, items=(7, 100)), [queued]) == STALE_ANNOUNCED  # its item, not yet applied
    assert classify(answer(n=4), [queued]) == FRESH  # no applied event sets a bar
    # an applied event still sets its bar, queued ones beside it or not
    assert classify(answer(n=4), [queued, EVENT]) == STALE_FEATURES
    assert classify(answer(n=5, items=(7,)), [queued, EVENT]) == STALE_RATED_ITEM


def test_final_reads_must_show_the_row_feast_ends_with() -> None:
    queued = AcceptedEvent(user_id=1, item_id=7, n_ratings=None, received_at=9.0, queued=True)
    ok = {"items": [{"item_id": 100}], "user_activity": {"n_ratings": 6}}
    assert final_reads({1: ok}, {1: 6}, [queued]) == {"checked": 1, "stale": 0, "samples": []}
    behind = final_reads({1: {**ok, "user_activity": {"n_ratings": 5}}}, {1: 6}, [queued])
    assert behind["stale"] == 1 and behind["samples"][0]["feast_n_ratings"] == 6
    assert final_reads({1: {**ok, "items": [{"item_id": 7}]}}, {1: 6}, [queued])["stale"] == 1
    assert final_reads({2: ok}, {2: 1}, [queued])["checked"] == 0  # not an event user


def test_answers_racing_or_before_the_event_are_not_judged() -> None:
    assert classify(answer(sent_at=8.9, n=4), [EVENT]) == UNCHECKED
    assert classify(answer(n=4), [AcceptedEvent(2, 7, 5, 1.0)]) == UNCHECKED  # another user's event


def test_refusals_and_cold_starts_are_not_judged() -> None:
    assert classify(answer(status=503, n=None, items=()), [EVENT]) == UNCHECKED
    assert classify(answer(n=None, items=(100,)), [EVENT]) == UNCHECKED


def test_the_newest_event_before_the_request_sets_the_bar() -> None:
    events = [EVENT, AcceptedEvent(1, 8, 6, 9.5), AcceptedEvent(1, 9, 7, 11.0)]
    assert classify(answer(n=5), events) == STALE_FEATURES  # the 9.5 event said 6
    assert classify(answer(n=6), events) == FRESH  # the 11.0 event came after the request left


def test_freshness_counts_and_samples() -> None:
    out = freshness([answer(n=5), answer(n=4), answer(n=5, items=(7,)), answer(user=3)], [EVENT], t0=0.0)
    assert out.counts == {FRESH: 1, STALE_FEATURES: 1, STALE_RATED_ITEM: 1, STALE_ANNOUNCED: 0, UNCHECKED: 1}
    assert out.stale == 2
    assert [s["verdict"] for s in out.samples] == [STALE_FEATURES, STALE_RATED_ITEM]
    assert out.samples[0]["event_n_ratings"] == 5 and out.samples[0]["answer_n_ratings"] == 4


def test_lost_and_phantom_writes() -> None:
    lost, phantom, detail = lost_writes({1: 10, 2: 3, 3: None}, {1: 12, 2: 3, 3: 2}, {1: 2, 2: 1, 3: 1})
    assert (lost, phantom) == (1, 1)  # user 2's accepted rating is missing; user 3 got one unanswered
    assert detail == {2: {"before": 3, "after": 3, "accepted": 1}, 3: {"before": 0, "after": 2, "accepted": 1}}
    assert lost_writes({1: 1}, {1: 1}, {}) == (0, 0, {})


def test_window() -> None:
    w = Window(0.2, 0.5)
    assert w.seconds(300) == (60.0, 150.0)
    assert w.kill_times(300, 2) == [60.0, 150.0]
    assert w.kill_times(300, 1) == [60.0]
    assert w.kill_times(100, 3) == pytest.approx([20.0, 35.0, 50.0])
    for bad in ((0.5, 0.5), (-0.1, 0.5), (0.2, 1.1)):
        with pytest.raises(ValueError):
            Window(*bad)


def test_redis_budget_reads_what_the_settings_have() -> None:
    budget = redis_budget({"cache": {"result_max_bytes": 100, "semantic_max_bytes": 200},
                           "recommender": {"ram_budget_bytes": 40, "result_max_bytes": 0}})
    assert budget == {"cache.result_max_bytes": 100, "cache.semantic_max_bytes": 200,
                      "recommender.ram_budget_bytes": 50, "total": 350}


def test_markdown_table() -> None:
    row = {"fault": "redis_slow", "elapsed_s": 300.0,
           "requests": {"sent": 900, "2xx": 890, "fallback": 12, "transport_errors": 0,
                        "5xx": {"total": 10, "500": 1, "503": 9, "other": 0}},
           "events": {"accepted": 250, "queued": 40, "refused": 30}, "stale": {"stale": 0, "checked": 400},
           "final_reads": {"stale": 0, "checked": 24}, "writes": {"lost": 0, "phantom": 0},
           "memory": {"redis_peak_bytes": 12 << 20, "redis_budget_bytes": 400 << 20,
                      "replica_rss_peak_bytes": 6000 << 20, "replica_rss_before_bytes": None}}
    text = markdown([row])
    lines = text.splitlines()
    assert len(lines) == 3 and lines[0].startswith("| fault |")
    assert lines[2] == ("| redis_slow | 5.0 | 900 | 890 (12) | 10 (1/9/0) | 0 | 250 (40) / 30 | 0 (0) / 400 | 0 / 24 | 0 (0) "
                        "| 12 / 400 | 6000 (n/a) |")
