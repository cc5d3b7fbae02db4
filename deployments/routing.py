"""Prefix-aware request routing across LLM replicas, on Ray Serve's request-router API.

vLLM's prefix cache lives inside one replica: a request whose shared prefix (tenant + system
prompt + earlier turns) was served by replica A finds its KV blocks only on A. Power-of-two
routing spreads a prefix over every replica, so each replica pays its prefill once. This router
sends a prefix to the replica picked by rendezvous hashing of the prefix key, so:
  * every ingress replica picks the same LLM replica for a prefix with no shared state,
  * adding or removing a replica moves only the prefixes that hashed to it,
  * when the preferred replica is overloaded (its queue longer than the least loaded one by
    IMBALANCE_THRESHOLD), the request goes to the least loaded replica instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from caches.prompts import shared_prefix_text

# Queue-length gap (requests) above which affinity yields to load balance. Small: on CPU a queued
# request costs seconds, far more than one cold prefill of a short system prompt.
IMBALANCE_THRESHOLD = 4


def prefix_key(args: Sequence[Any]) -> str | None:
    """The routing key of an LLM call `chat(body, tenant)`: everything but the last user turn."""
    if len(args) < 2 or not isinstance(args[0], dict) or not isinstance(args[0].get("messages"), list):
        return None
    return f"{args[1]}\x00{shared_prefix_text(args[0]['messages'])}"


def rendezvous_order(key: str, replica_ids: Sequence[str]) -> list[str]:
    """Replica ids by decreasing highest-random-weight score for the key."""
    def weight(rid: str) -> bytes:
        return hashlib.blake2b(f"{key}\x00{rid}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, imbalance_threshold: int = IMBALANCE_THRESHOLD, **_: Any) -> None:
        self.imbalance_threshold = imbalance_threshold

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = prefix_key(pending_request.args) if pending_request is not None else None
        if key is None or len(candidate_replicas) == 1:
            return [candidate_replicas]  # one rank: the base router takes the shortest queue
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ordered = [by_id[rid] for rid in rendezvous_order(key, list(by_id))]
        cache = self.replica_queue_len_cache
        lengths = [cache.get(r.replica_id) for r in ordered]
        known = [n for n in lengths if n is not None]
        if lengths[0] is not None and known and lengths[0] - min(known) > self.imbalance_threshold:
            return [candidate_replicas]
        # First rank: the prefix's home. The base router falls through to the next rank when the
        # home replica is at max_ongoing_requests.
        return [[ordered[0]], ordered[1:]]
