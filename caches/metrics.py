"""Prometheus metrics of the tiered cache: one family per figure the operators ask about.

Hits, misses, promotions, demotions, drops, errors, bytes and read latency, labelled by `tier`
(redis | rocksdb | feast) and by the key's `namespace` (features, emb, ...), never by key: label
cardinality stays tiny. The objects are module-level so that several caches in one process share
them instead of failing on duplicate registration.

Every family writes to two places: this process's prometheus-client registry (the per-replica
debug page and `/v1/cache/stats` read it) and, once :func:`export_through` installed one, an
exporter that the serving layer supplies. `deployments/metrics.py` installs Ray Serve's metrics
API there, so each replica's series reach Ray's per-node metrics endpoint tagged with deployment
and replica; `caches/` itself stays free of Ray.
"""

from __future__ import annotations

from collections import Counter as _Tally
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from caches.tiers.base import TierStats

Kind = Literal["counter", "gauge", "histogram"]


class Sink(Protocol):
    """Where an exporter records one value of a family with its labels as tags."""

    def record(self, value: float, tags: dict[str, str]) -> None: ...


# (kind, name without `_total`, description, label names, histogram buckets) -> a sink, or None
# when it cannot export from this process (yet): asked again on the next record.
Exporter = Callable[[Kind, str, str, tuple[str, ...], Sequence[float]], "Sink | None"]
_exporter: Exporter | None = None


def export_through(exporter: Exporter | None) -> None:
    """Send every family's values to ``exporter`` too (idempotent; None stops exporting)."""
    global _exporter
    _exporter = exporter
    for family in _FAMILIES:
        family.sink = None


class _Child:
    __slots__ = ("_family", "_local", "_tags")

    def __init__(self, family: Family, local: Any, tags: dict[str, str]) -> None:
        self._family, self._local, self._tags = family, local, tags

    def inc(self, amount: float = 1.0) -> None:
        self._local.inc(amount)
        self._family.export(amount, self._tags)

    def set(self, value: float) -> None:
        self._local.set(value)
        self._family.export(value, self._tags)

    def observe(self, value: float) -> None:
        self._local.observe(value)
        self._family.export(value, self._tags)


class Family:
    """A prometheus-client metric whose values are also handed to the installed exporter.

    Same calls as prometheus-client (`labels(...)` then `inc`/`set`/`observe`; `collect()`), so
    call sites do not know about exporters.
    """

    def __init__(self, kind: Kind, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float] = ()) -> None:
        self.kind, self.name, self.documentation = kind, name, documentation
        self.labelnames, self.buckets = tuple(labelnames), tuple(buckets)
        if kind == "counter":
            self.local: Any = Counter(name, documentation, self.labelnames)
        elif kind == "gauge":
            self.local = Gauge(name, documentation, self.labelnames)
        else:
            self.local = Histogram(name, documentation, self.labelnames, buckets=self.buckets)
        self.sink: Sink | None = None
        _FAMILIES.append(self)

    def labels(self, *values: str, **kw: str) -> _Child:
        tags = dict(zip(self.labelnames, map(str, values), strict=True)) if values else {k: str(v) for k, v in kw.items()}
        return _Child(self, self.local.labels(**tags), tags)

    def export(self, value: float, tags: dict[str, str]) -> None:
        if _exporter is None:
            return
        if self.sink is None:
            self.sink = _exporter(self.kind, self.name, self.documentation, self.labelnames, self.buckets)
            if self.sink is None:
                return
        self.sink.record(value, tags)

    def collect(self) -> Any:
        return self.local.collect()


_FAMILIES: list[Family] = []

# Tier reads range from ~50 us (RocksDB) to tens of ms (a Feast batch); buckets cover both ends.
LATENCY_BUCKETS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)
LABELS = ("tier", "namespace")

HITS = Family("counter", "tierserve_tier_hits", "Keys a tier answered", LABELS)
MISSES = Family("counter", "tierserve_tier_misses", "Keys asked of a tier that it did not hold", LABELS)
PROMOTIONS = Family("counter", "tierserve_tier_promotions", "Entries placed into this tier from below", LABELS)
DEMOTIONS = Family("counter", "tierserve_tier_demotions", "Entries moved out of this tier to the one below", LABELS)
DROPS = Family("counter", "tierserve_tier_drops", "Entries dropped over budget (the source of truth keeps them)", LABELS)
ERRORS = Family("counter", "tierserve_tier_errors", "Tier calls that failed (tier unavailable)", LABELS)
# `namespace` is the cache's name here (the user and the item feature caches each have their own
# tiers and totals). A RAM tier's value is the cache's shared total in Redis, the same on every
# replica (take the max across replicas); an SSD tier's is the replica's own (sum them).
BYTES = Family("gauge", "tierserve_tier_bytes", "Bytes held by a tier of one cache (key + value, logical)", LABELS)
LATENCY = Family(
    "histogram", "tierserve_tier_read_latency_seconds", "Latency of one batched tier read", LABELS,
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


def count_by_namespace(metric: Family, tier: str, keys: list[str] | set[str]) -> None:
    """One `inc` per namespace in the batch, not per key: the hot path stays cheap."""
    if not keys:
        return
    for ns, n in _Tally(namespace_of(k) for k in keys).items():
        metric.labels(tier=tier, namespace=ns).inc(n)
