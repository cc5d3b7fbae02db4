"""The semantic cache's decision rules, without Redis: guard, verified learning, exploration."""

from __future__ import annotations

from caches.semantic import (
    FLOOR_MIN,
    NEAR_DUPLICATE,
    VOTE_MARGIN,
    Candidate,
    FloorBand,
    PendingLookup,
    PendingLookups,
    StaticPolicy,
    VerifiedPolicy,
    trap_guard,
    wilson_upper,
)
from caches.semantic.decision import BIN_MIN_OBS, Decision
from caches.semantic.evidence import BIN


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


def _cand(sim: float, group: int, query: str = "q", tau: float = -1.0, i: int = 0) -> Candidate:
    return Candidate(entry_id=i or int(sim * 1000) + group, similarity=sim, query=query, response=f"r{group}",
                     tau=tau, group=group)


def _by_group(candidate: Candidate, answer_group: int) -> bool:
    return candidate.group_id == answer_group


def test_static_rule() -> None:
    policy = StaticPolicy(threshold=0.9, guard=trap_guard)
    assert policy.decide([_cand(0.91, 1)], "q", 0.9).hit is not None
    assert policy.decide([_cand(0.89, 1)], "q", 0.9).hit is None
    trap = policy.decide([_cand(0.99, 1, query="Cancel my subscription")], "Don't cancel my subscription", 0.9)
    assert trap.hit is None and trap.reject == "guard"
    # static mode learns nothing
    assert policy.pending([_cand(0.5, 1)], "q", Decision()) is None


def test_verified_rule_guard_tau_and_judged_groups() -> None:
    policy = VerifiedPolicy(threshold=0.92, guard=trap_guard, explore_rate=0.0)
    floor = 0.80
    # below a near-duplicate similarity two neighbours the judge put in one group are needed
    assert policy.decide([_cand(0.85, 1)], "q", floor).reject == "vote"
    assert policy.decide([_cand(0.85, 1), _cand(0.80, 1)], "q", floor).hit is not None
    # a neighbour with a non-equivalent answer within the margin vetoes, even above the threshold
    assert policy.decide([_cand(0.95, 1), _cand(0.95 - VOTE_MARGIN / 2, 2)], "q", floor).hit is None
    # one outside the margin does not
    assert policy.decide([_cand(0.99, 1), _cand(0.99 - 2 * VOTE_MARGIN, 2)], "q", floor).hit is not None
    # below the floor nothing is answered, and that is a plain miss
    below = policy.decide([_cand(floor - 0.01, 1), _cand(floor - 0.02, 1)], "q", floor)
    assert below == Decision()
    # a learned per-entry threshold at or above the similarity vetoes
    assert policy.decide([_cand(0.99, 1, tau=0.99)], "q", floor).reject == "tau"
    trap = policy.decide([_cand(0.99, 1, query="How do I unlock my card?")], "How do I lock my card?", floor)
    assert trap.reject == "guard"


def test_floor_starts_at_the_calibrated_threshold_and_opens_only_within_the_budget() -> None:
    policy = VerifiedPolicy(threshold=0.92, error_budget=0.01)
    band = FloorBand()
    assert policy.floor(band) == 0.92
    # judged-right would-be hits just below the floor open it, one bin at a time, while the Wilson
    # bound of the region's error rate stays within the budget
    for _ in range(400):
        band.observe(0.915, True)
    policy.adapt_floor(band)
    assert abs(band.floor - 0.91) < 1e-9
    # too few observations in the next bin: it stays shut
    for _ in range(BIN_MIN_OBS - 1):
        band.observe(0.905, True)
    policy.adapt_floor(band)
    assert abs(band.floor - 0.91) < 1e-9
    # wrong answers there: the budget is spent, the floor goes back up
    for _ in range(20):
        band.observe(0.915, False)
    policy.adapt_floor(band)
    assert band.floor == 0.92
    # clearly over budget above the threshold: it closes upwards
    for _ in range(50):
        band.observe(0.925, False)
    policy.adapt_floor(band)
    assert band.floor > 0.92
    # and never below FLOOR_MIN
    low = FloorBand()
    for b in range(0, 100):
        for _ in range(500):
            low.observe(b * BIN + BIN / 2, True)
    policy.adapt_floor(low)
    assert low.floor >= FLOOR_MIN - 1e-9


def test_exploration_shrinks_with_confidence_and_spares_near_duplicates() -> None:
    policy = VerifiedPolicy(threshold=0.92, explore_rate=0.2, error_budget=0.01)
    band = FloorBand()
    assert policy.explore_probability(0.9, band) == 0.2  # no evidence: the full rate
    assert policy.explore_probability(NEAR_DUPLICATE, band) == 0.0
    for _ in range(3000):
        band.observe(0.9, True)
    assert policy.explore_probability(0.9, band) < 0.2 * 0.5
    # explore=True draws; with rate 1 and no evidence every uncertain would-be hit is verified
    always = VerifiedPolicy(threshold=0.92, explore_rate=1.0, seed=1)
    pair = [_cand(0.95, 1), _cand(0.94, 1)]
    decision = always.decide(pair, "q", 0.9, FloorBand(), explore=True)
    assert decision.verify is pair[0] and decision.hit is None
    assert always.decide(pair, "q", 0.9, FloorBand(), explore=False).hit is pair[0]


