"""EmbeddingCache on real Redis + RocksDB; a deterministic stand-in encoder keeps it fast (the
real encoder is exercised by the Encoder deployment's own tests)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import redis

from caches.embedding import SHARED_SCOPE, EmbeddingCache, precompute, read_texts, tenant_scope


@pytest.fixture
def redis_url(both_redis_urls: str) -> str:
    """Every test here that uses Redis runs on the single server and on the 3-master cluster."""
    return both_redis_urls


DIM = 384


class FakeEncoder:
    def __init__(self) -> None:
        self.calls = 0
        self.texts = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.texts += len(texts)
        out = np.stack([
            np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).standard_normal(DIM)
            for t in texts
        ]).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def open_cache(redis_url: str, path: Path, version: str = "v1") -> EmbeddingCache:
    return EmbeddingCache.open(redis_url=redis_url, rocksdb_dir=path, ram_budget_bytes=200 * 1700,
                               ssd_budget_bytes=10**7, encoder_name="fake-minilm", encoder_version=version, dim=DIM)


def test_get_put_roundtrip_and_exact_text_keys(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    cache = open_cache(redis_url, tmp_path / "ssd")
    enc = FakeEncoder()
    try:
        texts = ["How do I reset my PIN?", "card arrived broken", "how do I  reset my pin?", "What is 3²?",
                 "What is 32?"]
        hits, missing = cache.get_many(texts)
        assert hits == {} and missing == [0, 1, 2, 3, 4]
        cache.put_many(texts[:2] + texts[3:4], enc(texts[:2] + texts[3:4]))
        hits, missing = cache.get_many(texts)
        # a variant in case, whitespace or unicode form is another text: its own vector
        assert missing == [2, 4] and set(hits) == {0, 1, 3}
        np.testing.assert_array_equal(hits[0], enc(texts[:1])[0])
        assert hits[0].dtype == np.float32 and hits[0].flags.writeable
    finally:
        cache.close()


def test_encoder_version_is_part_of_the_key(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    v1 = open_cache(redis_url, tmp_path / "a", "v1")
    enc = FakeEncoder()
    v1.put_many(["hello"], enc(["hello"]))
    assert v1.get_many(["hello"])[1] == []
    v1.close()
    v2 = open_cache(redis_url, tmp_path / "b", "v2")
    try:
        assert v2.get_many(["hello"])[1] == [0]
    finally:
        v2.close()


def test_get_or_encode_encodes_only_misses(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    cache = open_cache(redis_url, tmp_path / "ssd")
    enc = FakeEncoder()
    try:
        first = cache.get_or_encode(["a", "b"], encode=enc)
        again = cache.get_or_encode(["a", "b", "c"], encode=enc)
        assert enc.texts == 3
        np.testing.assert_array_equal(first, again[:2])
    finally:
        cache.close()


def test_precompute_fills_the_cache_and_resumes(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    catalogue = tmp_path / "catalogue.jsonl"
    catalogue.write_text("\n".join(json.dumps({"text": f"question number {i}", "intent": "x"}) for i in range(150)))
    texts = list(read_texts(catalogue))
    cache = open_cache(redis_url, tmp_path / "ssd")
    enc = FakeEncoder()
    try:
        first = precompute(cache, texts[:100], batch_size=32, encode=enc, progress=False)
        assert first["encoded"] == 100
        second = precompute(cache, texts, batch_size=32, encode=enc, progress=False)
        assert second == {"texts": 150, "unique": 150, "encoded": 50, "already_cached": 100}
        hits, missing = cache.get_many(texts)
        assert not missing and len(hits) == 150
        assert cache.tiered.ram.size_bytes() <= 200 * 1700  # the rest went to SSD
    finally:
        cache.close()


def test_read_texts_csv_column(tmp_path: Path) -> None:
    path = tmp_path / "items.csv"
    path.write_text("id,title\n1,Toy Story\n2,\n3,Heat\n")
    assert list(read_texts(path, "title")) == ["Toy Story", "Heat"]


def test_a_tenant_never_reads_another_tenants_embeddings_only_its_own_and_the_shared(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """A hit saves the ~15 ms encode, which `/v1/embeddings` timing shows: a cache shared by
    tenants would tell one whether another recently sent a text (caches/embedding.py)."""
    cache = open_cache(redis_url, tmp_path / "ssd")
    enc = FakeEncoder()
    try:
        cache.put_many(["what acme asked"], enc(["what acme asked"]), tenant_scope("acme"))
        assert cache.get_many(["what acme asked"], tenant_scope("acme"))[1] == []
        assert cache.get_many(["what acme asked"], tenant_scope("globex"))[1] == [0]
        assert cache.get_many(["what acme asked"])[1] == [0]  # nor is it in the shared scope
        # the operator's precomputed catalogue is read by every tenant (it is nobody's activity)
        precompute(cache, ["a catalogue title"], encode=enc, progress=False)
        for tenant in ("acme", "globex"):
            hits, missing = cache.get_many(["a catalogue title", "what acme asked"], tenant_scope(tenant))
            assert set(hits) == ({0, 1} if tenant == "acme" else {0}), tenant
            np.testing.assert_array_equal(hits[0], enc(["a catalogue title"])[0])
        # one scope per text (the Encoder's batch mixes tenants), and names that would collide
        # if joined naively stay apart
        hits, missing = cache.get_many(["what acme asked"] * 2, [tenant_scope("acme"), tenant_scope("acme:x")])
        assert set(hits) == {0} and missing == [1]
        assert tenant_scope("shared") != SHARED_SCOPE
    finally:
        cache.close()


def test_the_encoder_deployment_caches_each_text_under_its_senders_scope(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Encoder's own batch path (deployments/encoder.py) on a real cache; only the model is a
    stand-in (the e2e tests run the real one)."""
    from concurrent.futures import ThreadPoolExecutor

    from deployments import encoder as encoder_module

    enc = FakeEncoder()
    monkeypatch.setattr(encoder_module, "EMBEDDING_DIM", DIM)
    monkeypatch.setattr(encoder_module, "encode", enc)
    replica = encoder_module.EncoderDeployment.func_or_class.__new__(encoder_module.EncoderDeployment.func_or_class)
    replica.cache = open_cache(redis_url, tmp_path / "ssd")
    replica._worker = ThreadPoolExecutor(max_workers=1)
    try:
        first = replica._embed(["hello", "hello"], ["acme", "globex"])  # one batch, two senders
        assert enc.texts == 2
        replica._embed(["hello"], ["acme"])
        replica._embed(["hello"], ["globex"])
        assert enc.texts == 2  # each sender's own entry was reused
        replica._embed(["hello"], ["initech"])
        assert enc.texts == 3  # a third tenant did not learn that "hello" was sent before
        np.testing.assert_array_equal(first[0], first[1])
        # a no-store request's text (Cache-Control: no-store) is encoded, never kept
        replica._embed(["secret", "kept"], ["acme", "acme"], [False, True])
        assert enc.texts == 5
        replica._embed(["secret", "kept"], ["acme", "acme"])
        assert enc.texts == 6  # "secret" was encoded again: it was stored nowhere; "kept" was
    finally:
        replica.cache.close()
        replica._worker.shutdown()
