"""What a placement policy promises the TieredCache, and what one decision looks like.

The cache moves bytes; the policy decides which keys live in the RAM tier. Everything the cache
asks of a policy is on `PlacementPolicy`, including the two things only some policies can do
(read RAM and record in one round trip; list the keys they place under a prefix) as methods with
a default: the cache never needs to know which policy it holds (no `isinstance`), and the
benchmark baselines (benchmarks/baselines.py) plug in unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from caches.tiers.base import Tier


@dataclass
class Placement:
    """What one `admit` decided; the TieredCache moves the bytes."""

    admitted: list[str] = field(default_factory=list)  # candidates now resident in RAM: write them
    demoted: list[str] = field(default_factory=list)  # were resident, displaced: write SSD, then delete RAM
    rejected: list[str] = field(default_factory=list)  # candidates not kept in RAM: SSD must hold them


class PlacementPolicy(Protocol):
    name: str

    def record(self, keys: Sequence[str], hits: set[str]) -> None:
        """Count an access for every key; `hits` are those the RAM tier answered."""
        ...

    def admit(self, sizes: dict[str, int]) -> Placement:
        """Candidates (fetched from below, in access order) with their sizes in bytes."""
        ...

    def remove(self, keys: Sequence[str]) -> None: ...

    def resident_bytes(self) -> int: ...

    def resident_keys(self, prefix: str = "") -> list[str]:
        """The keys this policy places in RAM under `prefix` (a purge removes exactly these)."""
        ...

    def lookup(self, ram: Tier, keys: Sequence[str]) -> dict[str, bytes] | None:
        """Read `keys` from `ram` *and* record the accesses in one step, when this policy can (its
        state lives on the same server). None: it cannot; the caller reads, then calls `record`."""
        return None

    def reconcile_step(self) -> int:
        """One bounded, resumable slice of upkeep (TieredCache.maintain, on its upkeep thread):
        forget entries whose RAM value is gone (expired by TTL) though no read came to say so;
        returns how many. Raises TierUnavailable. The default does nothing: a policy that cannot
        see the RAM tier (the in-process ones) learns of a gone value only when `record` calls it
        a miss, so it counts an expired value until the key is read again."""
        return 0

    @property
    def reconcile_wrapped(self) -> bool:
        """True when the last `reconcile_step` finished a sweep (the upkeep round may stop)."""
        return True


def split_placement(candidates: Sequence[str], evicted: Sequence[str]) -> Placement:
    """A decision from the candidates and everything the policy evicted while placing them."""
    cands = set(candidates)
    gone = set(evicted)
    return Placement(
        admitted=[k for k in candidates if k not in gone],
        demoted=[k for k in dict.fromkeys(evicted) if k not in cands],
        rejected=[k for k in candidates if k in gone],
    )
