"""The feature pipeline end to end on a slice of the MovieLens sample, with a real Feast store.

One repository is built per module (about 10 s, most of it `import feast`) and shared; the
implicit-feedback build is a second, smaller one.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from feature_store import features as F
from feature_store import names
from feature_store.pipeline import RepoInfo, build_repo, is_complete, open_store

LIMIT = 3000


@pytest.fixture(scope="module")
def movielens(shared_data: Path) -> Path:
    return shared_data / "movielens_latest_small_2015"


@pytest.fixture(scope="module")
def csv_slice(movielens: Path) -> pd.DataFrame:
    return pd.read_csv(movielens / "ratings.csv", nrows=LIMIT)


@pytest.fixture(scope="module")
def built(movielens: Path, tmp_path_factory: pytest.TempPathFactory) -> RepoInfo:
    repo = tmp_path_factory.mktemp("feature_repo")
    return build_repo(movielens / "ratings.csv", repo, movielens / "movies.csv", limit=LIMIT, progress=False)


@pytest.fixture(scope="module")
def store(built: RepoInfo) -> Any:
    return open_store(built.repo_dir)


def _online(store: Any, view: str, key: str, ids: list[int], fields: list[str]) -> dict[str, list]:
    return store.get_online_features(
        features=[f"{view}:{f}" for f in fields], entity_rows=[{key: i} for i in ids]
    ).to_dict()


def test_build_layout_and_meta(built: RepoInfo, csv_slice: pd.DataFrame) -> None:
    repo = built.repo_dir
    assert (repo / "feature_store.yaml").exists()
    assert is_complete(repo, built.model_version)
    assert built.n_ratings == LIMIT
    assert built.n_users == csv_slice["userId"].nunique()
    assert built.n_items == csv_slice["movieId"].nunique()
    assert built.embedding_dim == 32 and not built.implicit
    assert built.genres[: len(F.DEFAULT_GENRES)] == list(F.DEFAULT_GENRES)
    popularity = csv_slice["movieId"].value_counts()
    assert popularity[built.popular_items[0]] == popularity.max()
    assert len(built.popular_items) == min(200, built.n_items)
    assert set(built.user_ids_sample) <= set(csv_slice["userId"])
    for path in built.files.values():
        assert path.exists()
    assert RepoInfo.load(repo) == built


def test_online_user_features_match_csv(built: RepoInfo, store: Any, csv_slice: pd.DataFrame) -> None:
    user = int(csv_slice["userId"].value_counts().index[0])
    rows = csv_slice[csv_slice["userId"] == user]
    got = _online(store, names.USER_VIEW, names.USER_KEY, [user], names.USER_FEATURES)
    assert got["n_ratings"] == [len(rows)]
    assert got["mean_rating"][0] == pytest.approx(rows["rating"].mean(), rel=1e-6)
    assert got["last_ts"] == [int(rows["timestamp"].max())]
    assert len(got["genre_affinity"][0]) == len(built.genres)
    assert all(0.0 <= v <= 1.0 for v in got["genre_affinity"][0])
    # Online values are the parquet's values (float32 survives the round trip exactly).
    parquet = pd.read_parquet(built.files["user_features"]).set_index(names.USER_KEY)
    np.testing.assert_array_equal(np.asarray(got["embedding"][0], np.float32), parquet.loc[user, "embedding"])
    np.testing.assert_array_equal(
        np.asarray(got["genre_affinity"][0], np.float32), parquet.loc[user, "genre_affinity"]
    )
    assert np.linalg.norm(got["embedding"][0]) == pytest.approx(1.0, abs=1e-5)


def test_online_item_features_match_csv(
    built: RepoInfo, store: Any, csv_slice: pd.DataFrame, movielens: Path
) -> None:
    item = 1  # Toy Story (1995): Adventure|Animation|Children|Comedy|Fantasy
    rows = csv_slice[csv_slice["movieId"] == item]
    assert len(rows) > 0
    got = _online(store, names.ITEM_VIEW, names.ITEM_KEY, [item, 10**9], names.ITEM_FEATURES)
    assert got["popularity"] == [len(rows), None]
    assert got["mean_rating"][0] == pytest.approx(rows["rating"].mean(), rel=1e-6)
    assert got["year"][0] == 1995
    assert got["genres"][0] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert got["embedding"][1] is None  # unknown item
    assert len(got["embedding"][0]) == 32
    assert np.linalg.norm(got["embedding"][0]) == pytest.approx(1.0, abs=1e-5)


def test_rated_items(built: RepoInfo, csv_slice: pd.DataFrame) -> None:
    rated = pd.read_parquet(built.files["rated"]).set_index(names.USER_KEY)["item_ids"]
    user = int(csv_slice["userId"].iloc[0])
    assert list(rated[user]) == sorted(csv_slice.loc[csv_slice["userId"] == user, "movieId"].unique())


def test_second_build_is_a_fast_noop(built: RepoInfo, movielens: Path) -> None:
    started = time.perf_counter()
    again = build_repo(
        movielens / "ratings.csv", built.repo_dir, movielens / "movies.csv", limit=LIMIT, progress=False
    )
    assert time.perf_counter() - started < 2.0
    assert again == built  # same built_at: nothing was rebuilt


def test_cli_noop_on_same_inputs(built: RepoInfo, movielens: Path) -> None:
    from typer.testing import CliRunner

    from feature_store.pipeline import app

    # The CLI picks movies.csv next to the ratings, so these are the fixture's exact inputs.
    args = ["--ratings", str(movielens / "ratings.csv"), "--repo-dir", str(built.repo_dir)]
    result = CliRunner().invoke(app, [*args, "--limit", str(LIMIT), "--quiet"])
    assert result.exit_code == 0, result.output
    assert built.model_version in result.output
    assert RepoInfo.load(built.repo_dir).built_at == built.built_at


def test_push_source_updates_online_store(built: RepoInfo, store: Any) -> None:
    user = built.user_ids_sample[-1]
    now = pd.Timestamp(datetime.now(UTC))
    embedding = np.zeros(built.embedding_dim, np.float32)
    embedding[0] = 1.0
    # A push must carry every feature of the view (Feast 0.67 raises KeyError otherwise).
    row = pd.DataFrame(
        {
            names.USER_KEY: [user],
            "n_ratings": [12345],
            "mean_rating": [np.float32(2.5)],
            "last_ts": [int(now.timestamp())],
            "genre_affinity": [np.zeros(len(built.genres), np.float32)],
            "embedding": [embedding],
            "rated_since_build": [[7, 11]],
            "applied_events": [["a1b2c3d4e5f6"]],
            names.TIMESTAMP_FIELD: [now],
            names.CREATED_FIELD: [now],
        }
    )
    store.push(names.USER_PUSH_SOURCE, row)
    got = _online(store, names.USER_VIEW, names.USER_KEY, [user], names.USER_FEATURES)
    assert got["n_ratings"] == [12345]
    assert got["mean_rating"] == [2.5]
    assert got["embedding"][0] == embedding.tolist()
    assert got["rated_since_build"] == [[7, 11]]
    assert got["applied_events"] == [["a1b2c3d4e5f6"]]


def test_other_columns_and_implicit_feedback(
    csv_slice: pd.DataFrame, tmp_path: Path, built: RepoInfo
) -> None:
    events = csv_slice.head(1000)
    csv = tmp_path / "events.csv"
    pd.DataFrame(
        {
            "uid": events["userId"],
            "iid": events["movieId"],
            "when": pd.to_datetime(events["timestamp"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    ).to_csv(csv, index=False)
    info = build_repo(csv, tmp_path / "repo", user_col="uid", item_col="iid", time_col="when", progress=False)
    assert info.implicit and info.n_ratings == 1000
    assert info.model_version != built.model_version
    assert info.genres == list(F.DEFAULT_GENRES)
    store = open_store(info.repo_dir)
    user = int(events["userId"].iloc[0])
    got = _online(store, names.USER_VIEW, names.USER_KEY, [user], names.USER_FEATURES)
    assert got["n_ratings"] == [int((events["userId"] == user).sum())]
    assert got["mean_rating"] == [1.0]
    assert got["last_ts"] == [int(events.loc[events["userId"] == user, "timestamp"].max())]
    assert got["genre_affinity"][0] == [0.0] * len(F.DEFAULT_GENRES)
    item = int(events["movieId"].iloc[0])
    got = _online(store, names.ITEM_VIEW, names.ITEM_KEY, [item], names.ITEM_FEATURES)
    assert got["genres"] == [[]] and got["year"] == [0] and got["mean_rating"] == [1.0]
    assert got["popularity"] == [int((events["movieId"] == item).sum())]
