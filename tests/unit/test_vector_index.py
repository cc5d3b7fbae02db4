"""caches.vector_index: the same index behaviour on the CPU whether or not a GPU is asked for,
and the GPU branch taken (index_cpu_to_gpu) only when one is visible."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import pytest

from caches import vector_index
from caches.vector_index import gpu_count, make_ip_index, on_gpu


def _vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _exact_top(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    return [int(ids[i]) for i in np.argsort(-(vectors @ query))[:k]]


@pytest.mark.parametrize("use_gpu", [False, True])
def test_search_matches_brute_force_with_caller_ids(use_gpu: bool) -> None:
    vectors = _vectors(500, 32)
    ids = np.arange(1000, 1500, dtype=np.int64) * 7
    index = make_ip_index(32, use_gpu=use_gpu)
    index.add_with_ids(vectors, ids)
    assert index.ntotal == 500
    query = _vectors(1, 32, seed=1)
    scores, found = index.search(query, 10)
    assert found[0].tolist() == _exact_top(vectors, ids, query[0], 10)
    assert np.all(np.diff(scores[0]) <= 1e-6)
    np.testing.assert_allclose(index.reconstruct(int(ids[3])), vectors[3], rtol=1e-6)
    # k larger than the index: FAISS pads with -1.
    assert (index.search(query, 600)[1][0] == -1).sum() == 100


def test_no_gpu_here_means_cpu_for_both_choices() -> None:
    if gpu_count() > 0:
        pytest.skip("this machine has a GPU: the fallback is not what runs")
    assert not on_gpu(make_ip_index(8, use_gpu=True)) and not on_gpu(make_ip_index(8, use_gpu=False))


def test_bad_dim_is_rejected() -> None:
    with pytest.raises(ValueError):
        make_ip_index(0)


def test_gpu_branch_copies_the_flat_index_when_a_gpu_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pure wiring: with a GPU reported, the flat index goes through index_cpu_to_gpu."""
    calls: list[tuple[Any, int, Any]] = []

    class FakeResources:
        pass

    def fake_to_gpu(res: Any, device: int, index: Any) -> Any:
        calls.append((res, device, index))
        return index  # a CPU index stands in for the GPU copy

    monkeypatch.setattr(faiss, "StandardGpuResources", FakeResources, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", fake_to_gpu, raising=False)
    monkeypatch.setattr(vector_index, "_resources", None)
    index = make_ip_index(16, use_gpu=True)
    assert len(calls) == 1 and isinstance(calls[0][0], FakeResources) and calls[0][1] == 0
    index.add_with_ids(_vectors(5, 16), np.arange(5, dtype=np.int64))
    assert index.search(_vectors(1, 16), 1)[1].shape == (1, 1)
    make_ip_index(16, use_gpu=False)
    make_ip_index(16, use_gpu=True, device=1)  # GPU 1 is not visible: CPU, no copy
    assert len(calls) == 1


@pytest.mark.gpu
def test_real_gpu_index() -> None:
    if gpu_count() == 0:
        pytest.skip("no GPU visible to FAISS (faiss-cpu build or no device)")
    vectors = _vectors(2000, 64)
    ids = np.arange(2000, dtype=np.int64)
    index = make_ip_index(64, use_gpu=True)
    assert on_gpu(index)
    index.add_with_ids(vectors, ids)
    query = _vectors(1, 64, seed=3)
    assert index.search(query, 5)[1][0].tolist() == _exact_top(vectors, ids, query[0], 5)


def test_recommender_item_index_is_the_same_with_or_without_the_gpu_setting(tmp_path: Any) -> None:
    import pandas as pd

    from deployments.recommender import ItemIndex
    from feature_store import names

    vectors = _vectors(300, 32, seed=5)
    ids = np.arange(1, 301, dtype=np.int64) * 3
    pd.DataFrame({names.ITEM_KEY: ids, "embedding": list(vectors), "popularity": np.arange(300)}).to_parquet(
        tmp_path / "items.parquet"
    )
    query = _vectors(1, 32, seed=6)[0]
    expected = _exact_top(vectors, ids, query, 20)
    for use_gpu in (False, True):
        index = ItemIndex(tmp_path / "items.parquet", use_gpu=use_gpu)
        assert index.size == 300 and index.ids == frozenset(int(i) for i in ids)
        assert index.search(query, 20) == expected
        # the cold-start and fallback lists' order: the whole catalogue, most popular first
        assert index.by_popularity == [int(i) for i in ids[::-1]]


def _item_parquet(path: Any, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    from feature_store import names

    vectors, ids = _vectors(n, dim, seed=5), np.arange(1, n + 1, dtype=np.int64) * 3
    pd.DataFrame({names.ITEM_KEY: ids, "embedding": list(vectors), "popularity": np.arange(n)}).to_parquet(path)
    return vectors, ids


def test_an_item_search_past_the_gpu_limit_goes_to_the_cpu_copy(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU index answers at most GPU_MAX_K neighbours; a heavy rater's search asks for more.
    Run on the CPU: the index is taken for a GPU one, and the limit made small."""
    from deployments import recommender_model
    from deployments.recommender_model import ItemIndex

    monkeypatch.setattr(recommender_model, "on_gpu", lambda index: True)
    monkeypatch.setattr(recommender_model, "GPU_MAX_K", 10)
    vectors, ids = _item_parquet(tmp_path / "items.parquet", 300, 32)
    index = ItemIndex(tmp_path / "items.parquet", use_gpu=False)
    assert index.cpu_index is not None

    class Limited:  # what a GPU index does past its limit
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def search(self, x: np.ndarray, k: int) -> Any:
            if k > 10:
                raise RuntimeError("k > GPU_MAX_SELECTION_K")
            return self.inner.search(x, k)

    index.index = Limited(index.index)
    query = _vectors(1, 32, seed=6)[0]
    assert index.search(query, 50) == _exact_top(vectors, ids, query, 50)  # the CPU copy
    assert index.search(query, 10) == _exact_top(vectors, ids, query, 10)  # the GPU index


@pytest.mark.gpu
def test_real_gpu_item_index_answers_past_its_limit(tmp_path: Any) -> None:
    if gpu_count() == 0:
        pytest.skip("no GPU visible to FAISS (faiss-cpu build or no device)")
    from caches.vector_index import GPU_MAX_K
    from deployments.recommender_model import ItemIndex

    vectors, ids = _item_parquet(tmp_path / "items.parquet", GPU_MAX_K + 1000, 32)
    index = ItemIndex(tmp_path / "items.parquet", use_gpu=True)
    assert on_gpu(index.index)
    query = _vectors(1, 32, seed=6)[0]
    assert index.search(query, GPU_MAX_K + 500) == _exact_top(vectors, ids, query, GPU_MAX_K + 500)


def test_semantic_mirror_without_remove_ids_uses_tombstones_and_rebuilds() -> None:
    """The GPU path of the semantic mirror (no remove_ids), run on the CPU: same answers."""
    import numpy as np

    from caches.semantic.mirror import TOMBSTONE_MIN, EntryMeta, ScopeIndex

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = list(range(1000, 1300))
    gpu_like, cpu = ScopeIndex(16, removable=False), ScopeIndex(16)
    for index in (gpu_like, cpu):
        index.add(ids, vectors, [EntryMeta("q", "a") for _ in ids])
        index.remove(ids[:40])  # below the rebuild point on the tombstone side
    assert gpu_like.tombstones and gpu_like.index.ntotal == 300 and cpu.index.ntotal == 260
    for q in vectors[:50]:
        assert gpu_like.search(q, 5) == cpu.search(q, 5)
    for index in (gpu_like, cpu):
        index.remove(ids[40:40 + TOMBSTONE_MIN])
    assert not gpu_like.tombstones and gpu_like.index.ntotal == cpu.index.ntotal  # rebuilt
    for q in vectors[::7]:
        assert gpu_like.search(q, 5) == cpu.search(q, 5)
    gpu_like.add(ids[:1], vectors[:1], [EntryMeta("q", "a")])  # re-added after removal
    assert gpu_like.search(vectors[0], 1)[0][0] == ids[0]


def test_a_mirror_without_remove_ids_never_asks_more_neighbours_than_a_gpu_gives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tombstones are searched past, so k + tombstones neighbours are asked: past GPU_MAX_K a GPU
    index refuses. Run on the CPU with the limit made small, as for the recommender's index."""
    import numpy as np

    from caches import vector_index
    from caches.semantic.mirror import EntryMeta, ScopeIndex

    monkeypatch.setattr(vector_index, "GPU_MAX_K", 32)
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((1000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = list(range(1000))
    gpu_like, cpu = ScopeIndex(16, removable=False), ScopeIndex(16)
    for index in (gpu_like, cpu):
        index.add(ids, vectors, [EntryMeta("q", "a") for _ in ids])
        index.remove(ids[:60])  # under the fraction rebuild point (200), over the limit
    assert 5 + len(gpu_like.tombstones) > 32  # a search now would ask past the limit...
    assert gpu_like.search(vectors[500], 5) == cpu.search(vectors[500], 5)
    assert 5 + len(gpu_like.tombstones) <= 32  # ...so it rebuilt first
    for q in vectors[::50]:
        assert gpu_like.search(q, 5) == cpu.search(q, 5)
