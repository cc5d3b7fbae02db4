"""Encoder deployment: sentence-transformers behind Ray Serve's own dynamic batching.

Single queries arrive one per request; `@serve.batch` gathers those in flight into one forward
pass (about 15 ms a query alone, about 200/s batched on 2 cores). The embedding cache sits in
front, so a text seen before (on any replica) costs a Redis MGET instead of a forward pass.

Encoding (and the cache's Redis and RocksDB calls around it) runs on one worker thread, never on
the replica's event loop: a forward pass of a big `/v1/embeddings` batch takes seconds on CPU, and
on the loop it would stall every other call of the replica (`info`, the chat path's `embed` with
its 2 s deadline) until it ended. One thread, because the forward pass already uses every core
(torch's intra-op threads): more threads would only split them. A big API batch is encoded in
slices of `API_SLICE` texts, each its own job on that thread, so the chat path's small batches
queue between slices instead of behind the whole batch.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from caches.embedding import tenant_scope
from caches.encoder import EMBEDDING_DIM, count_tokens, encode, encoder_identity, load_encoder
from caches.tiered import claim_dir, reclaim_dead_dirs
from deployments import metrics

log = logging.getLogger("tierserve.encoder")

# Texts per job of a `/v1/embeddings` batch on the encoding thread (see the module note): about
# the forward pass of one `@serve.batch` (32) twice over, so a chat query waits one slice at most.
API_SLICE = 64


@serve.deployment(name="Encoder", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
class EncoderDeployment:
    def __init__(self, redis_url: str | None, state_dir: str, ram_budget_bytes: int, ssd_budget_bytes: int) -> None:
        load_encoder()
        self.name, self.version = encoder_identity()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
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
    async def _embed_batch(self, texts: list[str], tenants: list[str], stores: list[bool]) -> list[list[float]]:
        return (await self._off_loop(texts, tenants, stores)).tolist()

    async def _off_loop(self, texts: list[str], tenants: list[str], stores: list[bool] | None = None) -> np.ndarray:
        """`_embed` on the encoding thread; the event loop stays free meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, self._embed, texts, tenants, stores)

    def _embed(self, texts: list[str], tenants: list[str], stores: list[bool] | None = None) -> np.ndarray:
        """Vectors of `texts`, each cached under its tenant's scope (caches/embedding.py says why),
        except those whose `stores` is False: a `Cache-Control: no-store` request's question is
        stored nowhere, its vector included (a vector can be partly inverted to its text)."""
        out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        missing = list(range(len(texts)))
        scopes = [tenant_scope(t) for t in tenants]
        if self.cache is not None:
            found, missing = self.cache.get_many(texts, scopes)
            for i, vec in found.items():
                out[i] = vec
        if missing:
            fresh = encode([texts[i] for i in missing])
            out[missing] = fresh
            kept = [j for j, i in enumerate(missing) if stores is None or stores[i]]
            if self.cache is not None and kept:
                self.cache.put_many([texts[missing[j]] for j in kept], fresh[kept], [scopes[missing[j]] for j in kept])
        return out

    async def embed(self, text: str, tenant: str, store: bool = True) -> list[float]:
        """One text's vector (batched with others'); `store=False`: not written to the cache. Kept
        as it was for callers from before `embed_named` (an Ingress replica of the previous release
        during a rolling update)."""
        return await self._embed_batch(text, tenant, store)

    async def embed_named(self, text: str, tenant: str, store: bool = True) -> dict[str, Any]:
        """`embed`, with who made the vector: ``{"vector", "name", "version"}``. The identity travels
        with the vector because the caller files it in a semantic scope that names an encoder:
        during a rolling update replicas of two encoders answer side by side, and only the replica
        that encoded a text can say which embedding space its vector is in (deployments/chat.py
        checks it)."""
        vector = await self._embed_batch(text, tenant, store)
        return {"vector": vector, "name": self.name, "version": self.version}

    async def embed_for_api(self, texts: list[str], tenant: str) -> tuple[np.ndarray, int]:
        """The `/v1/embeddings` answer's parts: float32 rows (kept as an array: base64 is their
        bytes) and the token count for `usage`."""
        slices = [texts[i : i + API_SLICE] for i in range(0, len(texts), API_SLICE)]
        parts = [await self._off_loop(part, [tenant] * len(part)) for part in slices]  # one at a time
        tokens = await asyncio.get_running_loop().run_in_executor(self._worker, count_tokens, texts)
        vectors = np.concatenate(parts) if parts else np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return vectors, sum(tokens)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "dim": EMBEDDING_DIM}

    def metrics_text(self) -> tuple[str, bytes]:
        return metrics.replica_exposition()
