"""Build the Feast feature repository from a ratings CSV (and optionally a movies CSV).

    python -m feature_store.pipeline [--ratings FILE] [--movies FILE] [--repo-dir DIR] [--force]

Steps: read -> aggregate -> SVD embeddings -> parquet -> `FeatureStore.apply` -> materialise ->
`data/meta.json`. meta.json is written last and atomically: its presence with the same
model_version is what makes a re-run a no-op, and a crashed build never looks complete.
Feast is imported only when a build actually runs (the import alone takes 7-11 s).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from feature_store import names

if TYPE_CHECKING:
    from feast import FeatureStore

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data" / "movielens_latest_small_2015"
# A 300-user MovieLens subset shipped in the package (feature_store/sample/SAMPLE.md): a clone or
# an image with no ../shared beside it still builds a repo and serves recommendations.
SAMPLE_DATA = PACKAGE_DIR / "sample"
DEFAULT_DATA = SHARED_DATA if (SHARED_DATA / "ratings.csv").exists() else SAMPLE_DATA
DEFAULT_RATINGS = DEFAULT_DATA / "ratings.csv"
DEFAULT_MOVIES = DEFAULT_DATA / "movies.csv"

# Bump when the feature maths or the embedding method changes: it is part of model_version,
# so every cache key built on the old features becomes unreachable.
# 2: user rows carry `rated_since_build` (a build of version 1 lacks the column: rebuilt, not mixed).
# 3: user rows carry `applied_events`.
PIPELINE_VERSION = "3"
N_POPULAR = 200
N_USER_SAMPLE = 100

# Files a complete build must hold, relative to the repo dir (meta.json is checked separately).
_BUILD_FILES = (names.USER_PARQUET, names.ITEM_PARQUET, names.RATED_PARQUET, names.REGISTRY_DB)


@dataclass(frozen=True)
class RepoInfo:
    """What a build produced: read back from `data/meta.json` by `RepoInfo.load(repo_dir)`."""

    repo_dir: Path
    model_version: str
    embedding_dim: int
    n_users: int
    n_items: int
    n_ratings: int
    implicit: bool
    genres: list[str]
    popular_items: list[int]
    user_ids_sample: list[int]
    files: dict[str, Path]  # absolute paths: user_features, item_features, rated
    built_at: str
    build_seconds: float
    meta: dict[str, Any] = field(repr=False, default_factory=dict)  # the raw meta.json

    @classmethod
    def load(cls, repo_dir: Path | str) -> RepoInfo:
        repo_dir = Path(repo_dir).resolve()
        meta = json.loads((repo_dir / names.META_JSON).read_text())
        return cls(
            repo_dir=repo_dir,
            model_version=meta["model_version"],
            embedding_dim=meta["embedding_dim"],
            n_users=meta["n_users"],
            n_items=meta["n_items"],
            n_ratings=meta["n_ratings"],
            implicit=meta["implicit"],
            genres=list(meta["genres"]),
            popular_items=list(meta["popular_items"]),
            user_ids_sample=list(meta["user_ids_sample"]),
            files={k: repo_dir / v for k, v in meta["files"].items()},
            built_at=meta["built_at"],
            build_seconds=meta["build_seconds"],
            meta=meta,
        )


def open_store(repo_dir: Path | str = PACKAGE_DIR, fs_yaml_file: Path | str | None = None) -> FeatureStore:
    """A Feast FeatureStore on a built repo (pass `fs_yaml_file` for e.g. feature_store_redis.yaml)."""
    from feast import FeatureStore

    return FeatureStore(
        repo_path=str(repo_dir), fs_yaml_file=Path(fs_yaml_file) if fs_yaml_file is not None else None
    )


def model_version(ratings_csv: Path, movies_csv: Path | None = None, **params: object) -> str:
    """Short stable hash of the input file contents and the build parameters."""
    digest = hashlib.sha256(f"tierserve-features/{PIPELINE_VERSION}".encode())
    for path in (ratings_csv, movies_csv):
        if path is None:
            digest.update(b"<none>")
            continue
        with open(path, "rb") as f:
            # Contents, not paths: the same data copied elsewhere yields the same version.
            digest.update(hashlib.file_digest(f, "sha256").digest())
    digest.update(json.dumps(params, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:12]


def is_complete(repo_dir: Path, version: str | None = None) -> bool:
    """True when repo_dir holds a finished build (of `version`, when given)."""
    meta_path = repo_dir / names.META_JSON
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    if version is not None and meta.get("model_version") != version:
        return False
    return all((repo_dir / rel).exists() for rel in _BUILD_FILES)


class _Steps:
    """A progress bar over the build steps (rich), or nothing when progress is off."""

    STEPS = ("read", "features", "embeddings", "parquet", "apply", "materialize", "meta")

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    @contextmanager
    def run(self) -> Iterator[_Steps]:
        if not self.enabled:
            yield self
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("[bold]features[/] {task.description:<12}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        ) as progress:
            self._progress = progress
            self._task = progress.add_task(self.STEPS[0], total=len(self.STEPS))
            yield self

    def step(self, name: str) -> None:
        """Mark the previous step done and show `name` as running."""
        if self._progress is not None:
            done = self.STEPS.index(name)
            self._progress.update(self._task, completed=done, description=name)

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=len(self.STEPS), description="done")


def build_repo(
    ratings_csv: Path,
    repo_dir: Path,
    movies_csv: Path | None = None,
    *,
    user_col: str = "userId",
    item_col: str = "movieId",
    rating_col: str | None = "rating",
    time_col: str = "timestamp",
    embedding_dim: int = 32,
    limit: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> RepoInfo:
    """Compute features from `ratings_csv`, write them to repo_dir/data and materialise them.

    Idempotent: when repo_dir already holds a complete build of the same inputs and parameters
    (same model_version) and not `force`, it returns that build at once without importing Feast.
    """
    started = time.perf_counter()
    ratings_csv = Path(ratings_csv).resolve()
    movies_csv = Path(movies_csv).resolve() if movies_csv is not None else None
    repo_dir = Path(repo_dir).resolve()
    version = model_version(
        ratings_csv,
        movies_csv,
        user_col=user_col,
        item_col=item_col,
        rating_col=rating_col,
        time_col=time_col,
        embedding_dim=embedding_dim,
        limit=limit,
    )
    if not force and is_complete(repo_dir, version):
        return RepoInfo.load(repo_dir)
    (repo_dir / names.DATA_DIR).mkdir(parents=True, exist_ok=True)
    with _build_lock(repo_dir):
        # Another process (a second replica starting up) may have built it while we waited.
        if not force and is_complete(repo_dir, version):
            return RepoInfo.load(repo_dir)
        return _build(
            ratings_csv,
            repo_dir,
            movies_csv,
            version=version,
            user_col=user_col,
            item_col=item_col,
            rating_col=rating_col,
            time_col=time_col,
            embedding_dim=embedding_dim,
            limit=limit,
            progress=progress,
            started=started,
        )


@contextmanager
def _build_lock(repo_dir: Path) -> Iterator[None]:
    """One build at a time per repo dir, across processes (an advisory flock, freed on exit)."""
    import fcntl

    with open(repo_dir / names.DATA_DIR / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(
    ratings_csv: Path,
    repo_dir: Path,
    movies_csv: Path | None,
    *,
    version: str,
    user_col: str,
    item_col: str,
    rating_col: str | None,
    time_col: str,
    embedding_dim: int,
    limit: int | None,
    progress: bool,
    started: float,
) -> RepoInfo:
    import numpy as np
    import pandas as pd

    from feature_store import features as F

    _clear_build(repo_dir)

    steps = _Steps(progress)
    with steps.run():
        steps.step("read")
        ratings, implicit = F.read_ratings(
            ratings_csv,
            user_col=user_col,
            item_col=item_col,
            rating_col=rating_col,
            time_col=time_col,
            limit=limit,
        )
        if ratings.empty:
            raise ValueError(f"{ratings_csv}: no ratings")
        movies = F.read_movies(movies_csv, item_col=item_col) if movies_csv is not None else None

        steps.step("features")
        users = F.user_aggregates(ratings)
        items = F.item_aggregates(ratings)
        user_ids = users["user_id"].tolist()
        item_ids = items["item_id"].tolist()
        if movies is not None:
            item_genres = dict(zip(movies["item_id"].tolist(), movies["genres"], strict=True))
            item_year = dict(zip(movies["item_id"].tolist(), movies["year"].tolist(), strict=True))
            genres = F.genre_order(movies["genres"])
        else:
            item_genres, item_year, genres = {}, {}, list(F.DEFAULT_GENRES)
        affinity = F.genre_affinity(ratings, user_ids, item_genres, genres)
        items["genres"] = [list(item_genres.get(i, [])) for i in item_ids]
        items["year"] = np.array([item_year.get(i, 0) for i in item_ids], dtype=np.int64)

        steps.step("embeddings")
        matrix = F.interaction_matrix(ratings, user_ids, item_ids)
        user_emb, item_emb = F.svd_embeddings(matrix, embedding_dim)

        steps.step("parquet")
        created = pd.Timestamp(datetime.now(UTC))
        user_frame = pd.DataFrame(
            {
                names.USER_KEY: users["user_id"].astype("int64"),
                "n_ratings": users["n_ratings"],
                "mean_rating": users["mean_rating"],
                "last_ts": users["last_ts"],
                "genre_affinity": list(affinity),
                "embedding": list(user_emb),
                "rated_since_build": [[] for _ in range(len(users))],  # the build's own: rated.parquet
                "applied_events": [[] for _ in range(len(users))],
                # The user's latest rating is when these features became true.
                names.TIMESTAMP_FIELD: pd.to_datetime(users["last_ts"], unit="s", utc=True),
                names.CREATED_FIELD: created,
            }
        )
        item_frame = pd.DataFrame(
            {
                names.ITEM_KEY: items["item_id"].astype("int64"),
                "popularity": items["popularity"],
                "mean_rating": items["mean_rating"],
                "genres": items["genres"],
                "year": items["year"],
                "embedding": list(item_emb),
                names.TIMESTAMP_FIELD: pd.to_datetime(items["last_ts"], unit="s", utc=True),
                names.CREATED_FIELD: created,
            }
        )
        rated = (
            ratings.drop_duplicates(["user_id", "item_id"])
            .groupby("user_id", sort=True)["item_id"]
            .agg(lambda s: sorted(s.tolist()))
            .reset_index()
            .rename(columns={"user_id": names.USER_KEY, "item_id": "item_ids"})
        )
        _write_parquet(
            user_frame, repo_dir / names.USER_PARQUET, list_types={"genre_affinity": "f4", "embedding": "f4", "rated_since_build": "i8",
                                                              "applied_events": "str"}
        )
        _write_parquet(
            item_frame, repo_dir / names.ITEM_PARQUET, list_types={"genres": "str", "embedding": "f4"}
        )
        _write_parquet(rated, repo_dir / names.RATED_PARQUET, list_types={"item_ids": "i8"})

        steps.step("apply")
        _ensure_yaml(repo_dir)
        from feature_store.definitions import definitions

        store = open_store(repo_dir)
        store.apply(definitions(repo_dir))

        steps.step("materialize")
        timestamps = pd.concat([user_frame[names.TIMESTAMP_FIELD], item_frame[names.TIMESTAMP_FIELD]])
        # The full range: from before the oldest row to after both the newest row and now.
        start = timestamps.min().to_pydatetime() - timedelta(seconds=1)
        end = max(timestamps.max().to_pydatetime(), datetime.now(UTC)) + timedelta(seconds=1)
        with _quiet(not progress):
            store.materialize(start_date=start, end_date=end)

        steps.step("meta")
        popular = items.sort_values(["popularity", "item_id"], ascending=[False, True])
        rng = np.random.default_rng(0)
        sample = rng.choice(np.asarray(user_ids), size=min(N_USER_SAMPLE, len(user_ids)), replace=False)
        meta = {
            "model_version": version,
            "pipeline_version": PIPELINE_VERSION,
            "embedding_dim": embedding_dim,
            "embedding_method": "puresvd+mips-to-cosine (last coordinate is the norm term)",
            "genres": genres,
            "n_users": len(user_ids),
            "n_items": len(item_ids),
            "n_ratings": len(ratings),
            "implicit": implicit,
            "popular_items": [int(i) for i in popular["item_id"].head(N_POPULAR)],
            "user_ids_sample": sorted(int(u) for u in sample),
            "files": {
                "user_features": names.USER_PARQUET,
                "item_features": names.ITEM_PARQUET,
                "rated": names.RATED_PARQUET,
            },
            "feast": {
                "project": names.PROJECT,
                "user_view": names.USER_VIEW,
                "item_view": names.ITEM_VIEW,
                "user_push_source": names.USER_PUSH_SOURCE,
            },
            "inputs": {
                "ratings_csv": str(ratings_csv),
                "movies_csv": str(movies_csv) if movies_csv else None,
                "user_col": user_col,
                "item_col": item_col,
                "rating_col": rating_col,
                "time_col": time_col,
                "limit": limit,
            },
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - started, 2),
        }
        tmp = repo_dir / (names.META_JSON + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, repo_dir / names.META_JSON)
        steps.finish()
    return RepoInfo.load(repo_dir)


@contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence Feast's own prints and tqdm bars (stdout and stderr) when progress is off."""
    if not enabled:
        yield
        return
    with open(os.devnull, "w") as sink, redirect_stdout(sink), redirect_stderr(sink):
        yield


