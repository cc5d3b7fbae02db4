"""The semantic cache's decision rules, without Redis: guard, cacheability, voting, scopes."""

from __future__ import annotations

import redis

from caches.semantic import (
    VOTE_FLOOR,
    VOTE_MARGIN,
    SemanticCache,
    _Candidate,
    is_cacheable,
    trap_guard,
    wilson_upper,
)


def test_is_cacheable() -> None:
    assert is_cacheable({})
    assert is_cacheable({"temperature": 0})
    assert is_cacheable({"temperature": 0.0, "top_p": 0.9})
    assert not is_cacheable({"temperature": 0.7})
    assert is_cacheable({"temperature": 0.7}, allow_nondeterministic=True)


def test_trap_guard_catches_minimal_edits() -> None:
    traps = [
        ("Cancel my subscription", "Don't cancel my subscription", "negation"),
        ("How do I lock my card?", "How do I unlock my card?", "opposite"),
        ("How much is a call-out at 2pm?", "How much is a call-out at 2am?", "number"),
        ("Is the deposit refundable?", "Is the deposit non-refundable?", "negation"),
        (
            "Which appliances use the most electricity?",
            "Which appliances use the least electricity?",
            "opposite",
        ),
        ("How do I reset my Gmail password?", "How do I reset my Outlook password?", "substitution"),
        (
            "Transfer £50 from my savings to my current account",
            "Transfer £50 from my current account to my savings",
            "swap",
        ),
    ]
    for a, b, why in traps:
        assert trap_guard(a, b) == why, (a, b)


def test_trap_guard_lets_paraphrases_through() -> None:
    for a, b in [
        ("Where do I send my meter reading?", "   Where do I send my meter reading?   "),
        ("How do I fix a dripping tap?", "okay so how do i fix a dripping tap"),
        ("Do you deliver on weekends?", "Do you deliver on weekends please?"),
        ("What does the refund process involve?", "What does the refunds process involve?"),
        ("My card has not arrived yet", "Where is my new card, it still hasn't come"),
    ]:
        assert trap_guard(a, b) is None, (a, b)


def test_wilson_upper() -> None:
    assert wilson_upper(0, 0) == 1.0
    assert 0 < wilson_upper(0, 300) < 0.01
    assert wilson_upper(5, 100) > 0.05


def test_scope_separates_everything_but_the_question() -> None:
    base = dict(tenant="a", model="m", version="1", system_prompt="be brief", params={"temperature": 0})
    s = SemanticCache.scope(**base)
    assert s.startswith("sem.a:m:1:")
    for change in (
        {"tenant": "b"},
        {"model": "m2"},
        {"version": "2"},
        {"system_prompt": "be verbose"},
        {"params": {"temperature": 0, "max_tokens": 10}},
    ):
        assert SemanticCache.scope(**{**base, **change}) != s
    assert SemanticCache.scope(**{**base, "system_prompt": "Be  brief"}) != s  # text as written


def _cand(sim: float, response: str, query: str = "q", tau: float = -1.0, i: int = 0) -> _Candidate:
    return _Candidate(entry_id=i, similarity=sim, query=query, response=response, tau=tau)


def test_vote_rules() -> None:
    cache = SemanticCache(redis.Redis(host="127.0.0.1", port=1), threshold=0.92, mode="adaptive")
    floor = VOTE_FLOOR
    # below a near-duplicate similarity two agreeing neighbours are needed
    assert cache._vote([_cand(0.85, "A")], "q", floor) is None
    assert cache._vote([_cand(0.85, "A"), _cand(0.80, "A")], "q", floor) is not None
    # a disagreeing neighbour within the margin vetoes, even above the static threshold
    assert cache._vote([_cand(0.95, "A"), _cand(0.95 - VOTE_MARGIN / 2, "B")], "q", floor) is None
    # one outside the margin does not
    assert cache._vote([_cand(0.99, "A"), _cand(0.99 - 2 * VOTE_MARGIN, "B")], "q", floor) is not None
    assert cache._vote([_cand(0.95, "A")], "q", floor) is None  # alone and not a near-duplicate
    # below the floor nothing is answered
    assert cache._vote([_cand(floor - 0.01, "A"), _cand(floor - 0.02, "A")], "q", floor) is None
    # a learned per-entry threshold above the similarity vetoes
    assert cache._vote([_cand(0.95, "A", tau=0.96)], "q", floor) is None
    # the trap guard vetoes
    assert (
        cache._vote([_cand(0.97, "A", query="How do I unlock my card?")], "How do I lock my card?", floor)
        is None
    )


def test_static_rule() -> None:
    cache = SemanticCache(redis.Redis(host="127.0.0.1", port=1), threshold=0.9, mode="static")
    assert cache._static(_cand(0.91, "A"), "q") is not None
    assert cache._static(_cand(0.89, "A"), "q") is None
    assert (
        cache._static(_cand(0.99, "A", query="Cancel my subscription"), "Don't cancel my subscription")
        is None
    )
