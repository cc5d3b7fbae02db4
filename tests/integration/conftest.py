"""Fixtures of the integration modules that record user events against a small Feast repo."""

from __future__ import annotations

from pathlib import Path

import pytest

from feature_store.events import UserActivityWriter
from feature_store.pipeline import RepoInfo, build_repo

SMALL_REPO_LIMIT = 3000  # rows of the MovieLens sample: a repo built in about 10-30 s


@pytest.fixture(scope="module")
def repo(shared_data: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> RepoInfo:
    """A small repo per module: the module's events change its rows, so no other module shares it."""
    movielens = shared_data / "movielens_latest_small_2015"
    out = tmp_path_factory.mktemp(f"{request.module.__name__.rsplit('.', 1)[-1]}_repo")
    return build_repo(movielens / "ratings.csv", out, movielens / "movies.csv", limit=SMALL_REPO_LIMIT,
                      progress=False)


@pytest.fixture(scope="module")
def writer(repo: RepoInfo) -> UserActivityWriter:
    return UserActivityWriter(repo.repo_dir)

