"""Text -> vector cache for the Encoder, on a TieredCache (RAM Redis + SSD RocksDB, no cold tier).

The encoder itself is the "cold tier": a miss is returned to the caller, who encodes and calls
`put_many`, so the cache never hides a 15 ms model call behind a get. Keys are
`emb:{encoder name}:{encoder version}:{scope}.{sha256(text as written)}`: a new encoder version
misses everywhere at once.

The scope is the tenant (`tenant_scope`), or `shared` for texts the operator precomputed. A cache
shared by tenants would tell one tenant, by how fast `/v1/embeddings` answers (a hit saves the
~15 ms encode), whether another tenant recently sent a text. A tenant reads its own scope, then
the shared one (an operator's catalogue is nobody's activity); it writes only its own.

Texts are not normalised: "3²" and "32" are different texts, and the encoder is the one to decide
how close their vectors are.
Vectors are raw float32 bytes (384 x 4 = 1.5 KiB): no encoding cost, exact round trip.

    python -m caches.embedding precompute --file catalogue.jsonl [--batch-size 64]
    python -m caches.embedding precompute --file items.csv --column title

fills the cache for a known catalogue ahead of traffic (progress bar; already cached texts are
skipped, so a rerun after a crash resumes).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from caches.keys import digest, make_key, safe_part
from caches.tiered import TieredCache

NAMESPACE = "emb"
# Texts precomputed by the operator (`precompute`): readable by every tenant, written by none.
SHARED_SCOPE = "shared"
DEFAULT_RAM_BUDGET = 64 << 20
DEFAULT_SSD_BUDGET = 2 << 30
PRECOMPUTE_BATCH = 64


def tenant_scope(tenant: str) -> str:
    """The key scope of a tenant's embeddings ("t." keeps every tenant name apart from `shared`)."""
    return "t." + safe_part(tenant)


def _per_text(scope: str | Sequence[str], texts: list[str]) -> list[str]:
    """One scope for every text, or one per text (the Encoder's batch mixes tenants)."""
    scopes = [scope] * len(texts) if isinstance(scope, str) else list(scope)
    if len(scopes) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(scopes)} scopes")
    return scopes


# Embeddings never go stale (the key is the encoder and the text), but every entry still gets a
# TTL: a RAM value the placement lost track of (a write that failed after the policy's decision)
# would otherwise hold Redis memory for ever, and a Redis under `volatile-lru` can evict only keys
# that have one. A text read again is written again (a promotion), so a month of no reads, not of
# age, is what ends an entry.
EMBEDDING_TTL_S = 30 * 86_400.0