def _clear_build(repo_dir: Path) -> None:
    """Remove a previous build first, so stale entities never survive and meta.json never lies."""
    for rel in (names.META_JSON, names.REGISTRY_DB, names.ONLINE_DB, *_BUILD_FILES):
        for path in (repo_dir / rel, repo_dir / (rel + "-journal"), repo_dir / (rel + "-wal")):
            path.unlink(missing_ok=True)


def _ensure_yaml(repo_dir: Path) -> None:
    # A repo elsewhere (a temp dir for benchmarks and tests) gets this package's config; an
    # existing file is left alone, since it may be a deliberate variant (e.g. the Redis store).
    target = repo_dir / "feature_store.yaml"
    if repo_dir != PACKAGE_DIR and not target.exists():
        shutil.copyfile(PACKAGE_DIR / "feature_store.yaml", target)


def _write_parquet(frame: Any, path: Path, list_types: dict[str, str]) -> None:
    """Parquet with explicit list element types, which Feast maps to its Array types."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    elem = {"f4": pa.float32(), "i8": pa.int64(), "str": pa.string()}
    table = pa.Table.from_pandas(frame, preserve_index=False)
    for col, kind in list_types.items():
        i = table.schema.get_field_index(col)
        values = pa.array(frame[col].map(list).tolist(), type=pa.list_(elem[kind]))
        table = table.set_column(i, col, values)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


app = typer.Typer(add_completion=False, help="Build the tierserve Feast feature repository.")


@app.command()
def main(
    ratings: Annotated[Path, typer.Option(help="ratings CSV (header required)")] = DEFAULT_RATINGS,
    movies: Annotated[
        Path | None,
        typer.Option(
            help="movies CSV (movieId,title,genres); default: movies.csv next to the ratings, if any"
        ),
    ] = None,
    no_movies: Annotated[bool, typer.Option("--no-movies", help="ignore any movies file")] = False,
    repo_dir: Annotated[Path, typer.Option(help="Feast repository folder")] = PACKAGE_DIR,
    user_col: Annotated[str, typer.Option(help="user id column")] = "userId",
    item_col: Annotated[str, typer.Option(help="item id column")] = "movieId",
    time_col: Annotated[str, typer.Option(help="timestamp column (Unix time or dates)")] = "timestamp",
    rating_col: Annotated[
        str, typer.Option(help="rating column; absent or '' means implicit feedback (1.0 a row)")
    ] = "rating",
    embedding_dim: Annotated[int, typer.Option(min=2)] = 32,
    limit: Annotated[int | None, typer.Option(help="read only the first N ratings")] = None,
    force: Annotated[bool, typer.Option(help="rebuild even when the build is up to date")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Build (or confirm up to date) the feature repository and print its summary."""
    if not ratings.exists():
        typer.echo(f"ratings file not found: {ratings}", err=True)
        raise typer.Exit(1)
    if no_movies:
        movies = None
    elif movies is None and (ratings.parent / "movies.csv").exists():
        # MovieLens layout: the movies of *this* data set, never the sample's for other ratings.
        movies = ratings.parent / "movies.csv"
    started = time.perf_counter()
    info = build_repo(
        ratings,
        repo_dir,
        movies,
        user_col=user_col,
        item_col=item_col,
        rating_col=rating_col or None,
        time_col=time_col,
        embedding_dim=embedding_dim,
        limit=limit,
        progress=not quiet,
        force=force,
    )
    elapsed = time.perf_counter() - started
    typer.echo(
        f"repo {info.repo_dir}: model_version {info.model_version}, {info.n_users} users, "
        f"{info.n_items} items, {info.n_ratings} ratings (built {info.built_at}); {elapsed:.2f} s"
    )


if __name__ == "__main__":
    app()
