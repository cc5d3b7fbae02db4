"""Deciding a hit: which of the mirror's candidates (if any) may answer a query.

A hit requires the same scope (everything but the user's question: tenant, model identity,
version, encoder, system prompt, earlier turns, every other request field; built by
:class:`caches.chat.ChatIdentity`); only the user's question is compared. Two strategies
sit behind one protocol, :class:`HitPolicy`, so the cache facade never branches on the mode:

``static`` (:class:`StaticPolicy`): the nearest entry's cosine >= the calibrated threshold and the
lexical trap guard passes (:func:`~caches.semantic.guard.trap_guard`).

``adaptive`` (:class:`AdaptivePolicy`): neighbour voting plus per-entry learned thresholds and an
error-bounded floor. Everything here is pure logic on typed candidates: no Redis, no FAISS, no
locks. The facade fetches candidates, applies what a policy returns and keeps the bookkeeping
thread-safe.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from caches.keys import canonical_text

# --- tuning constants ---------------------------------------------------------------------------
VOTE_K = 10  # neighbours fetched per lookup in adaptive mode
VOTE_MARGIN = 0.10  # neighbours within this cosine of the nearest take part in the vote
VOTE_MIN = 2  # agreeing neighbours needed below the near-duplicate similarity
# A single neighbour may answer alone only this close: such pairs differ by punctuation, case or
# filler words (with the trap guard on, no labelled pair above it is a wrong merge); below it the
# static threshold alone missed its precision target on real streams, so a second vote is required.
NEAR_DUPLICATE = 0.98
VOTE_FLOOR = 0.80  # starting floor for the nearest neighbour in adaptive mode
VOTE_FLOOR_MIN = 0.65  # the floor never adapts below this
FLOOR_STEP = 0.025  # width of the band below the floor that is audited from misses
FLOOR_MIN_OBS = 60  # band observations needed before the floor may move
WILSON_Z = 1.64  # one-sided 95% for the error-bound test
LEARN_FROM_TOP = 3  # how many of a miss's nearest candidates learn from the model's answer
PENDING_MAX = 10_000  # lookups remembered until their store() arrives (for per-entry learning)

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


@dataclass(frozen=True)
class Decision:
    """A policy's verdict: the candidate that answers, or why the nearest one may not."""

    hit: Candidate | None = None
    reject: Reject | None = None  # counted as ``{reject}_rejects``; None for a plain miss


@dataclass
class FloorBand:
    """Per replica and scope: the adaptive floor and the audit of the band just below it."""

    floor: float = VOTE_FLOOR
    n: int = 0  # misses in the band whose true answer became known
    wrong: int = 0  # of those, how many the vote would have answered wrongly


@dataclass
class PendingLookup:
    """A miss remembered until the caller stores the model's answer for the same query.

    ``shadow`` is what the vote would have answered with the floor one step lower; ``candidates``
    are what the lookup proposed, nearest first.
    """

    shadow: Candidate | None
    candidates: list[Candidate]


