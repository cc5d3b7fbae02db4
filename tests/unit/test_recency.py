"""The SSD tier's least-recently-read order (caches/recency.py): coldest first, and bounded memory
when the SSD never goes over budget (reads push heap entries; only pops took them out)."""

from __future__ import annotations

from caches.recency import COMPACT_SLACK, RecencyOrder


def test_coldest_are_the_least_recently_read() -> None:
    order = RecencyOrder(["old"])
    order.added(["a", "b", "c"])
    order.touched(["a"])
    sizes = {"old": 1, "a": 1, "b": 1, "c": 1}
    assert order.coldest(2, sizes.get, 0) == ["old", "b"]
    assert order.coldest(1, sizes.get, 0) == ["c"]


def test_reads_of_an_ssd_that_stays_under_budget_do_not_grow_memory() -> None:
    order = RecencyOrder()
    keys = [f"k{i}" for i in range(50)]
    order.added(keys)
    for _ in range(200):  # 10,000 reads; the heap held one entry per read before
        order.touched(keys)
    assert len(order) == 50 and order.heap_size() <= 2 * 50 + COMPACT_SLACK + len(keys)
    order.forget(keys)  # invalidated everywhere: not ordered any more
    order.touched(keys)
    assert len(order) == 0 and order.heap_size() <= COMPACT_SLACK + len(keys)


def test_a_forgotten_key_is_never_returned_as_coldest() -> None:
    order = RecencyOrder()
    order.added(["a", "b"])
    order.forget(["a"])
    assert order.coldest(10, lambda k: 1, 0) == ["b"]
