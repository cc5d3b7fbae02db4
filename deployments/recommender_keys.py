"""The Recommender's own Redis keys, and where each lives on a Redis Cluster.

A cluster refuses a multi-key command (MGET, a MULTI, a Lua script) whose keys hash to different
slots, so the keys one such command touches share a hash tag. On a single server every name is
what it always was (nothing to migrate on upgrade); on a cluster:

- a user's generation counter, `tierserve:recs:gen:<u>`: on a cluster, the users' RAM tier's
  name for it (`{tierserve:tier:features-<view>:redis#g}tierserve:recs:gen:<u>`), because the
  tier's checked write compares it inside its Lua script with its group's other keys
  (caches/tiers/redis.py `counter_name`);
- the unknown-user memo, `tierserve:recs:unknown:<version>:<u>`: the counter's tag in front, so
  one MGET reads both;
- the items rated by events, `tierserve:recs:rated:<u>`, and the event lock,
  `tierserve:recs:eventlock:<u>`: unchanged, single-key commands only. The rated set is durable
  (no TTL): under a tier group's tag it would move, and be lost, whenever the RAM budget or
  `TIERSERVE_TIER_SHARDS` changes;
- the pending invalidations and the audit stream, `tierserve:recs:pending-invalidations` and
  `tierserve:recs:events`: `{tierserve:recs}:pending-invalidations` and `{tierserve:recs}:events`,
  because an event writes both in one MULTI (deployments/recommender_events.py); so is the index
  of audited events, `tierserve:recs:audited` and `:audited:order` (`{tierserve:recs}:audited`,
  `{tierserve:recs}:audited:order`), which the same MULTI's script reads and writes with the
  audit stream.

Without a RAM tier (`tiers: feast-only`) a cluster still needs the counter and memo in one slot:
they share a per-user tag, `{tierserve:recs:u:<u>}`.

Per request the Recommender reads a user's state in one round trip (`read_user`): MGET(counter,
memo) and SMEMBERS(rated) in one pipeline; on a cluster the MGET is one slot and the pipeline
goes to at most two nodes, written to both before either is read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from caches.generations import counter_ttl_ms, start_missing

RATED_PREFIX = "tierserve:recs:rated:"
GENERATION_PREFIX = "tierserve:recs:gen:"
UNKNOWN_PREFIX = "tierserve:recs:unknown:"
EVENT_LOCK_PREFIX = "tierserve:recs:eventlock:"
PENDING_NAME = "tierserve:recs:pending-invalidations"
AUDIT_NAME = "tierserve:recs:events"
AUDITED_NAME = "tierserve:recs:audited"
# On a cluster: the pending records and the audit stream, written in one MULTI, share this tag.
EVENTS_TAG = "{tierserve:recs}"


def rated_key(user_id: int) -> str:
    """Items a user rated by events since the pipeline's build (a Redis set, no TTL: see
    deployments/recommender_events.py on why events are for known users only)."""
    return f"{RATED_PREFIX}{int(user_id)}"


def generation_key(user_id: int) -> str:
    """A user's generation counter (Redis, no TTL): moved by every event of the user, it keys the
    user's cached results and guards every tier write of their feature row (caches/generations.py).
    The counter's logical name: its Redis name on a cluster is `RecsKeys.generation`."""
    return f"{GENERATION_PREFIX}{int(user_id)}"


def event_lock_key(user_id: int) -> str:
    return f"{EVENT_LOCK_PREFIX}{int(user_id)}"


def pending_key(cluster: bool) -> str:
    return f"{EVENTS_TAG}:pending-invalidations" if cluster else PENDING_NAME


def audit_key(cluster: bool) -> str:
    return f"{EVENTS_TAG}:events" if cluster else AUDIT_NAME


def audited_keys(cluster: bool) -> tuple[str, str]:
    """The index of audited events, (event id -> entry id hash, order list), so a try again of an
    event appends no second audit entry (deployments/recommender_events.py). In the audit
    stream's slot on a cluster: one script writes all three."""
    base = f"{EVENTS_TAG}:audited" if cluster else AUDITED_NAME
    return base, f"{base}:order"


def _tag_of(name: str) -> str:
    """The leading hash tag of a Redis name (`{...}`), '' when it has none."""
    return name[: name.index("}") + 1] if name.startswith("{") and "}" in name else ""


