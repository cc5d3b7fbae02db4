"""What a TieredCache read returns and what the cache counts (caches/tiered.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from caches.tiers.base import TierStats


@dataclass
class TieredResult:
    values: dict[str, bytes]
    sources: dict[str, str]  # key -> tier name that answered
    missing: list[str]  # keys no tier could answer
    degraded: bool  # a tier was unavailable during this read
    ram_hits: int = 0
    ssd_hits: int = 0
    cold_hits: int = 0


@dataclass
class TieredStats:
    tiers: dict[str, TierStats] = field(default_factory=dict)
    ram_policy_bytes: int = 0
    ssd_budget_bytes: int = 0
    promotions: int = 0
    demotions: int = 0
    ssd_drops: int = 0
    degraded_reads: int = 0
    ssd_errors: int = 0  # SSD calls the disk refused (each served from the tier below or skipped)
    ram_reconciled: int = 0  # RAM sizes forgotten by maintain(): values Redis expired by TTL
    generation_refused: int = 0  # RAM writes refused: the value's generation was no longer current
    generation_stale: int = 0  # copies not served: they carried another generation than the current one
