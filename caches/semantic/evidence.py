"""The verified rule's evidence: judged would-be hits by similarity, and what they say.

Pure statistics, no policy: :class:`FloorBand` counts verdicts per similarity bin (and, for an
imperfect judge, "different" verdicts per entry); :func:`wilson_upper` bounds an error rate seen in
few observations; :func:`debiased` turns the rate of "not equivalent" verdicts of a judge with a
measured recall and false-positive rate into the error rate behind them. The rule that spends
this evidence is :class:`caches.semantic.decision.VerifiedPolicy`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

BIN = 0.01  # width of the similarity bins the error rate is estimated in
# One-sided 84% for the error bounds: tuned on the banking77 tune half (1.64, one-sided 95%, kept
# the floor at the calibrated threshold there: paraphrase precision 0.9986 but fewer correct hits
# than the static rule; 1.0 opened it to 0.87 at precision 0.9976). Exploration uses it too.
WILSON_Z = 1.0
STRIKES_MAX = 10_000  # entries per scope and replica whose "different" verdicts are being counted
STRIKES_NEVER = 1 << 30  # a judge no better than chance: its "different" never raises a tau
N_BINS = int(round(1 / BIN)) + 1


def bin_of(similarity: float) -> int:
    return min(max(int(math.floor(similarity / BIN + 1e-9)), 0), N_BINS - 1)


def wilson_upper(errors: int, n: int, z: float | None = None) -> float:
    """One-sided Wilson upper bound of an error rate (1.0 with no observations).

    Wilson rather than the normal approximation because the rates of interest are near 0, where
    the normal interval collapses to zero width after a run of successes.
    """
    if n == 0:
        return 1.0
    z = WILSON_Z if z is None else z
    p = errors / n
    denom = 1 + z * z / n
    return (p + z * z / (2 * n) + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / denom


def debiased(rate: float, recall: float, false_positive_rate: float) -> float:
    """The true error rate behind an observed "not equivalent" rate from an imperfect judge.

    A judge with recall ``r`` and false-positive rate ``f`` says "not equivalent" to a right hit
    with probability ``1 - r`` and to a wrong one with ``1 - f``, so the observed rate is
    ``o = (1 - e)(1 - r) + e(1 - f)``; solved for ``e`` (Rogan and Gladen, 1978, "Estimating
    prevalence from the results of a screening test"): ``e = (o - (1 - r)) / (r - f)``, clipped to
    [0, 1]. Bounds transform the same way (the map is monotone). A judge no better than chance
    (``r <= f``) tells nothing: the worst case, 1.0. With a perfect judge ``e = o``.
    """
    if recall <= false_positive_rate:
        return 1.0
    return min(max((rate - (1.0 - recall)) / (recall - false_positive_rate), 0.0), 1.0)


@dataclass
class FloorBand:
    """Per replica and scope: the learned floor and the verified observations behind it.

    ``n[b]`` / ``wrong[b]`` count judged would-be hits whose similarity falls in bin ``b``
    (``b = floor(similarity / BIN)``): a miss whose rule-passing nearest candidate the judge
    compared with the model's answer, or a verification.
    """

    floor: float = -1.0  # -1: not set yet (the policy starts it at the calibrated threshold)
    n: list[int] = field(default_factory=lambda: [0] * N_BINS)
    wrong: list[int] = field(default_factory=lambda: [0] * N_BINS)
    # entry id -> "different" verdicts not yet outweighed by "equivalent" ones (an imperfect judge)
    strikes: dict[int, int] = field(default_factory=dict)

    def strike(self, entry_id: int, different: bool) -> int:
        """Count one verdict on an entry; its strikes now (an "equivalent" verdict takes one back)."""
        count = max(self.strikes.pop(entry_id, 0) + (1 if different else -1), 0)
        if count:
            self.strikes[entry_id] = count  # re-inserted: the dict's order is least recently struck first
            while len(self.strikes) > STRIKES_MAX:
                del self.strikes[next(iter(self.strikes))]
        return count

    def observe(self, similarity: float, correct: bool) -> None:
        b = bin_of(similarity)
        self.n[b] += 1
        self.wrong[b] += not correct

    def pooled(self, lo: int, hi: int = N_BINS - 1) -> tuple[int, int]:
        """(wrong, n) over bins lo..hi inclusive."""
        lo, hi = max(lo, 0), min(hi, N_BINS - 1)
        return sum(self.wrong[lo : hi + 1]), sum(self.n[lo : hi + 1])
