"""A semantic hit's `created` (its Age, and what max-age checks) comes from the same metadata
snapshot as its answer, not from a second read that may find the entry dropped by then."""

from __future__ import annotations

from types import SimpleNamespace

from caches.semantic import SemanticCache
from caches.semantic.decision import Candidate


def test_a_hit_keeps_the_age_of_its_answer_after_the_mirror_dropped_the_entry() -> None:
    hour_ago = 1_000_000.0
    candidate = Candidate(7, 0.97, "What is 2+2?", "4", created=hour_ago)
    mirror_without_it = SimpleNamespace(meta={})  # the sync thread removed the entry meanwhile
    hit = SemanticCache._as_hit(SimpleNamespace(), mirror_without_it, candidate)  # type: ignore[arg-type]
    assert hit.created == hour_ago and hit.response == "4"  # not "now": Age 0 would pass any max-age
