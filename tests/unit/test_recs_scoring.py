"""The vectorised recommendation score (ItemTable + score_items) against the per-item loop it
replaced: same scores, same order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deployments.recommender import W_GENRE, W_MEAN_RATING
from deployments.recommender_model import ItemIndex, ItemTable, score_items, top_k
from feature_store import names

GENRES = ["Action", "Comedy", "Drama", "Horror"]


def _items(tmp_path: Path, n: int = 120) -> tuple[Path, pd.DataFrame]:
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((n, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    genres = [list(rng.choice(GENRES + ["Unknown"], size=rng.integers(0, 4), replace=False)) for _ in range(n)]
    frame = pd.DataFrame({
        names.ITEM_KEY: rng.permutation(np.arange(10, 10 + 7 * n, 7, dtype=np.int64)),  # not sorted
        "embedding": list(vectors), "popularity": np.arange(n), "genres": genres,
        "mean_rating": rng.uniform(0.5, 5.0, n).astype(np.float32),
    })
    path = tmp_path / "items.parquet"
    frame.to_parquet(path)
    return path, frame


def _loop_scores(frame: pd.DataFrame, user: np.ndarray, affinity: np.ndarray, ids: list[int]) -> dict[int, float]:
    """The loop deployments/recommender.py ran per candidate before."""
    genre_index = {g: i for i, g in enumerate(GENRES)}
    by_id = frame.set_index(names.ITEM_KEY)
    out = {}
    for item_id in ids:
        f = by_id.loc[item_id]
        score = float(np.dot(user, np.asarray(f["embedding"], dtype=np.float32)))
        score += W_MEAN_RATING * (float(f["mean_rating"] or 0.0) - 3.0) / 2.0
        idx = [genre_index[g] for g in f["genres"] if g in genre_index]
        if idx:
            score += W_GENRE * float(affinity[idx].mean())
        out[item_id] = score
    return out


def test_vectorised_scores_match_the_per_item_loop(tmp_path: Path) -> None:
    path, frame = _items(tmp_path)
    index, table = ItemIndex(path), ItemTable(path, GENRES)
    rng = np.random.default_rng(2)
    user = rng.standard_normal(8).astype(np.float32)
    affinity = rng.uniform(0, 1, len(GENRES)).astype(np.float32)
    ids, sims = index.search_scored(user, 50)
    rows = table.rows(ids)
    assert (rows >= 0).all() and (table.ids[rows] == ids).all()
    scores = score_items(sims, table.mean_rating[rows], table.genre_matrix[rows], affinity,
                         w_mean_rating=W_MEAN_RATING, w_genre=W_GENRE)
    expected = _loop_scores(frame, user, affinity, ids.tolist())
    np.testing.assert_allclose(scores, [expected[int(i)] for i in ids], atol=1e-5)
    assert [int(i) for i in ids[np.argsort(-scores, kind="stable")][:10]] == sorted(
        expected, key=lambda i: -expected[i])[:10]


def test_unknown_ids_have_no_row_and_no_affinity_means_no_genre_term(tmp_path: Path) -> None:
    path, frame = _items(tmp_path, n=20)
    table = ItemTable(path, GENRES)
    known = int(frame[names.ITEM_KEY].iloc[0])
    assert table.rows(np.asarray([known, 3, 10**9], dtype=np.int64)).tolist()[1:] == [-1, -1]
    sims = np.asarray([0.5], dtype=np.float32)
    mean = np.asarray([4.0])
    without = score_items(sims, mean, table.genre_matrix[:1], np.asarray([], dtype=np.float32),
                          w_mean_rating=W_MEAN_RATING, w_genre=W_GENRE)
    assert without[0] == pytest.approx(0.5 + W_MEAN_RATING * 0.5)


@pytest.mark.parametrize("path_taken", ["scan", "faiss-widened"])
def test_top_k_is_the_exact_top_k_of_the_whole_catalogue_whatever_the_pool(
    tmp_path: Path, path_taken: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The score nudges the similarity, so FAISS's nearest `pool` need not hold the best scores:
    the answer must be what scoring every unseen item gives, and a smaller k a prefix of a larger;
    whether the catalogue is scanned whole (small) or searched with FAISS (large)."""
    from deployments import recommender_model

    if path_taken == "faiss-widened":
        monkeypatch.setattr(recommender_model, "EXACT_SCAN_MAX_ITEMS", 0)
    path, frame = _items(tmp_path, n=400)
    index, table = ItemIndex(path), ItemTable(path, GENRES)
    all_ids = frame[names.ITEM_KEY].to_numpy(dtype=np.int64)
    rng = np.random.default_rng(3)
    widened = 0
    for _ in range(60):
        user = rng.standard_normal(8).astype(np.float32) * 0.05  # small similarities: the nudges decide
        affinity = rng.uniform(-0.5, 1.0, len(GENRES)).astype(np.float32)
        seen = {int(i) for i in rng.choice(all_ids, size=int(rng.integers(0, 30)), replace=False)}
        rest = np.asarray([i for i in all_ids if int(i) not in seen], dtype=np.int64)
        sims = index.search_scored(user, index.size)
        sim_of = dict(zip(sims[0].tolist(), sims[1].tolist(), strict=True))
        rows = table.rows(rest)
        every = score_items(np.asarray([sim_of[int(i)] for i in rest], dtype=np.float32), table.mean_rating[rows],
                            table.genre_matrix[rows], affinity, w_mean_rating=W_MEAN_RATING, w_genre=W_GENRE)
        best = rest[np.argsort(-every, kind="stable")]
        for k, pool in ((1, 1), (10, 5), (10, 40), (50, 20)):
            got = top_k(index, table, user, affinity, seen, k, pool, w_mean_rating=W_MEAN_RATING, w_genre=W_GENRE)
            assert got.ids.tolist() == best[:k].tolist(), (k, pool)
            assert not set(got.ids.tolist()) & seen and (np.diff(got.scores) <= 0).all()
        small = top_k(index, table, user, affinity, seen, 10, 10, w_mean_rating=W_MEAN_RATING, w_genre=W_GENRE)
        widened += small.sources["model"] > 10 + len(seen)  # the first pool was not enough
    if path_taken == "faiss-widened":
        assert widened, "no case needed a wider pool: the test would pass without the bound"
