"""The pure parts of the fault matrix (benchmarks/fault_matrix.py): what counts as stale, as a lost
write, where a fault sits in a row, the budgets, and the table. No I/O here: unit-tested.

Freshness, as the recommender exposes it: every personal answer carries `user_activity.n_ratings`
(the ratings count in the feature row it was computed from) and leaves out the items the user has
rated. An event answered 202 says the row's new `n_ratings`. So an answer to a request *sent
after* that 202 arrived is stale when its `n_ratings` is behind the event's, or when it recommends
an item the user rated in an accepted event.

An event answered `"recorded": "queued"` (a dependency was down: kept on the replica's disk,
applied when it is back) says the answers will not reflect it until then: answers behind only
such events are "announced", like an invalidation the 202 said was pending. Whether queued events
were applied in the end is checked by the lost-write count and the final reads (`final_reads`):
after recovery every event user's answer must show the row Feast ends with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

FRESH, STALE_FEATURES, STALE_RATED_ITEM, UNCHECKED = "fresh", "stale_features", "stale_rated_item", "unchecked"
# Stale, but the event's 202 said so (`"invalidation": "pending"`: Redis failed after the push and
# the invalidation is being retried): announced, not silent. Counted apart from the two above.
STALE_ANNOUNCED = "stale_announced"
MIB = 1 << 20


@dataclass(frozen=True)
class AcceptedEvent:
    """A rating event the app answered 202, with what the answer said."""

    user_id: int
    item_id: int
    n_ratings: int | None  # the user's row after the event (from the 202 answer; None: queued)
    received_at: float  # monotonic time the 202 arrived
    pending: bool = False  # the 202 said its invalidation had not reached every replica yet
    queued: bool = False  # the 202 said the event waits on the replica's disk for a dependency


@dataclass(frozen=True)
class RecsAnswer:
    user_id: int
    sent_at: float  # monotonic time the request left
    status: int
    body: Mapping[str, Any]


def classify(answer: RecsAnswer, events: Iterable[AcceptedEvent]) -> str:
    """FRESH / STALE_* / UNCHECKED for one answer, given the user's accepted events.

    Only events whose 202 arrived before the request was sent count (a request racing its event
    may see either row). Answers that are not 200, or not personal (cold start), are UNCHECKED:
    a 503 is a refusal, not a stale answer, and is counted as a 5xx elsewhere."""
    before = [e for e in events if e.user_id == answer.user_id and e.received_at <= answer.sent_at]
    if not before or answer.status != 200:
        return UNCHECKED
    applied = [e for e in before if not e.queued]
    items = {int(i["item_id"]) for i in answer.body.get("items") or [] if "item_id" in i}
    activity = answer.body.get("user_activity") or {}
    n = activity.get("n_ratings")
    if items & {e.item_id for e in applied}:
        verdict = STALE_RATED_ITEM
    elif items & {e.item_id for e in before}:
        return STALE_ANNOUNCED  # an item rated only in queued events: the 202 said "not yet"
    elif n is None:
        return UNCHECKED
    elif applied and int(n) < max(int(e.n_ratings or 0) for e in applied):
        verdict = STALE_FEATURES
    else:
        return FRESH
    return STALE_ANNOUNCED if any(e.pending for e in before) else verdict


@dataclass
class Freshness:
    counts: dict[str, int] = field(default_factory=lambda: {FRESH: 0, STALE_FEATURES: 0, STALE_RATED_ITEM: 0,
                                                             STALE_ANNOUNCED: 0, UNCHECKED: 0})
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def stale(self) -> int:
        return self.counts[STALE_FEATURES] + self.counts[STALE_RATED_ITEM]


def freshness(answers: Iterable[RecsAnswer], events: Iterable[AcceptedEvent], t0: float = 0.0,
              max_samples: int = 10) -> Freshness:
    by_user: dict[int, list[AcceptedEvent]] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    out = Freshness()
    for a in answers:
        verdict = classify(a, by_user.get(a.user_id, ()))
        out.counts[verdict] += 1
        if verdict in (STALE_FEATURES, STALE_RATED_ITEM, STALE_ANNOUNCED) and len(out.samples) < max_samples:
            evs = [e for e in by_user[a.user_id] if e.received_at <= a.sent_at]
            out.samples.append({"verdict": verdict, "user_id": a.user_id, "t_s": round(a.sent_at - t0, 2),
                                "answer_n_ratings": (a.body.get("user_activity") or {}).get("n_ratings"),
                                "event_n_ratings": max((e.n_ratings or 0) for e in evs),
                                "queued_events": sum(e.queued for e in evs),
                                "rated": sorted({e.item_id for e in evs}),
                                "sources": a.body.get("sources"), "cached": a.body.get("cached"),
                                "degraded": a.body.get("degraded")})
    return out


def final_reads(answers: Mapping[int, Mapping[str, Any]], final_rows: Mapping[int, int | None],
                events: Iterable[AcceptedEvent]) -> dict[str, Any]:
    """The last answer per event user, read after recovery (and after queued events had time to
    be applied), against the row Feast ends with: stale when its `n_ratings` differs, or when it
    recommends an item of any accepted event (queued ones included: by now they are applied)."""
    rated: dict[int, set[int]] = {}
    for e in events:
        rated.setdefault(e.user_id, set()).add(e.item_id)
    stale: list[dict[str, Any]] = []
    checked = 0
    for user, body in answers.items():
        if user not in rated:
            continue
        checked += 1
        items = {int(i["item_id"]) for i in body.get("items") or [] if "item_id" in i}
        n = (body.get("user_activity") or {}).get("n_ratings")
        if items & rated[user] or n is None or int(n) != int(final_rows.get(user) or 0):
            stale.append({"user_id": user, "answer_n_ratings": n, "feast_n_ratings": final_rows.get(user),
                          "rated_items_served": sorted(items & rated[user]), "degraded": body.get("degraded")})
    return {"checked": checked, "stale": len(stale), "samples": stale[:10]}


def lost_writes(initial: Mapping[int, int | None], final: Mapping[int, int | None],
                accepted: Mapping[int, int]) -> tuple[int, int, dict[int, dict[str, int]]]:
    """(lost, phantom, per-user detail) from the Feast rows' `n_ratings` before and after a row
    and the number of rating events answered 202 per user. Lost: accepted but not in Feast.
    Phantom: in Feast but never answered 202 (e.g. the answer died with a killed replica) - not a
    loss, but a client that retries it counts the rating twice."""
    lost = phantom = 0
    detail: dict[int, dict[str, int]] = {}
    for user in set(initial) | set(final) | set(accepted):
        before, after, ok = int(initial.get(user) or 0), int(final.get(user) or 0), int(accepted.get(user, 0))
        written = after - before
        missing, extra = max(0, ok - written), max(0, written - ok)
        lost += missing
        phantom += extra
        if missing or extra:
            detail[user] = {"before": before, "after": after, "accepted": ok}
    return lost, phantom, detail


@dataclass(frozen=True)
class Window:
    """When a row's fault starts and ends, as fractions of its duration."""

    start: float = 0.2
    end: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"fault window must satisfy 0 <= start < end <= 1 (got {self.start}, {self.end})")

    def seconds(self, duration_s: float) -> tuple[float, float]:
        return self.start * duration_s, self.end * duration_s

    def kill_times(self, duration_s: float, kills: int) -> list[float]:
        """Instant faults (a replica killed): `kills` moments spread evenly over the window."""
        a, b = self.seconds(duration_s)
        if kills <= 1:
            return [a]
        return [a + (b - a) * i / (kills - 1) for i in range(kills)]


