"""Deciding a hit: which of the mirror's candidates (if any) may answer a query.

A hit requires the same scope (everything but the user's question: tenant, model identity,
version, encoder, system prompt, earlier turns, every other request field; built by
:class:`caches.chat.ChatIdentity`); only the user's question is compared. Two strategies
sit behind one protocol, :class:`HitPolicy`, so the cache facade never branches on the mode:

``static`` (:class:`StaticPolicy`): the nearest entry's cosine >= the calibrated threshold and the
lexical trap guard passes (:func:`~caches.semantic.guard.trap_guard`).

``verified`` (:class:`VerifiedPolicy`): thresholds learned from verified samples, after vCache
(Schroeder et al., 2025); see the class. It learns from an answer-equivalence judge
(:mod:`caches.semantic.judge`), never from answer text identity, which a model's answers to two
paraphrases almost never share.

Everything here is pure logic on typed candidates: no Redis, no FAISS, no locks. Judging is a
callable the facade passes in. The facade fetches candidates, applies what a policy returns and
keeps the bookkeeping thread-safe. The trap guard stays in front of every strategy.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from caches.semantic.evidence import (
    BIN,
    N_BINS,
    STRIKES_NEVER,
    FloorBand,
    bin_of,
    debiased,
    wilson_upper,
)

# --- tuning constants (tuned on the banking77 "tune" half only; benchmarks/semantic_stream.py) --
VOTE_K = 10  # neighbours fetched per lookup in verified mode
VOTE_MARGIN = 0.10  # neighbours within this cosine of the nearest take part in the vote
VOTE_MIN = 2  # agreeing neighbours needed below the near-duplicate similarity
# A single neighbour may answer alone only this close: such pairs differ by punctuation, case or
# filler words (with the trap guard on, no labelled pair above it is a wrong merge). Near-duplicates
# are never explored either: the e2e rewording test relies on that, and so do repeat questions.
NEAR_DUPLICATE = 0.98
FLOOR_MIN = 0.70  # the learned floor never goes below this
BIN_MIN_OBS = 8  # observations a bin needs before the floor may open it
EXPLORE_NEIGHBOUR_BINS = 2  # bins either side pooled for a hit's local confidence
LEARN_FROM_TOP = 3  # how many of a miss's nearest candidates may learn a raised tau from a verdict
# how many the new entry may find its group among (the nearest judged equivalent); with the
# embedding judge each verdict is one dot product, so looking wider than LEARN_FROM_TOP is cheap,
# and a same-answer neighbour left in another group would veto later votes needlessly
GROUP_FROM_TOP = VOTE_K
PENDING_MAX = 10_000  # lookups remembered until their store() arrives (for learning)

Guard = Callable[[str, str], str | None]
Reject = Literal["guard", "tau", "vote"]


@dataclass
class Candidate:
    """An entry the mirror proposes for a query, at its cosine similarity to the query."""

    entry_id: int
    similarity: float
    query: str
    response: str
    tau: float = -1.0  # learned per-entry threshold: queries at or below it are not answered by it
    # entries whose answers the judge found equivalent share a group (the first one's id); 0: unknown
    group: int = 0
    answer_vector: np.ndarray | None = None  # the answer's embedding, for the judge
    # when the answer was stored, from the same metadata snapshot as the answer (a hit's Age and
    # max-age checks: read later, the entry's metadata may already be gone)
    created: float = 0.0

    @property
    def group_id(self) -> int:
        return self.group or self.entry_id


@dataclass(frozen=True)
class Decision:
    """A policy's verdict: the candidate that answers, one to verify, or why none may."""

    hit: Candidate | None = None
    reject: Reject | None = None  # counted as ``{reject}_rejects``; None for a plain miss
    # an uncertain would-be hit picked for verification: the model answers, the judge compares
    verify: Candidate | None = None


@dataclass
class PendingLookup:
    """A lookup remembered until the caller stores the model's answer for the same query.

    ``shadow`` is what the rule would answer with no floor (its verdict is an observation of the
    error rate at its similarity); ``candidates`` are what the lookup proposed, nearest first.
    """

    shadow: Candidate | None
    candidates: list[Candidate]
    verified: bool = False  # the lookup was a verification (the model called for a would-be hit)


