"""Where a chat request's KV blocks already are: longest-cached-prefix routing, tenant-aware.

vLLM's prefix cache lives inside one replica and is salted by the tenant (``cache_salt``), so a
request can reuse KV blocks only on a replica that already served the same tenant the same
leading messages. A conversation's turn N+1 repeats turn N's whole prompt plus the answer, so the
replica that served turn N holds nearly all of turn N+1's prompt.

The router therefore keeps, per router instance, a bounded table from *message-prefix hashes* to
the replica they were last sent to (:class:`PrefixTable`), and sends a request to the replica
holding its longest known prefix when that prefix covers at least :data:`MIN_MATCH_SHARE` of the
prompt. This follows Ray Serve LLM's ``PrefixCacheAffinityRouter`` (a prefix tree per replica with
a match-rate threshold and a load-imbalance escape) and SGLang's cache-aware router, with two
differences: prefixes are whole messages hashed in a chain (no text tree to keep; the chain starts
with the tenant, so another tenant's warm replica never counts), and the fallback is stateless.

Fallback (no long-enough match, e.g. a conversation's first turn, or a turn arriving through another
Ingress replica whose router has not seen the conversation): rendezvous hashing of the
conversation's *root* (tenant, system messages and the first user turn). Every router instance
picks the same replica for a root without shared state, and all turns of a conversation share it,
so multi-turn affinity holds across Ingress replicas too; different conversations spread over
replicas (a short shared system prompt is cheap to prefill once per replica, a conversation's
history is not).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from caches.prompts import Message, message_text

# A known prefix must cover this share of the prompt's text to decide the replica; below it the
# match is only a shared system prompt, and spreading conversations is worth more than one prefill.
MIN_MATCH_SHARE = 0.5
# Prefix hashes remembered per router instance (one per request depth; ~120 bytes each).
TABLE_MAX_ENTRIES = 50_000
# Queue-length gap (requests) above which affinity yields to load balance. Small: on CPU a queued
# request costs seconds, far more than one cold prefill.
IMBALANCE_THRESHOLD = 4


@dataclass(frozen=True)
class PrefixChain:
    """A request's cumulative message hashes and text lengths, shortest prefix first.

    ``hashes[i]`` identifies the tenant plus messages ``0..i``; ``lengths[i]`` is their text length.
    ``root`` is the index of the conversation's root: the first user message (or the last message
    when there is none).
    """

    hashes: tuple[str, ...]
    lengths: tuple[int, ...]
    root: int

    @property
    def total(self) -> int:
        return self.lengths[-1] if self.lengths else 0

    @property
    def root_key(self) -> str:
        return self.hashes[self.root]


def prefix_chain(tenant: str, messages: Sequence[Message]) -> PrefixChain | None:
    """The chain of a chat request, or None when it has no messages to route by."""
    if not messages:
        return None
    digest = hashlib.blake2b(tenant.encode(), digest_size=16)
    hashes: list[str] = []
    lengths: list[int] = []
    total = 0
    root = -1
    for i, message in enumerate(messages):
        role, text = str(message.get("role")), message_text(message)
        digest = digest.copy()
        digest.update(b"\x1e" + role.encode() + b"\x1f" + text.encode())
        hashes.append(digest.hexdigest())
        total += len(text) + 1  # +1: an empty message still adds template tokens
        lengths.append(total)
        if root < 0 and role == "user":
            root = i
    return PrefixChain(tuple(hashes), tuple(lengths), root if root >= 0 else len(hashes) - 1)


def chain_of_call(args: Sequence[Any]) -> PrefixChain | None:
    """The chain of an LLM call ``chat(body, tenant)`` as the router sees its arguments."""
    if len(args) < 2 or not isinstance(args[0], dict) or not isinstance(args[1], str):
        return None
    messages = args[0].get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None
    return prefix_chain(args[1], messages)


def rendezvous_order(key: str, replica_ids: Sequence[str]) -> list[str]:
    """Replica ids by decreasing highest-random-weight score for the key (Thaler & Ravishankar)."""
    def weight(rid: str) -> bytes:
        return hashlib.blake2b(f"{key}\x00{rid}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


class PrefixTable:
    """Prefix hash -> the replica it was last sent to; least recently used forgotten first.

    Not thread-safe: a router instance runs on one event loop.
    """

    def __init__(self, max_entries: int = TABLE_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._home: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._home)

    def record(self, chain: PrefixChain, replica: str) -> None:
        """Every prefix of the request now has its KV blocks on ``replica``."""
        for h in chain.hashes:
            self._home[h] = replica
            self._home.move_to_end(h)
        while len(self._home) > self.max_entries:
            self._home.popitem(last=False)

    def longest(self, chain: PrefixChain, live: set[str]) -> tuple[str, float] | None:
        """The live replica holding the request's longest known prefix, and the prompt share it
        covers; None when no prefix is known on a live replica."""
        for i in range(len(chain.hashes) - 1, -1, -1):
            replica = self._home.get(chain.hashes[i])
            if replica is not None and replica in live:
                return replica, chain.lengths[i] / max(chain.total, 1)
        return None

    def forget_replica(self, replica: str) -> None:
        for h in [h for h, r in self._home.items() if r == replica]:
            del self._home[h]


def choose_home(chain: PrefixChain, table: PrefixTable, replica_ids: Sequence[str],
                min_share: float = MIN_MATCH_SHARE) -> tuple[str, str]:
    """The replica a request should go to and why: ``"prefix"`` (longest known prefix) or
    ``"root"`` (rendezvous on the conversation root)."""
    found = table.longest(chain, set(replica_ids))
    if found is not None and found[1] >= min_share:
        return found[0], "prefix"
    return rendezvous_order(chain.root_key, replica_ids)[0], "root"


def overloaded(home_queue: int | None, known_queues: Sequence[int], threshold: int = IMBALANCE_THRESHOLD) -> bool:
    """Whether the home replica's queue is so much longer than the shortest that affinity yields."""
    return home_queue is not None and bool(known_queues) and home_queue - min(known_queues) > threshold
