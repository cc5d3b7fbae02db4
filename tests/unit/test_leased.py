"""`Leased`: a swapped-out value is closed only when its last in-flight lease ends."""

from __future__ import annotations

import threading

from caches.versions import Leased


class Caches:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False


def test_swap_closes_an_idle_old_value_at_once() -> None:
    closed: list[str] = []
    leased = Leased(Caches("v1"), lambda c: closed.append(c.name))
    old = leased.swap(Caches("v2"))
    assert old.name == "v1" and closed == ["v1"] and leased.current.name == "v2"


def test_old_value_stays_open_until_the_request_using_it_finishes() -> None:
    closed: list[str] = []
    leased = Leased(Caches("v1"), lambda c: closed.append(c.name))
    with leased.lease() as in_flight:
        leased.swap(Caches("v2"))
        assert closed == []  # the request still reads v1's caches
        with leased.lease() as fresh:
            assert fresh.name == "v2"  # new requests get the new value at once
        assert in_flight.name == "v1" and closed == []
    assert closed == ["v1"]


def test_two_swaps_under_one_lease_close_each_retired_value_once() -> None:
    closed: list[str] = []
    leased = Leased(Caches("v1"), lambda c: closed.append(c.name))
    with leased.lease():
        leased.swap(Caches("v2"))  # v2 is idle when replaced: closed right away
        leased.swap(Caches("v3"))
        assert closed == ["v2"]
    assert closed == ["v2", "v1"]


def test_many_threads_leasing_while_swapping_close_everything_retired_exactly_once() -> None:
    closed: list[str] = []
    lock = threading.Lock()

    def close(c: Caches) -> None:
        with lock:
            assert not c.closed
            c.closed = True
            closed.append(c.name)

    leased = Leased(Caches("v0"), close)
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            with leased.lease() as c:
                assert not c.closed  # never handed out, nor closed under, a running request

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(1, 200):
        leased.swap(Caches(f"v{i}"))
    stop.set()
    for t in threads:
        t.join()
    assert sorted(closed, key=lambda n: int(n[1:])) == [f"v{i}" for i in range(199)]


def test_a_failing_close_does_not_fail_the_request_that_ended_last() -> None:
    def boom(_: Caches) -> None:
        raise RuntimeError("close failed")

    leased = Leased(Caches("v1"), boom)
    with leased.lease():
        leased.swap(Caches("v2"))
    assert leased.current.name == "v2"