def wilson_upper(errors: int, n: int, z: float = WILSON_Z) -> float:
    """One-sided Wilson upper bound of an error rate (1.0 with no observations).

    Wilson rather than the normal approximation because the rates of interest are near 0, where
    the normal interval collapses to zero width after a run of successes.
    """
    if n == 0:
        return 1.0
    p = errors / n
    denom = 1 + z * z / n
    return (p + z * z / (2 * n) + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / denom


def same_answer(a: str, b: str) -> bool:
    return canonical_text(a) == canonical_text(b)


class HitPolicy(Protocol):
    """How a lookup turns the mirror's nearest entries into a hit or a miss."""

    neighbours: int  # how many nearest entries the mirror proposes

    def floor(self, band: FloorBand) -> float:
        """The lowest similarity that may answer in this scope now."""
        ...

    def cutoff(self, floor: float) -> float:
        """The lowest similarity worth proposing (and validating in Redis) at this floor."""
        ...

    def decide(self, candidates: Sequence[Candidate], query: str, floor: float) -> Decision:
        """The hit among ``candidates`` (nearest first, non-empty), or a miss and its reason."""
        ...

    def pending(self, candidates: Sequence[Candidate], query: str, floor: float) -> PendingLookup | None:
        """What to remember about a miss to learn from its true answer (None: nothing to learn)."""
        ...

    def learn(self, pending: PendingLookup, response: str, band: FloorBand | None) -> list[Candidate]:
        """Update ``band`` from a miss's true answer; returns the candidates whose tau must rise."""
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

    def decide(self, candidates: Sequence[Candidate], query: str, floor: float) -> Decision:
        top = candidates[0]
        if top.similarity < self.threshold:
            return Decision()
        if self.guard is not None and self.guard(query, top.query) is not None:
            return Decision(reject="guard")
        return Decision(hit=top)

    def pending(self, candidates: Sequence[Candidate], query: str, floor: float) -> PendingLookup | None:
        return None

    def learn(self, pending: PendingLookup, response: str, band: FloorBand | None) -> list[Candidate]:
        return []


@dataclass
class AdaptivePolicy:
    """Neighbour voting, per-entry learned thresholds and an error-bounded floor.

    Voting: the nearest entry must be above the floor, pass the guard and its own learned
    threshold; every neighbour within :data:`VOTE_MARGIN` of it must carry the same answer; and at
    least :data:`VOTE_MIN` must agree (one suffices only for a near-duplicate,
    :data:`NEAR_DUPLICATE`). Close neighbours that agree are independent evidence that the region
    of embedding space around the query maps to one answer; one that disagrees means the region is
    ambiguous, however high the top similarity is.

    Per-entry thresholds follow vCache (Schroeder et al., 2025: "vCache: Verified Semantic Prompt
    Caching"): each entry learns the similarity below which it must not answer, from what a
    deployment observes. On a miss the caller stores the model's fresh answer; the nearest
    candidates that lookup proposed are compared with it, and each whose answer differs learns
    that queries at that similarity are not its to answer (its tau rises to that similarity,
    shared via Redis).

    The floor follows an error bound tested with a one-sided Wilson upper bound
    (:func:`wilson_upper`): it starts at :data:`VOTE_FLOOR` and steps down by :data:`FLOOR_STEP`
    only when the misses in the band just below it, where the vote would have answered, show a
    wrong-answer rate within ``error_bound`` after at least :data:`FLOOR_MIN_OBS` observations.
    """

    threshold: float
    error_bound: float = 0.01
    guard: Guard | None = None
    neighbours: int = VOTE_K

    def floor(self, band: FloorBand) -> float:
        return min(band.floor, self.threshold)

    def cutoff(self, floor: float) -> float:
        # the shadow vote one step lower needs its own window too
        return floor - (VOTE_MARGIN + FLOOR_STEP)

    def decide(self, candidates: Sequence[Candidate], query: str, floor: float) -> Decision:
        top = candidates[0]
        if top.similarity < floor:
            return Decision()
        if self.guard is not None and self.guard(query, top.query) is not None:
            return Decision(reject="guard")
        if top.similarity <= top.tau:
            return Decision(reject="tau")
        window = [c for c in candidates if c.similarity >= top.similarity - VOTE_MARGIN]
        needed = 1 if top.similarity >= max(self.threshold, NEAR_DUPLICATE) else VOTE_MIN
        if len(window) < needed or any(not same_answer(c.response, top.response) for c in window):
            return Decision(reject="vote")
        return Decision(hit=top)

    def pending(self, candidates: Sequence[Candidate], query: str, floor: float) -> PendingLookup | None:
        shadow = self.decide(candidates, query, floor - FLOOR_STEP).hit
        return PendingLookup(shadow=shadow, candidates=list(candidates))

    def learn(self, pending: PendingLookup, response: str, band: FloorBand | None) -> list[Candidate]:
        if pending.shadow is not None and band is not None:
            band.n += 1
            band.wrong += not same_answer(pending.shadow.response, response)
            self.adapt_floor(band)
        return [c for c in pending.candidates[:LEARN_FROM_TOP] if not same_answer(c.response, response)]

    def adapt_floor(self, band: FloorBand) -> None:
        if band.n < FLOOR_MIN_OBS:
            return
        if (
            wilson_upper(band.wrong, band.n) <= self.error_bound
            and band.floor - FLOOR_STEP >= VOTE_FLOOR_MIN - 1e-9
        ):
            band.floor -= FLOOR_STEP
            band.n = band.wrong = 0
        elif band.wrong / band.n > 2 * self.error_bound:
            # the band below is clearly riskier than the bound: start counting afresh
            band.n = band.wrong = 0


@dataclass
class PendingLookups:
    """Misses awaiting their store(), bounded, oldest forgotten first (not thread-safe)."""

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
