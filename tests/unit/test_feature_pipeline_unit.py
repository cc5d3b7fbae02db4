"""Pure feature maths of the feature pipeline (no Feast: these run in well under a second)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.decomposition import TruncatedSVD

from feature_store import features as F
from feature_store.pipeline import is_complete, model_version


@pytest.mark.parametrize(
    ("title", "year"),
    [
        ("Toy Story (1995)", 1995),
        ("Millions (2004) ", 2004),
        ("(500) Days of Summer (2009)", 2009),
        ("1984 (1984)", 1984),
        ("Babylon 5 (1994-1998)", 1994),
        ("Cosmos (1980-)", 1980),
        ("Untitled", 0),
        ("Movie (abcd)", 0),
        ("", 0),
        (None, 0),
        (float("nan"), 0),
    ],
)
def test_parse_year(title: object, year: int) -> None:
    assert F.parse_year(title) == year


def test_parse_genres() -> None:
    assert F.parse_genres("Adventure|Animation|Children") == ["Adventure", "Animation", "Children"]
    assert F.parse_genres("(no genres listed)") == []
    assert F.parse_genres(None) == []
    assert F.parse_genres(float("nan")) == []


def test_genre_order_is_fixed_and_extends_sorted() -> None:
    order = F.genre_order([["Drama", "Zombie"], ["Anime"], []])
    assert order[: len(F.DEFAULT_GENRES)] == list(F.DEFAULT_GENRES)
    assert order[len(F.DEFAULT_GENRES) :] == ["Anime", "Zombie"]
    assert F.genre_order([]) == list(F.DEFAULT_GENRES)


def _ratings(rows: list[tuple[int, int, float, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=F.RATING_COLUMNS)


def test_genre_affinity_is_share_of_ratings_per_genre() -> None:
    ratings = _ratings([(1, 10, 5.0, 1), (1, 11, 3.0, 2), (1, 12, 4.0, 3), (1, 10, 2.0, 4), (2, 99, 1.0, 5)])
    genres = ["Action", "Comedy", "Drama"]
    item_genres = {10: ["Action", "Comedy"], 11: ["Comedy"], 12: []}  # 99 unknown
    aff = F.genre_affinity(ratings, [1, 2], item_genres, genres)
    assert aff.dtype == np.float32
    # user 1: 4 rating rows; Action on 10 twice, Comedy on 10 twice and 11 once, nothing on Drama.
    np.testing.assert_allclose(aff[0], [2 / 4, 3 / 4, 0.0])
    np.testing.assert_allclose(aff[1], [0.0, 0.0, 0.0])  # only an unknown item


def test_genre_affinity_without_movies_is_zeros() -> None:
    ratings = _ratings([(1, 10, 5.0, 1), (2, 11, 3.0, 2)])
    aff = F.genre_affinity(ratings, [1, 2], {}, list(F.DEFAULT_GENRES))
    assert aff.shape == (2, len(F.DEFAULT_GENRES))
    assert not aff.any()


def test_read_ratings_explicit(tmp_path: Path) -> None:
    csv = tmp_path / "r.csv"
    csv.write_text("userId,movieId,rating,timestamp\n1,10,4.5,100\n1,11,3.0,200\n2,10,1.0,300\n")
    frame, implicit = F.read_ratings(csv)
    assert not implicit
    assert list(frame.columns) == F.RATING_COLUMNS
    assert frame["rating"].tolist() == [4.5, 3.0, 1.0]
    assert frame["ts"].tolist() == [100, 200, 300]
    limited, _ = F.read_ratings(csv, limit=2)
    assert len(limited) == 2


def test_read_ratings_implicit_when_no_rating_column(tmp_path: Path) -> None:
    csv = tmp_path / "events.csv"
    csv.write_text("uid,iid,when,extra\n7,70,2001-01-29T01:14:21Z,x\n7,71,2001-01-29T01:23:00Z,y\n")
    frame, implicit = F.read_ratings(csv, user_col="uid", item_col="iid", time_col="when")
    assert implicit
    assert frame["rating"].tolist() == [1.0, 1.0]
    assert frame["ts"].tolist() == [980730861, 980731380]
    # An explicit rating_col=None also means implicit, even if a rating column exists.
    csv2 = tmp_path / "r.csv"
    csv2.write_text("userId,movieId,rating,timestamp\n1,10,4.5,100\n")
    frame2, implicit2 = F.read_ratings(csv2, rating_col=None)
    assert implicit2 and frame2["rating"].tolist() == [1.0]
    users = F.user_aggregates(frame)
    assert users["mean_rating"].tolist() == [1.0] and users["n_ratings"].tolist() == [2]


def test_read_ratings_errors(tmp_path: Path) -> None:
    csv = tmp_path / "r.csv"
    csv.write_text("user,item,timestamp\nalice,10,1\n")
    with pytest.raises(ValueError, match="missing column"):
        F.read_ratings(csv)
    with pytest.raises(ValueError, match="integer ids"):
        F.read_ratings(csv, user_col="user", item_col="item")


def test_to_unix_seconds_units() -> None:
    s = 980730861
    for scale in (1, 1_000, 1_000_000, 1_000_000_000):
        assert F.to_unix_seconds(pd.Series([s * scale, (s + 1) * scale])).tolist() == [s, s + 1]
    assert F.to_unix_seconds(pd.Series(["2001-01-29 01:14:21"])).tolist() == [s]


def test_aggregates() -> None:
    ratings = _ratings([(1, 10, 5.0, 100), (1, 11, 3.0, 50), (2, 10, 2.0, 70), (1, 10, 4.0, 120)])
    users = F.user_aggregates(ratings).set_index("user_id")
    assert users.loc[1, "n_ratings"] == 3 and users.loc[1, "last_ts"] == 120
    assert users.loc[1, "mean_rating"] == pytest.approx(4.0)
    items = F.item_aggregates(ratings).set_index("item_id")
    assert items.loc[10, "popularity"] == 3 and items.loc[11, "popularity"] == 1
    # The matrix keeps a repeated pair's latest rating.
    m = F.interaction_matrix(ratings, [1, 2], [10, 11])
    assert m.toarray().tolist() == [[4.0, 3.0], [2.0, 0.0]]


def test_svd_embeddings_preserve_puresvd_ranking() -> None:
    rng = np.random.default_rng(1)
    n_users, n_items, n = 60, 80, 900
    ratings = _ratings(
        list(
            zip(
                rng.integers(0, n_users, n).tolist(),
                (rng.zipf(1.5, n) % n_items).tolist(),
                rng.integers(1, 6, n).astype(float).tolist(),
                range(n),
                strict=True,
            )
        )
    )
    users_ids = sorted(ratings["user_id"].unique())
    item_ids = sorted(ratings["item_id"].unique())
    matrix = F.interaction_matrix(ratings, users_ids, item_ids)
    dim = 16
    users, items = F.svd_embeddings(matrix, dim, seed=0)
    assert users.shape == (len(users_ids), dim) and items.shape == (len(item_ids), dim)
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(users, axis=1), 1.0, atol=1e-5)
    assert np.all(users[:, -1] == 0)
    # Inner products over the unit item vectors rank items exactly as PureSVD (U S V^T) does.
    svd = TruncatedSVD(n_components=dim - 1, algorithm="randomized", n_iter=7, random_state=0)
    reference = svd.fit_transform(matrix) @ svd.components_
    ours = users @ items.T
    for u in range(len(users_ids)):
        np.testing.assert_array_equal(np.argsort(-ours[u])[:10], np.argsort(-reference[u])[:10])


def test_svd_embeddings_pads_tiny_data() -> None:
    ratings = _ratings([(1, 10, 5.0, 1), (2, 11, 3.0, 2), (2, 10, 1.0, 3)])
    matrix = F.interaction_matrix(ratings, [1, 2], [10, 11])
    users, items = F.svd_embeddings(matrix, 32)
    assert users.shape == (2, 32) and items.shape == (2, 32)
    assert not users[:, 1:].any()  # one direction only: the rest is padding
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, atol=1e-6)


def test_model_version_depends_on_contents_and_params(tmp_path: Path) -> None:
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("userId,movieId,rating,timestamp\n1,10,4.5,100\n")
    b.write_bytes(a.read_bytes())
    assert model_version(a, None, limit=None) == model_version(b, None, limit=None)  # contents, not path
    assert model_version(a, None, limit=None) != model_version(a, None, limit=5)
    b.write_text("userId,movieId,rating,timestamp\n1,10,4.0,100\n")
    assert model_version(a, None, limit=None) != model_version(b, None, limit=None)
    assert len(model_version(a)) == 12
    assert not is_complete(tmp_path)


def test_pipeline_import_does_not_import_feast() -> None:
    # `import feast` costs 7-11 s: the no-op re-run path and RepoInfo.load must stay free of it.
    import subprocess
    import sys

    code = "import sys, feature_store.pipeline; sys.exit('feast' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0