@dataclass(frozen=True)
class Learned:
    """What a judged answer taught: entries that must not answer at that similarity, the group the
    new entry joins (None: a group of its own), the shadow's verdict (None: no shadow)."""

    wrong: list[Candidate]
    group: int | None
    shadow_correct: bool | None


class HitPolicy(Protocol):
    """How a lookup turns the mirror's nearest entries into a hit, a verification or a miss."""

    neighbours: int  # how many nearest entries the mirror proposes

    def floor(self, band: FloorBand) -> float:
        """The lowest similarity that may answer in this scope now."""
        ...

    def cutoff(self, floor: float) -> float:
        """The lowest similarity worth proposing (and validating in Redis) at this floor."""
        ...

    def decide(
        self, candidates: Sequence[Candidate], query: str, floor: float, band: FloorBand | None = None,
        explore: bool = False,
    ) -> Decision:
        """The hit among ``candidates`` (nearest first, non-empty), a verification (only when
        ``explore``), or a miss and its reason."""
        ...

    def pending(self, candidates: Sequence[Candidate], query: str, decision: Decision) -> PendingLookup | None:
        """What to remember about a miss or verification to learn from its true answer."""
        ...

    def learn(
        self, pending: PendingLookup, equivalent: Callable[[Candidate], bool], band: FloorBand | None
    ) -> Learned:
        """Judge the model's answer against the pending candidates (``equivalent``) and learn."""
        ...


@dataclass
class StaticPolicy:
    """The nearest entry answers when it is above the calibrated threshold and passes the guard.

    Follows the classic GPTCache-style design with a threshold calibrated offline for a target
    precision (:mod:`caches.calibrate`), plus the lexical guard for minimal edits that embeddings
    cannot tell apart. It learns nothing at run time.
    """

    threshold: float
    guard: Guard | None = None
    neighbours: int = 1

    def floor(self, band: FloorBand) -> float:
        return self.threshold

    def cutoff(self, floor: float) -> float:
        return floor

    def decide(
        self, candidates: Sequence[Candidate], query: str, floor: float, band: FloorBand | None = None,
        explore: bool = False,
    ) -> Decision:
        top = candidates[0]
        if top.similarity < self.threshold:
            return Decision()
        if self.guard is not None and self.guard(query, top.query) is not None:
            return Decision(reject="guard")
        return Decision(hit=top)

    def pending(self, candidates: Sequence[Candidate], query: str, decision: Decision) -> PendingLookup | None:
        return None

    def learn(
        self, pending: PendingLookup, equivalent: Callable[[Candidate], bool], band: FloorBand | None
    ) -> Learned:
        return Learned([], None, None)