def test_learning_from_a_miss_and_a_verification() -> None:
    policy = VerifiedPolicy(threshold=0.92, explore_rate=0.0)
    near = [_cand(0.9, 1, i=1), _cand(0.85, 2, i=2), _cand(0.8, 1, i=3), _cand(0.79, 2, i=4)]
    decision = policy.decide(near, "q", 0.92)
    pending = policy.pending(near, "q", decision)
    assert pending is not None and pending.shadow is None  # the vote is split: nothing to observe
    band = FloorBand()
    learned = policy.learn(pending, lambda c: _by_group(c, 1), band)
    assert [c.entry_id for c in learned.wrong] == [2]  # only the nearest three are judged
    assert learned.group == 1 and learned.shadow_correct is None and sum(band.n) == 0
    # a rule-passing shadow below the floor is an observation, right or wrong
    pair = [_cand(0.9, 1, i=5), _cand(0.88, 1, i=6)]
    pending = policy.pending(pair, "q", policy.decide(pair, "q", 0.92))
    assert pending is not None and pending.shadow is pair[0]
    learned = policy.learn(pending, lambda c: _by_group(c, 2), band)
    assert learned.shadow_correct is False and learned.group is None and band.wrong[90] == 1
    # a verification's candidate is the observation
    verified = policy.pending(pair, "q", Decision(verify=pair[0]))
    assert verified is not None and verified.verified and verified.shadow is pair[0]
    assert policy.learn(verified, lambda c: _by_group(c, 1), band).shadow_correct is True


def test_pending_lookups_are_bounded() -> None:
    pending = PendingLookups(max_size=2)
    for q in ("a", "b", "c"):
        pending.put("s", q, PendingLookup(shadow=None, candidates=[]))
    assert len(pending) == 2 and pending.pop("s", "a") is None and pending.pop("s", "c") is not None


def test_old_private_candidate_name_still_imports() -> None:
    from caches.semantic import _Candidate

    assert _Candidate is Candidate


def test_the_error_rate_behind_an_imperfect_judges_verdicts() -> None:
    from caches.semantic.evidence import debiased

    # a perfect judge: the observed "different" rate is the error rate
    assert debiased(0.03, 1.0, 0.0) == 0.03
    # a judge that misses 10% of equivalent answers: 10% "different" with no real error
    assert abs(debiased(0.10, 0.9, 0.01)) < 1e-9
    assert abs(debiased(0.10 + 0.89 * 0.05, 0.9, 0.01) - 0.05) < 1e-9  # a 5% real error rate
    # a judge no better than chance tells nothing: the worst case
    assert debiased(0.5, 0.3, 0.3) == 1.0


def test_an_imperfect_judge_neither_closes_the_floor_nor_raises_tau_on_its_own_misses() -> None:
    band = FloorBand()
    # above the threshold, 10% "different" verdicts: what a judge of recall 0.9 says of right hits
    for i in range(200):
        band.observe(0.925, i % 10 != 0)
    naive = VerifiedPolicy(threshold=0.92, error_budget=0.01)
    naive.adapt_floor(band)
    assert naive.floor(band) > 0.92  # taken as a 10% error rate: ten times the budget, it closes
    aware = VerifiedPolicy(threshold=0.92, error_budget=0.01, judge_recall=0.9, judge_false_positive_rate=0.01)
    band.floor = -1.0
    aware.adapt_floor(band)
    assert aware.floor(band) == 0.92
    # one "different" verdict on an entry no longer raises its tau; two net ones do
    assert aware.strikes_needed == 2 and naive.strikes_needed == 1
    near = [_cand(0.9, 1, i=1), _cand(0.89, 1, i=2)]
    pending = PendingLookup(shadow=None, candidates=near)
    assert aware.learn(pending, lambda c: False, band).wrong == []
    assert [c.entry_id for c in aware.learn(pending, lambda c: False, band).wrong] == [1, 2]
    # an "equivalent" verdict in between takes a strike back
    fresh = FloorBand()
    aware.learn(pending, lambda c: False, fresh)
    aware.learn(pending, lambda c: True, fresh)
    assert aware.learn(pending, lambda c: False, fresh).wrong == []
    # the app's own judge (recall 0.027) never raises a tau by its verdicts
    app = VerifiedPolicy(threshold=0.92, judge_recall=4 / 150, judge_false_positive_rate=1 / 150)
    assert app.strikes_needed > 100
