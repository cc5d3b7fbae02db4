"""Prefix-aware request routing across LLM replicas, on Ray Serve's request-router API.

The decision (longest cached prefix, tenant-aware, stateless rendezvous fallback on the
conversation root, load-imbalance escape) is :mod:`caches.prefix_affinity`; this module wires it
into Serve: it ranks the candidate replicas and records where each request went.
"""

from __future__ import annotations

from typing import Any

from ray.serve._private.common import ReplicaID
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from caches.prefix_affinity import (
    IMBALANCE_THRESHOLD,
    MIN_MATCH_SHARE,
    PrefixTable,
    chain_of_call,
    choose_home,
    overloaded,
)


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, imbalance_threshold: int = IMBALANCE_THRESHOLD,
                         min_match_share: float = MIN_MATCH_SHARE, **_: Any) -> None:
        self.imbalance_threshold = imbalance_threshold
        self.min_match_share = min_match_share
        self.table = PrefixTable()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        chain = chain_of_call(pending_request.args) if pending_request is not None else None
        if chain is None or len(candidate_replicas) == 1:
            return [candidate_replicas]  # one rank: the base router takes the shortest queue
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        home_id, _why = choose_home(chain, self.table, list(by_id), self.min_match_share)
        cache = self.replica_queue_len_cache
        known = [n for n in (cache.get(r.replica_id) for r in candidate_replicas) if n is not None]
        if overloaded(cache.get(by_id[home_id].replica_id), known, self.imbalance_threshold):
            return [candidate_replicas]  # the request goes elsewhere; on_request_routed records where
        # First rank: the prefix's home. The base router falls through to the rest when the home
        # replica is at max_ongoing_requests.
        return [[by_id[home_id]], [r for rid, r in by_id.items() if rid != home_id]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        chain = chain_of_call(pending_request.args)
        if chain is not None:
            self.table.record(chain, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.forget_replica(replica_id.unique_id)