@dataclass
class VerifiedPolicy:
    """Thresholds learned from verified samples, within an error budget (after vCache).

    Follows vCache (Schroeder et al., 2025, "vCache: Verified Semantic Prompt Caching"): whether
    a cached answer may serve a query is learned online from (similarity, correct?) observations,
    where "correct" is an answer-equivalence verdict on the model's own answer, with a confidence
    bound on the error rate, an exploration probability that shrinks as confidence grows, and a
    user-set error budget that is spent rather than guarded by a fixed margin. Differences, and why:

    - Observations come from two places. Every miss calls the model anyway, so its answer is judged
      against the nearest candidates for free; an uncertain would-be hit is verified (the model is
      called, its answer served and judged against the candidate) with probability
      ``explore_rate x min(1, U / budget)``, where ``U`` is the Wilson upper bound of the error rate
      observed near that similarity: it shrinks to ``explore_rate x (true rate / budget)`` as
      evidence accumulates. vCache explores every lookup; here misses already supply the evidence
      below the floor, so verification is only needed above it.
    - Per entry (vCache's per-embedding threshold): an entry judged wrong for a query at similarity
      ``s`` never answers at or below ``s`` again (``tau``, shared through Redis). vCache fits a
      sigmoid per entry, which needs ~6 observations per entry before it serves anything; a
      paraphrase stream rarely gives one entry that many.
    - Per scope: the floor is the lowest similarity ``t`` such that the Wilson upper bound of the
      error rate of all judged would-be hits at or above ``t`` is within ``error_budget`` (the
      budget is spent on the whole served region, not per bin). It starts at the calibrated static
      threshold, opens downwards as misses just below it are judged right, and closes upwards when
      the judged error rate at or above it is clearly over budget.
    - The judge is not perfect (:mod:`caches.semantic.judge` measures it): given its recall and
      false-positive rate, the floor and the exploration read the error rate behind the verdicts
      (:func:`debiased`), not the verdicts' own "not equivalent" rate. Without that, a judge that
      misses 10 % of equivalent answers looks like a 10 % error rate, ten times a 1 % budget, and
      the floor closes over hits that were right (measured: benchmarks/results/semantic_stream_judge_quality.json).
      For the same reason an entry's ``tau`` is raised only after :attr:`strikes_needed` more
      "different" than "equivalent" verdicts (one with a perfect judge): enough that a right entry
      reaches it by the judge's misses alone with a chance within the budget.
    - Neighbourhood agreement (the judge's other use): entries whose answers the judge found
      equivalent share a group; every neighbour within :data:`VOTE_MARGIN` of the nearest must be
      in its group, and below the calibrated threshold at least :data:`VOTE_MIN` must agree. A
      neighbour with a non-equivalent answer that close means the region is ambiguous.
    """

    threshold: float
    error_budget: float = 0.01
    explore_rate: float = 0.05
    guard: Guard | None = None
    neighbours: int = VOTE_K
    vote: bool = True
    # a single neighbour may answer alone from this similarity (None: the calibrated threshold;
    # tuned on the banking77 tune half: NEAR_DUPLICATE gave fewer correct hits than static)
    alone_from: float | None = None
    seed: int | None = None
    # the judge's measured quality (1.0 and 0.0: the verdicts are taken as the truth)
    judge_recall: float = 1.0
    judge_false_positive_rate: float = 0.0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    # -- floor ----------------------------------------------------------------------------------
    def _error(self, observed: float) -> float:
        """The error rate behind an observed rate of "not equivalent" verdicts (or its bound)."""
        return debiased(observed, self.judge_recall, self.judge_false_positive_rate)

    @property
    def strikes_needed(self) -> int:
        """Net "different" verdicts before an entry's ``tau`` rises: the smallest ``k`` with
        ``(1 - recall) ** k <= error_budget`` (1 for a perfect judge; a judge no better than chance
        never raises it)."""
        miss = 1.0 - self.judge_recall
        if miss <= 0.0:
            return 1
        if self.judge_recall <= self.judge_false_positive_rate:  # recall 0 included
            return STRIKES_NEVER
        return max(1, math.ceil(math.log(self.error_budget) / math.log(miss) - 1e-9))

    def floor(self, band: FloorBand) -> float:
        if band.floor < 0:
            band.floor = self.threshold
        return band.floor

    def cutoff(self, floor: float) -> float:
        # the shadow rule (no floor) needs the candidates down to FLOOR_MIN and its vote window
        return FLOOR_MIN - VOTE_MARGIN

    def adapt_floor(self, band: FloorBand) -> None:
        """Spend the error budget: the lowest floor whose served region stays within it."""
        start = bin_of(self.threshold)
        # close upwards while the region at or above the threshold is clearly over budget
        b = start
        while b < N_BINS - 1:
            wrong, n = band.pooled(b)
            if n < BIN_MIN_OBS or self._error(wrong / n) <= 2 * self.error_budget:
                break
            b += 1
        if b > start:
            band.floor = b * BIN
            return
        # open downwards from the calibrated threshold while the bound holds
        lowest = bin_of(FLOOR_MIN)
        b = start
        while b - 1 >= lowest:
            wrong, n = band.pooled(b - 1)
            if band.n[b - 1] < BIN_MIN_OBS or self._error(wilson_upper(wrong, n)) > self.error_budget:
                break
            b -= 1
        band.floor = min(self.threshold, b * BIN) if b < start else self.threshold

    # -- decision -------------------------------------------------------------------------------
    def rule(self, candidates: Sequence[Candidate], query: str) -> Decision:
        """Guard, learned per-entry threshold and neighbourhood agreement, no floor."""
        top = candidates[0]
        if self.guard is not None and self.guard(query, top.query) is not None:
            return Decision(reject="guard")
        if top.similarity <= top.tau:
            return Decision(reject="tau")
        if self.vote:
            window = [c for c in candidates if c.similarity >= top.similarity - VOTE_MARGIN]
            alone = self.threshold if self.alone_from is None else self.alone_from
            needed = 1 if top.similarity >= alone else VOTE_MIN
            if len(window) < needed or any(c.group_id != top.group_id for c in window):
                return Decision(reject="vote")
        return Decision(hit=top)

    def explore_probability(self, similarity: float, band: FloorBand | None) -> float:
        if similarity >= NEAR_DUPLICATE or self.explore_rate <= 0:
            return 0.0
        if band is None:
            return self.explore_rate
        b = bin_of(similarity)
        wrong, n = band.pooled(b - EXPLORE_NEIGHBOUR_BINS, b + EXPLORE_NEIGHBOUR_BINS)
        return self.explore_rate * min(1.0, self._error(wilson_upper(wrong, n)) / self.error_budget)

    def decide(
        self, candidates: Sequence[Candidate], query: str, floor: float, band: FloorBand | None = None,
        explore: bool = False,
    ) -> Decision:
        if candidates[0].similarity < floor:
            return Decision()
        decision = self.rule(candidates, query)
        if (
            decision.hit is not None
            and explore
            and self._rng.random() < self.explore_probability(decision.hit.similarity, band)
        ):
            return Decision(verify=decision.hit)
        return decision

    # -- learning -------------------------------------------------------------------------------
    def pending(self, candidates: Sequence[Candidate], query: str, decision: Decision) -> PendingLookup | None:
        if decision.verify is not None:
            return PendingLookup(shadow=decision.verify, candidates=list(candidates), verified=True)
        shadow = self.rule(candidates, query).hit
        if shadow is not None and shadow.similarity < FLOOR_MIN:
            shadow = None
        return PendingLookup(shadow=shadow, candidates=list(candidates))

    def learn(
        self, pending: PendingLookup, equivalent: Callable[[Candidate], bool], band: FloorBand | None
    ) -> Learned:
        judged: dict[int, bool] = {}

        def verdict(c: Candidate) -> bool:
            if c.entry_id not in judged:
                judged[c.entry_id] = equivalent(c)
            return judged[c.entry_id]

        shadow_ok: bool | None = None
        if pending.shadow is not None:
            shadow_ok = verdict(pending.shadow)
            if band is not None:
                band.observe(pending.shadow.similarity, shadow_ok)
                self.adapt_floor(band)
        wrong = [c for c in pending.candidates[:LEARN_FROM_TOP] if self._struck_out(c, verdict(c), band)]
        group = next((c.group_id for c in pending.candidates[:GROUP_FROM_TOP] if verdict(c)), None)
        return Learned(wrong, group, shadow_ok)

    def _struck_out(self, candidate: Candidate, equivalent: bool, band: FloorBand | None) -> bool:
        """Whether this verdict raises the candidate's ``tau`` (see :attr:`strikes_needed`)."""
        needed = self.strikes_needed
        if needed == 1 or band is None:
            return not equivalent
        if band.strike(candidate.entry_id, different=not equivalent) < needed:
            return False
        band.strikes.pop(candidate.entry_id, None)  # tau raised: count afresh above it
        return True


@dataclass
class PendingLookups:
    """Lookups awaiting their store(), bounded, oldest forgotten first (not thread-safe)."""

    max_size: int = PENDING_MAX
    _items: OrderedDict[tuple[str, str], PendingLookup] = field(default_factory=OrderedDict)

    def put(self, scope: str, query: str, pending: PendingLookup) -> None:
        key = (scope, query)
        self._items[key] = pending
        self._items.move_to_end(key)
        while len(self._items) > self.max_size:
            self._items.popitem(last=False)

    def pop(self, scope: str, query: str) -> PendingLookup | None:
        return self._items.pop((scope, query), None)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