class EmbeddingCache:
    def __init__(self, tiered: TieredCache, encoder_name: str, encoder_version: str, dim: int) -> None:
        self.tiered = tiered
        self.encoder_name = encoder_name.replace(":", "_")
        self.encoder_version = encoder_version.replace(":", "_")
        self.dim = dim

    @classmethod
    def open(
        cls, *, redis_url: str, rocksdb_dir: Path, ram_budget_bytes: int, ssd_budget_bytes: int,
        encoder_name: str, encoder_version: str, dim: int,
    ) -> EmbeddingCache:
        tiered = TieredCache.open(
            redis_url=redis_url, rocksdb_dir=rocksdb_dir, ram_budget_bytes=ram_budget_bytes,
            ssd_budget_bytes=ssd_budget_bytes, cold=None, name="embeddings", entry_bytes=dim * 4 + 100,
            ttl_s=EMBEDDING_TTL_S, ttl_from_source=False,  # never stale: a move starts the TTL again
        )
        return cls(tiered, encoder_name, encoder_version, dim)

    def key(self, text: str, scope: str = SHARED_SCOPE) -> str:
        # scope, then the fixed-length digest: no two (scope, text) pairs share an ident
        return make_key(NAMESPACE, self.encoder_name, self.encoder_version, f"{scope}.{digest(text)}")

    def get_many(self, texts: list[str], scope: str | Sequence[str] = SHARED_SCOPE
                 ) -> tuple[dict[int, np.ndarray], list[int]]:
        """(index -> vector for hits, indices missing), each text looked up in its scope (one for
        all, or one per text) and then in the shared one; duplicates share one lookup."""
        own = [self.key(t, sc) for t, sc in zip(texts, _per_text(scope, texts), strict=True)]
        shared = [self.key(t) for t in texts]
        result = self.tiered.get_many(list(dict.fromkeys(own + shared)))
        hits: dict[int, np.ndarray] = {}
        missing: list[int] = []
        for i, keys in enumerate(zip(own, shared, strict=True)):
            vec = next((v for v in (self._vector(result.values.get(k)) for k in keys) if v is not None), None)
            if vec is None:
                missing.append(i)
            else:
                hits[i] = vec
        return hits, missing

    def _vector(self, raw: bytes | None) -> np.ndarray | None:
        vec = np.frombuffer(raw, dtype=np.float32) if raw is not None else None
        if vec is None or vec.shape[0] != self.dim:
            return None  # absent, or written by an encoder of another size: recompute
        return vec.copy()  # frombuffer is read-only and aliases the reply buffer

    def put_many(self, texts: list[str], vectors: np.ndarray, scope: str | Sequence[str] = SHARED_SCOPE) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(texts), self.dim):
            raise ValueError(f"expected vectors of shape ({len(texts)}, {self.dim}), got {vectors.shape}")
        self.tiered.put_many({self.key(t, sc): vectors[i].tobytes()
                              for i, (t, sc) in enumerate(zip(texts, _per_text(scope, texts), strict=True))})

    def get_or_encode(self, texts: list[str], encode: object = None) -> np.ndarray:
        """All vectors, encoding (and caching) only the misses."""
        if encode is None:
            from caches.encoder import encode as encode_fn
        else:
            encode_fn = encode  # type: ignore[assignment]
        hits, missing = self.get_many(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, v in hits.items():
            out[i] = v
        if missing:
            fresh = np.asarray(encode_fn([texts[i] for i in missing]), dtype=np.float32)  # type: ignore[operator]
            out[missing] = fresh
            self.put_many([texts[i] for i in missing], fresh)
        return out

    def close(self) -> None:
        self.tiered.close()


# -- bulk pre-compute -----------------------------------------------------------------------------
def read_texts(path: Path, column: str | None = None) -> Iterator[str]:
    if path.suffix == ".jsonl":
        field = column or "text"
        with path.open() as f:
            for line in f:
                if line.strip():
                    value = json.loads(line).get(field)
                    if isinstance(value, str) and value.strip():
                        yield value
    elif path.suffix == ".csv":
        if not column:
            raise SystemExit("--column is required for a .csv file")
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                value = row.get(column)
                if value and value.strip():
                    yield value
    else:
        raise SystemExit(f"{path}: expected .jsonl (field 'text') or .csv (with --column)")


def precompute(cache: EmbeddingCache, texts: list[str], batch_size: int = PRECOMPUTE_BATCH,
               encode: object = None, progress: bool = True) -> dict[str, int]:
    if encode is None:
        from caches.encoder import encode as encode_fn
    else:
        encode_fn = encode  # type: ignore[assignment]
    unique = list(dict.fromkeys(texts))
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    encoded = skipped = 0
    with Progress(TextColumn("[bold]precompute"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task("encode", total=len(unique))
        for i in range(0, len(unique), batch_size):
            chunk = unique[i : i + batch_size]
            _, missing = cache.get_many(chunk)
            todo = [chunk[j] for j in missing]
            if todo:
                cache.put_many(todo, np.asarray(encode_fn(todo), dtype=np.float32))  # type: ignore[operator]
            encoded += len(todo)
            skipped += len(chunk) - len(todo)
            bar.update(task, advance=len(chunk))
    return {"texts": len(texts), "unique": len(unique), "encoded": encoded, "already_cached": skipped}


def _cli(argv: list[str] | None = None) -> None:
    from caches.encoder import EMBEDDING_DIM, encoder_identity

    parser = argparse.ArgumentParser(prog="python -m caches.embedding", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("precompute", help="encode a catalogue into the cache")
    pre.add_argument("--file", type=Path, required=True)
    pre.add_argument("--column", default=None, help="csv column (or jsonl field; default 'text')")
    pre.add_argument("--batch-size", type=int, default=PRECOMPUTE_BATCH)
    pre.add_argument("--limit", type=int, default=None)
    pre.add_argument("--rocksdb-dir", type=Path,
                     default=Path(os.environ.get("TIERSERVE_EMBEDDING_ROCKSDB", Path(tempfile.gettempdir()) / "tierserve-emb-precompute")))
    pre.add_argument("--ram-budget-bytes", type=int, default=DEFAULT_RAM_BUDGET)
    pre.add_argument("--ssd-budget-bytes", type=int, default=DEFAULT_SSD_BUDGET)
    args = parser.parse_args(argv)

    texts = list(read_texts(args.file, args.column))[: args.limit]
    redis_url = os.environ.get("REDIS_URL")
    server = None
    if not redis_url:
        from caches.redis_server import EmbeddedRedis

        server = EmbeddedRedis().start()
        redis_url = server.url
        print(f"REDIS_URL not set: using an embedded Redis at {redis_url} (gone when this exits)", file=sys.stderr)
    cache = EmbeddingCache.open(redis_url=redis_url, rocksdb_dir=args.rocksdb_dir, ram_budget_bytes=args.ram_budget_bytes,
                                ssd_budget_bytes=args.ssd_budget_bytes, encoder_name=encoder_identity()[0],
                                encoder_version=encoder_identity()[1], dim=EMBEDDING_DIM)
    try:
        print(json.dumps(precompute(cache, texts, args.batch_size, progress=True)))
    finally:
        cache.close()
        if server is not None:
            server.stop()


def main(argv: list[str] | None = None) -> None:
    """Entry point (also `tierserve precompute-embeddings`): the `precompute` word is optional."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("precompute", "-h", "--help"):
        args = ["precompute", *args]
    _cli(args)


if __name__ == "__main__":
    main()