@dataclass(frozen=True)
class RecsKeys:
    """The Redis names of a user's keys for one Recommender wiring (see the module note).
    `counter_name`: the users' RAM tier's Redis name of a generation counter (RedisTier.counter_name:
    tagged on a cluster); None without a RAM tier."""

    cluster: bool
    counter_name: Callable[[str], str] | None = None

    def generation(self, user_id: int) -> str:
        """The Redis name of the user's counter: the very one the tier's checked writes compare
        and its bumps move (reading any other name would key results on a counter events never move)."""
        logical = generation_key(user_id)
        if self.counter_name is not None:
            return self.counter_name(logical)
        return f"{{tierserve:recs:u:{int(user_id)}}}{logical}" if self.cluster else logical

    def unknown(self, version: str, user_id: int) -> str:
        """The "Feast does not know this user" memo: in the counter's slot (one MGET reads both)."""
        return _tag_of(self.generation(user_id)) + f"{UNKNOWN_PREFIX}{version}:{int(user_id)}"

    def rated(self, user_id: int) -> str:
        return rated_key(user_id)

    @property
    def pending(self) -> str:
        return pending_key(self.cluster)

    @property
    def audit(self) -> str:
        return audit_key(self.cluster)


@dataclass
class UserState:
    generation: int  # started from the server clock on first use, moved by every event
    unknown: bool  # a fresh memo says Feast does not know this user (per generation)
    rated_since: set[bytes]  # items rated by events since the pipeline's build


def read_user(client: Any, keys: RecsKeys, version: str, user_id: int,
              counter_ttl_s: float | None = None) -> UserState:
    """The user's generation, unknown-user memo and event-rated items in one round trip (raises
    Redis errors: the caller degrades). The generation counter's TTL is given again
    (`counter_ttl_s`, the rows' TTL): it outlives the copies it tags while the user is active."""
    pipe = client.pipeline(transaction=False)
    counter = keys.generation(user_id)
    # One slot on a cluster. Sent as a raw command: redis-py's cluster pipeline refuses its `mget`
    # method outright (it cannot know the keys share a slot), but routes a one-slot MGET fine.
    pipe.execute_command("MGET", counter, keys.unknown(version, user_id))
    pipe.smembers(keys.rated(user_id))
    if counter_ttl_s:
        pipe.pexpire(counter, counter_ttl_ms(counter_ttl_s))
    (raw_gen, raw_unknown), rated_since, *_ = pipe.execute()
    # A user without a counter yet (or one expired, or a Redis that restarted empty): start it,
    # never read it as 0 (caches/generations.py: an old copy could match a counter that starts
    # again at 0).
    gen = int(raw_gen) if raw_gen is not None else start_missing(client, [counter], counter_ttl_s)[0]
    return UserState(gen, raw_unknown is not None and int(raw_unknown) == gen, set(rated_since or ()))


def remember_unknown(client: Any, keys: RecsKeys, version: str, user_id: int, generation: int, ttl_s: float) -> None:
    """Remember briefly that Feast does not know the user, at this generation (an event moves the
    generation, which makes the memo stale at once)."""
    client.set(keys.unknown(version, user_id), generation, ex=max(1, int(ttl_s)))


# Users whose event-rated items a replica keeps in memory (least recently seen out first): about
# 100 bytes a user plus their items, so a few MB at most.
RATED_MEMO_USERS = 50_000


class RatedMemo:
    """Items each user rated through events, as this replica last learned them (the Redis set, the
    row's `rated_since_build`, an event it applied). The rated filter adds them always; they matter
    when Redis may not be asked: the fallback list after the answer deadline (a slow Redis) must
    not offer an item the user just rated. Bounded; a forgotten user only loses this backstop."""

    def __init__(self, max_users: int = RATED_MEMO_USERS) -> None:
        self.max_users = max_users
        self._items: OrderedDict[int, frozenset[int]] = OrderedDict()
        self._lock = threading.Lock()  # the replica's answer threads share it

    def add(self, user_id: int, items: Iterable[int | bytes | str]) -> None:
        new = frozenset(int(i) for i in items)
        with self._lock:
            old = self._items.pop(user_id, frozenset())
            self._items[user_id] = old | new
            while len(self._items) > self.max_users:
                self._items.popitem(last=False)

    def get(self, user_id: int) -> frozenset[int]:
        with self._lock:
            return self._items.get(user_id, frozenset())
