"""Pure logic of the budgets (caches/budget.py) and of the mirror cap (caches/semantic/mirror.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from caches.budget import Budget, chunks, tenant_of
from caches.semantic.mirror import MIRROR_SCOPE_OVERHEAD, EntryMeta, ScopeIndex, StreamMirror


def test_budget_limits() -> None:
    assert Budget().lua_args() == [-1, -1, -1, -1] and Budget().max_entry_bytes is None
    b = Budget(tenant_entries=5, tenant_bytes=100, global_entries=50, global_bytes=1_000)
    assert b.lua_args() == [5, 100, 50, 1_000]
    assert b.max_entry_bytes == 100
    assert Budget(global_bytes=300).max_entry_bytes == 300
    with pytest.raises(ValueError):
        Budget(tenant_bytes=0)


def test_tenant_of_reads_the_namespace() -> None:
    assert tenant_of("res.acme:m:1:abc") == "acme"
    assert tenant_of("sem.acme.co:m@ff:1:abc:e:7") == "acme.co"
    assert tenant_of("recs.a%3Ab:recs:1:x") == "a%3Ab"
    # the hash-tagged form (Redis Cluster): the braces are not part of the tenant
    assert tenant_of("res.{acme}:m:1:abc") == "acme"
    assert tenant_of("sem.{acme.co}:m@ff:1:abc:e:7") == "acme.co"


def test_chunks() -> None:
    assert list(chunks(range(5), 2)) == [[0, 1], [2, 3], [4]]
    assert list(chunks([], 2)) == []


def _mirror(**kw: object) -> StreamMirror:
    # no Redis: the cap and the sweep work on the mirrors alone
    return StreamMirror(None, 4, None, queue_writes=lambda _: None, on_reset=lambda: None, **kw)  # type: ignore[arg-type]


def _fill(m: StreamMirror, scope: str, ids: list[int], created: float = 0.0) -> ScopeIndex:
    index = ScopeIndex(4)
    vecs = np.eye(4, dtype=np.float32)[[i % 4 for i in ids]]
    index.add(ids, vecs, [EntryMeta("q", "a", created=created or time.time()) for _ in ids])
    return m.register(scope, index)


def test_mirror_cap_drops_least_recently_used_scope_first() -> None:
    m = _mirror(max_entries=6)
    _fill(m, "s1", [1, 2])
    _fill(m, "s2", [3, 4])
    _fill(m, "s3", [5, 6])
    m.get("s1")  # s1 used: s2 is now the least recently used
    _fill(m, "s4", [7, 8])
    assert list(m.scopes) == ["s3", "s1", "s4"] and m.usage.entries == 6


def test_mirror_cap_trims_the_oldest_entries_of_a_scope_alone_over_it() -> None:
    m = _mirror(max_entries=3)
    index = ScopeIndex(4)
    index.add([1, 2, 3, 4, 5], np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0]],
              [EntryMeta("q", "a", created=c) for c in (5, 1, 4, 2, 3)])
    m.register("s", index)
    assert sorted(index.meta) == [1, 3, 5] and m.usage.entries == 3  # the three newest kept


def test_mirror_byte_cap_counts_scopes_too() -> None:
    m = _mirror(max_bytes=3 * MIRROR_SCOPE_OVERHEAD)
    for i in range(10):
        m.register(f"empty{i}", ScopeIndex(4))
    assert len(m.scopes) <= 3 and m.usage.bytes <= 3 * MIRROR_SCOPE_OVERHEAD


def test_sweep_is_bounded_and_walks_every_scope() -> None:
    m = _mirror(ttl_s=10)
    old = time.time() - 20
    _fill(m, "a", list(range(0, 10)), created=old)
    _fill(m, "b", list(range(10, 20)), created=old)
    _fill(m, "c", list(range(20, 25)))  # fresh
    first = m.sweep_expired(limit=4)
    assert first <= 4  # at most `limit` entries examined per sweep
    total = first + sum(m.sweep_expired(limit=4) for _ in range(10))
    assert total == 20 and m.usage.entries == 5 and list(m.scopes) == ["c"]
    assert _mirror().sweep_expired() == 0  # no TTL: nothing to sweep