# Byte budgets of what the app keeps in Redis (deployments/config.py). Fields another version of
# the settings lacks are skipped, so the harness reads whatever budgets the app has.
# (section, field, how many times it is spent): the recommender's RAM budget is split between
# its user (0.25) and item (1.0) feature caches (deployments/recommender_model.py).
REDIS_BUDGET_FIELDS = (
    ("cache", "result_max_bytes", 1.0),
    ("cache", "semantic_max_bytes", 1.0),
    ("cache", "embedding_ram_budget_bytes", 1.0),
    ("recommender", "ram_budget_bytes", 1.25),
    ("recommender", "result_max_bytes", 1.0),
)


def redis_budget(settings: Mapping[str, Any]) -> dict[str, int]:
    """The configured Redis byte budgets, by `section.field`, and their `total`."""
    out: dict[str, int] = {}
    for section, name, times in REDIS_BUDGET_FIELDS:
        value = (settings.get(section) or {}).get(name)
        if isinstance(value, int) and value > 0:
            out[f"{section}.{name}"] = int(value * times)
    out["total"] = sum(out.values())
    return out


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / MIB:.0f}"


COLUMNS = ("fault", "minutes", "requests", "2xx (fallback)", "5xx (500/503/other)", "transport errors",
           "events 202 (queued) / refused", "stale (announced) / checked", "stale after recovery / users",
           "lost (phantom)", "peak Redis MiB / budget", "peak replica RSS MiB (before)")


def table_row(row: Mapping[str, Any]) -> list[str]:
    r, e, m = row["requests"], row["events"], row["memory"]
    five = r["5xx"]
    final = row.get("final_reads") or {"stale": "n/a", "checked": "n/a"}
    return [
        row["fault"], f"{row['elapsed_s'] / 60:.1f}", str(r["sent"]), f"{r['2xx']} ({r.get('fallback', 0)})",
        f"{five['total']} ({five['500']}/{five['503']}/{five['other']})", str(r["transport_errors"]),
        f"{e['accepted']} ({e.get('queued', 0)}) / {e['refused']}",
        f"{row['stale']['stale']} ({row['stale'].get(STALE_ANNOUNCED, 0)}) / {row['stale']['checked']}",
        f"{final['stale']} / {final['checked']}",
        f"{row['writes']['lost']} ({row['writes']['phantom']})",
        f"{_mib(m['redis_peak_bytes'])} / {_mib(m['redis_budget_bytes'])}",
        f"{_mib(m['replica_rss_peak_bytes'])} ({_mib(m['replica_rss_before_bytes'])})",
    ]


def markdown(rows: Iterable[Mapping[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"
