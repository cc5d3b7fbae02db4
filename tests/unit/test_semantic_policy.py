"""The semantic cache's decision rules, without Redis: guard, cacheability, voting, scopes."""

from __future__ import annotations

from caches.semantic import (
    VOTE_FLOOR,
    VOTE_MARGIN,
    AdaptivePolicy,
    Candidate,
    FloorBand,
    PendingLookup,
    PendingLookups,
    StaticPolicy,
    trap_guard,
    wilson_upper,
)
from caches.semantic.decision import FLOOR_MIN_OBS, FLOOR_STEP


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


def _cand(sim: float, response: str, query: str = "q", tau: float = -1.0, i: int = 0) -> Candidate:
    return Candidate(entry_id=i, similarity=sim, query=query, response=response, tau=tau)


def _hit(policy: AdaptivePolicy | StaticPolicy, candidates: list[Candidate], query: str, floor: float):
    return policy.decide(candidates, query, floor).hit


def test_vote_rules() -> None:
    policy = AdaptivePolicy(threshold=0.92, guard=trap_guard)
    floor = VOTE_FLOOR
    # below a near-duplicate similarity two agreeing neighbours are needed
    assert policy.decide([_cand(0.85, "A")], "q", floor).reject == "vote"
    assert _hit(policy, [_cand(0.85, "A"), _cand(0.80, "A")], "q", floor) is not None
    # a disagreeing neighbour within the margin vetoes, even above the static threshold
    assert _hit(policy, [_cand(0.95, "A"), _cand(0.95 - VOTE_MARGIN / 2, "B")], "q", floor) is None
    # one outside the margin does not
    assert _hit(policy, [_cand(0.99, "A"), _cand(0.99 - 2 * VOTE_MARGIN, "B")], "q", floor) is not None
    assert _hit(policy, [_cand(0.95, "A")], "q", floor) is None  # alone and not a near-duplicate
    # below the floor nothing is answered, and that is a plain miss (no rejection counted)
    below = policy.decide([_cand(floor - 0.01, "A"), _cand(floor - 0.02, "A")], "q", floor)
    assert below.hit is None and below.reject is None
    # a learned per-entry threshold above the similarity vetoes
    assert policy.decide([_cand(0.95, "A", tau=0.96)], "q", floor).reject == "tau"
    # the trap guard vetoes
    trap = policy.decide(
        [_cand(0.97, "A", query="How do I unlock my card?")], "How do I lock my card?", floor
    )
    assert trap.hit is None and trap.reject == "guard"
    # without a guard the same pair is a hit (the guard is the only thing that stopped it)
    assert _hit(AdaptivePolicy(threshold=0.92), [_cand(0.99, "A", query="unlock")], "lock", floor) is not None


def test_static_rule() -> None:
    policy = StaticPolicy(threshold=0.9, guard=trap_guard)
    assert _hit(policy, [_cand(0.91, "A")], "q", 0.9) is not None
    assert _hit(policy, [_cand(0.89, "A")], "q", 0.9) is None
    trap = policy.decide(
        [_cand(0.99, "A", query="Cancel my subscription")], "Don't cancel my subscription", 0.9
    )
    assert trap.hit is None and trap.reject == "guard"
    # static mode learns nothing
    assert policy.pending([_cand(0.5, "A")], "q", 0.9) is None


def test_policy_floors() -> None:
    band = FloorBand()
    assert StaticPolicy(threshold=0.9).floor(band) == 0.9
    assert AdaptivePolicy(threshold=0.9).floor(band) == VOTE_FLOOR
    assert AdaptivePolicy(threshold=0.7).floor(band) == 0.7  # never above the static threshold


def test_learning_raises_tau_of_wrong_candidates_only() -> None:
    policy = AdaptivePolicy(threshold=0.92)
    near = [_cand(0.9, "A", i=1), _cand(0.85, "B", i=2), _cand(0.8, "A", i=3), _cand(0.79, "B", i=4)]
    pending = policy.pending(near, "q", VOTE_FLOOR)
    assert pending is not None and pending.shadow is None  # the vote is split: no shadow answer
    band = FloorBand()
    wrong = policy.learn(pending, "A", band)
    assert [c.entry_id for c in wrong] == [2]  # only the three nearest learn
    assert band.n == 0  # no shadow answer, nothing audited


def test_floor_steps_down_only_within_the_error_bound() -> None:
    policy = AdaptivePolicy(threshold=0.92, error_bound=0.05)
    shadow = _cand(VOTE_FLOOR - FLOOR_STEP / 2, "A")
    band = FloorBand()
    for _ in range(FLOOR_MIN_OBS):
        policy.learn(PendingLookup(shadow=shadow, candidates=[shadow]), "A", band)
    assert band.floor == VOTE_FLOOR - FLOOR_STEP and band.n == 0  # all right: one step down
    for _ in range(FLOOR_MIN_OBS):
        policy.learn(PendingLookup(shadow=shadow, candidates=[shadow]), "B", band)
        assert band.floor == VOTE_FLOOR - FLOOR_STEP  # all wrong: never steps down


def test_pending_lookups_are_bounded() -> None:
    pending = PendingLookups(max_size=2)
    for q in ("a", "b", "c"):
        pending.put("s", q, PendingLookup(shadow=None, candidates=[]))
    assert len(pending) == 2 and pending.pop("s", "a") is None and pending.pop("s", "c") is not None


def test_old_private_candidate_name_still_imports() -> None:
    from caches.semantic import _Candidate

    assert _Candidate is Candidate
