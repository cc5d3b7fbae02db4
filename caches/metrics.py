"""Prometheus metrics of the tiered cache, on the default registry so `/metrics` exports them.

One family per figure the operators ask about (hits, misses, promotions, demotions, drops,
errors, bytes, read latency), labelled by `tier` (redis | rocksdb | feast) and by the key's
`namespace` (features, emb, ...), never by key: label cardinality stays tiny. The objects are
module-level so that several caches in one process share them instead of failing on duplicate
registration.
"""

from __future__ import annotations

from collections import Counter as _Tally
from collections.abc import Mapping
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from caches.tiers.base import TierStats

# Tier reads range from ~50 us (RocksDB) to tens of ms (a Feast batch); buckets cover both ends.
LATENCY_BUCKETS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)
LABELS = ("tier", "namespace")

HITS = Counter("tierserve_tier_hits", "Keys a tier answered", LABELS)
MISSES = Counter("tierserve_tier_misses", "Keys asked of a tier that it did not hold", LABELS)
PROMOTIONS = Counter("tierserve_tier_promotions", "Entries placed into this tier from below", LABELS)
DEMOTIONS = Counter("tierserve_tier_demotions", "Entries moved out of this tier to the one below", LABELS)
DROPS = Counter("tierserve_tier_drops", "Entries dropped over budget (the source of truth keeps them)", LABELS)
ERRORS = Counter("tierserve_tier_errors", "Tier calls that failed (tier unavailable)", LABELS)
BYTES = Gauge("tierserve_tier_bytes", "Bytes held by a tier (key + value, logical)", LABELS)
LATENCY = Histogram(
    "tierserve_tier_read_latency_seconds", "Latency of one batched tier read", LABELS,
    buckets=LATENCY_BUCKETS_S,
)


def namespace_of(key: str) -> str:
    return key.split(":", 1)[0]


def record_read(stats: TierStats, tier: str, keys: list[str], found: Mapping[str, object], seconds: float) -> None:
    """Stats and metrics of one batched read of a tier: latency, hits and misses per namespace."""
    LATENCY.labels(tier=tier, namespace=namespace_of(keys[0])).observe(seconds)
    stats.hits += len(found)
    stats.misses += len(keys) - len(found)
    count_by_namespace(HITS, tier, list(found))
    count_by_namespace(MISSES, tier, [k for k in keys if k not in found])


def count_by_namespace(metric: Counter, tier: str, keys: list[str] | set[str]) -> None:
    """One `inc` per namespace in the batch, not per key: the hot path stays cheap."""
    if not keys:
        return
    for ns, n in _Tally(namespace_of(k) for k in keys).items():
        metric.labels(tier=tier, namespace=ns).inc(n)
