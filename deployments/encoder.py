"""Encoder deployment: sentence-transformers behind Ray Serve's own dynamic batching.

Single queries arrive one per request; `@serve.batch` gathers those in flight into one forward
pass (about 15 ms a query alone, about 200/s batched on 2 cores). The embedding cache sits in
front, so a text seen before (on any replica) costs a Redis MGET instead of a forward pass.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from caches.encoder import EMBEDDING_DIM, count_tokens, encode, encoder_identity, load_encoder
from caches.tiered import claim_dir, reclaim_dead_dirs
from deployments import metrics

log = logging.getLogger("tierserve.encoder")


@serve.deployment(name="Encoder", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
class EncoderDeployment:
    def __init__(self, redis_url: str | None, state_dir: str, ram_budget_bytes: int, ssd_budget_bytes: int) -> None:
        load_encoder()
        self.name, self.version = encoder_identity()
        self.cache = None
        if redis_url:
            try:
                from caches.embedding import EmbeddingCache

                replica = serve.get_replica_context().replica_id.unique_id
                root = Path(state_dir) / "rocksdb"
                own = root / f"embeddings-{replica}"
                # this replica's SSD directory is its own while it lives; dead replicas' are reclaimed
                self._owner = claim_dir(own)
                reclaim_dead_dirs(root, prefix="embeddings-", keep=own)
                self.cache = EmbeddingCache.open(
                    redis_url=redis_url,
                    rocksdb_dir=own,
                    ram_budget_bytes=ram_budget_bytes,
                    ssd_budget_bytes=ssd_budget_bytes,
                    encoder_name=self.name,
                    encoder_version=self.version,
                    dim=EMBEDDING_DIM,
                )
            except ImportError:
                log.warning("embedding cache not available; encoding every text")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _embed_batch(self, texts: list[str]) -> list[list[float]]:
        # In a thread: the cache's Redis calls and the forward pass would otherwise hold this
        # replica's event loop (a slow Redis stalled every caller, `info` included).
        return (await asyncio.to_thread(self._embed, texts)).tolist()

    def _embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        missing = list(range(len(texts)))
        if self.cache is not None:
            found, missing = self.cache.get_many(texts)
            for i, vec in found.items():
                out[i] = vec
        if missing:
            fresh = encode([texts[i] for i in missing])
            out[missing] = fresh
            if self.cache is not None:
                self.cache.put_many([texts[i] for i in missing], fresh)
        return out

    async def embed(self, text: str) -> list[float]:
        return await self._embed_batch(text)

    async def embed_for_api(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """The `/v1/embeddings` answer's parts: float32 rows (kept as an array: base64 is their
        bytes) and the token count for `usage`."""
        return await asyncio.to_thread(self._embed, texts), sum(count_tokens(texts))

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "dim": EMBEDDING_DIM}

    def metrics_text(self) -> tuple[str, bytes]:
        return metrics.replica_exposition()
