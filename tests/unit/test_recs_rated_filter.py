"""The rated filter of the fallback list when Redis may not be asked (the answer deadline is spent,
e.g. a slow Redis): items the user rated through events must still be left out (pure logic: the
Recommender's methods on a bare object, an in-memory model stand-in, no Ray or Redis)."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from deployments.recommender import RecommenderDeployment
from deployments.recommender_keys import RatedMemo

Recommender = RecommenderDeployment.func_or_class

POPULAR = [(item, 1.0 - rank / 10) for rank, item in enumerate([50, 40, 30, 20, 10, 5, 4, 3, 2, 1])]


class NoRedis:
    def smembers(self, key: str) -> set[bytes]:
        raise AssertionError("the deadline is spent: Redis must not be asked")


class NoQueue:
    def items_of(self, user_id: int) -> set[int]:
        return set()


def recommender() -> Any:
    rec = object.__new__(Recommender)
    rec.redis, rec.journal, rec.rated_memo, rec.replica = NoRedis(), NoQueue(), RatedMemo(), "r1"
    rec._stop = threading.Event()  # what __del__ sets (no watcher runs here)
    return rec


def model() -> Any:
    return SimpleNamespace(rated={7: {50}}, popular=POPULAR, version="v1", keys=None)


def test_the_fallback_after_the_deadline_leaves_out_what_an_event_rated() -> None:
    rec, m = recommender(), model()
    # earlier on this replica: the user's Redis set was read (item 40), an event rated item 30
    rec._seen(m, 7, rated_since={b"40"})
    rec.rated_memo.add(7, [30])
    out = rec._fallback(m, 7, 3, "the answer was not ready in time", ask_redis=False)
    assert [i["item_id"] for i in out["items"]] == [20, 10, 5]  # 50: pipeline; 40, 30: events
    assert out["degraded"] and out["fallback"]["kind"] == "popular"


def test_the_fallback_still_gives_k_items_to_a_user_who_rated_most_popular_ones() -> None:
    rec, m = recommender(), model()
    rec.rated_memo.add(7, [40, 30, 20, 10, 5, 4])
    assert [i["item_id"] for i in rec._fallback(m, 7, 3, "why", ask_redis=False)["items"]] == [3, 2, 1]


def test_the_memo_is_bounded_and_forgets_the_least_recently_seen_user() -> None:
    memo = RatedMemo(max_users=2)
    memo.add(1, [10])
    memo.add(2, [20])
    memo.add(1, [11])  # user 1 seen again: user 2 is now the oldest
    memo.add(3, [30])
    assert memo.get(1) == {10, 11} and memo.get(2) == frozenset() and memo.get(3) == {30}
