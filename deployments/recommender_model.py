"""What a Recommender replica loads for one model version: the item index, the rated sets, the
popular list and the two feature caches. A version bump builds a new `RecsModel` beside the old
one and swaps it in (caches/versions.py `Leased`); the old one closes when its last request ends.

Each version's RocksDB directories are their own (`{replica dir}/{n}-version-{version}/users|items`, n counting
this replica's loads, so a reload of the same version never meets its predecessor's lock): the new
caches open while the old ones are still serving, and RocksDB allows one opener per directory.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from caches.features import FeatureCache
from caches.redis_client import REDIS_ERRORS, is_cluster_url
from caches.result import CacheUnavailable, ResultCache
from caches.tiered import TierUnavailable
from caches.vector_index import GPU_MAX_K, make_ip_index, on_gpu
from deployments.config import RecommenderSettings
from deployments.recommender_keys import RecsKeys, generation_key
from feature_store import names
from feature_store.pipeline import RepoInfo

# Every failure of the cache plumbing: none may escape a request as a 500.
CACHE_ERRORS: tuple[type[BaseException], ...] = (*REDIS_ERRORS, TierUnavailable, CacheUnavailable)


class RecommendationResults(ResultCache):
    """The result cache under its own namespace, hence its own byte total and budget: sharing
    the chat cache's bookkeeping would let one budget evict the other's entries."""

    NAMESPACE = "recs"


class ItemIndex:
    """FAISS inner-product index over the L2-normalised item embeddings of one model version."""

    def __init__(self, item_parquet: Path, use_gpu: bool = False) -> None:
        frame = pd.read_parquet(item_parquet, columns=[names.ITEM_KEY, "embedding", "popularity"])
        vectors = np.stack(frame["embedding"].to_numpy()).astype(np.float32)
        ids = frame[names.ITEM_KEY].to_numpy(dtype=np.int64)
        # On the replica's GPU when the config asks and Ray gave it one; the CPU otherwise.
        self.index = make_ip_index(vectors.shape[1], use_gpu=use_gpu)
        self.index.add_with_ids(vectors, ids)
        # A GPU index answers at most GPU_MAX_K neighbours; a heavy rater's search asks for more
        # (candidates plus everything they rated, e.g. 2,468 for MovieLens' user 516). Those go to
        # a CPU copy: a few MB per million items of dimension 32, and only the rare large k.
        self.cpu_index: Any = None
        if on_gpu(self.index):
            self.cpu_index = make_ip_index(vectors.shape[1], use_gpu=False)
            self.cpu_index.add_with_ids(vectors, ids)
        self.size = len(frame)
        self.ids = frozenset(int(i) for i in ids)  # the catalogue: events may only name these
        # Kept for the exact scan (`top_k`): a catalogue this size is scored whole faster than
        # FAISS's candidates can be proven to hold the best scores.
        self.vectors = vectors
        self.id_array = ids
        self._table_rows: tuple[int, np.ndarray] | None = None
        # The whole catalogue, most popular first (ties by id, as the pipeline ranks them): the
        # cold-start and fallback lists take the first k the user has not rated, so a user who
        # rated most of the top items still gets k of them (a top-200 list gave 7 of 10).
        order = np.lexsort((ids, -frame["popularity"].to_numpy(dtype=np.float64)))
        self.by_popularity = [int(i) for i in ids[order]]

    def table_rows(self, table: ItemTable) -> np.ndarray:
        """Each indexed item's row in `table` (-1: none), computed once per table."""
        if self._table_rows is None or self._table_rows[0] != id(table):
            self._table_rows = (id(table), table.rows(self.id_array))
        return self._table_rows[1]

    def search(self, vector: np.ndarray, k: int) -> list[int]:
        return self.search_scored(vector, k)[0].tolist()

    def search_scored(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ids (int64) and their inner products with `vector`, best first."""
        k = min(k, self.size)
        index = self.cpu_index if self.cpu_index is not None and k > GPU_MAX_K else self.index
        sims, ids = index.search(vector.reshape(1, -1).astype(np.float32), k)
        keep = ids[0] >= 0
        return ids[0][keep], sims[0][keep]


class ItemTable:
    """The item features the score reads besides the embedding (mean rating, genres), as arrays
    in process. They belong to the model version like the index does (the pipeline writes them;
    events change users, never items), so reading them from Redis, SSD or Feast per request
    (~200 keys, a msgpack decode and a Python loop each) bought nothing: the hot path now reads
    only the user's row through the tiers. Built from the same parquet file as the index."""

    def __init__(self, item_parquet: Path, genres: list[str]) -> None:
        frame = pd.read_parquet(item_parquet, columns=[names.ITEM_KEY, "mean_rating", "genres"])
        order = np.argsort(frame[names.ITEM_KEY].to_numpy(dtype=np.int64), kind="stable")
        frame = frame.iloc[order]
        self.ids = frame[names.ITEM_KEY].to_numpy(dtype=np.int64)
        self.mean_rating = np.nan_to_num(frame["mean_rating"].to_numpy(dtype=np.float64), nan=0.0)
        # The score's reach above an item's similarity (`nudge_bound`) needs the extremes only.
        self.mean_rating_range = (float(self.mean_rating.min()), float(self.mean_rating.max())) if len(frame) else (3.0, 3.0)
        index = {g: i for i, g in enumerate(genres)}
        # Row-normalised multi-hot: genre_matrix[row] @ affinity is the mean affinity over the
        # item's known genres (0 for an item with none), what the per-item loop computed.
        self.genre_matrix = np.zeros((len(frame), max(1, len(genres))), dtype=np.float64)
        for row, item_genres in enumerate(frame["genres"]):
            cols = [index[g] for g in (item_genres if item_genres is not None else ()) if g in index]
            if cols:
                self.genre_matrix[row, cols] = 1.0 / len(cols)

    def nudge_bound(self, affinity: np.ndarray, *, w_mean_rating: float, w_genre: float) -> float:
        """The most `score_items` can add to any item's similarity for this user: the top of the
        mean-rating nudge plus the user's best genre affinity (an item's genre term is a mean of
        affinities, so it never exceeds the largest; 0 for an item with no genres)."""
        rating = max(w_mean_rating * (r - 3.0) / 2.0 for r in self.mean_rating_range)
        genre = w_genre * max(0.0, float(affinity.max())) if affinity.size else 0.0
        return rating + max(genre, 0.0)

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        """Row of each id; -1 for an id this table does not hold."""
        pos = np.searchsorted(self.ids, item_ids)
        pos = np.minimum(pos, len(self.ids) - 1)
        return np.where(self.ids[pos] == item_ids, pos, -1)


def score_items(similarity: np.ndarray, mean_rating: np.ndarray, genre_rows: np.ndarray | None,
                affinity: np.ndarray, *, w_mean_rating: float, w_genre: float) -> np.ndarray:
    """Score = embedding affinity + small nudges (see deployments/recommender.py), vectorised."""
    score = similarity.astype(np.float64) + w_mean_rating * (mean_rating - 3.0) / 2.0
    if genre_rows is not None and affinity.size and genre_rows.shape[1] == affinity.size:
        score += w_genre * (genre_rows @ affinity.astype(np.float64))
    return score


@dataclass
class Ranked:
    ids: np.ndarray  # int64 item ids, best first
    scores: np.ndarray  # float64, one per id
    degraded: bool  # a feature tier was unavailable while reading the candidates
    sources: dict[str, int]  # where the candidates' features came from -> how many


# Catalogues up to this many items are scored whole (one matrix-vector product and a gather:
# ~0.3 ms for MovieLens' 8.5k items on one core), which is exact by construction. Larger ones
# take FAISS's nearest candidates and widen them until provably exact (below).
EXACT_SCAN_MAX_ITEMS = 200_000


def _scan(index: ItemIndex, table: ItemTable, user_embedding: np.ndarray, affinity: np.ndarray,
          excluded: np.ndarray | None, k: int, *, w_mean_rating: float, w_genre: float) -> Ranked:
    """Every item scored: the same score as `score_items`, computed for the whole table once."""
    rows = index.table_rows(table)
    sims = (index.vectors @ user_embedding.astype(np.float32)).astype(np.float64)
    # the score's nudges of every table row: score_items itself, at similarity 0 (one formula)
    nudge = score_items(np.zeros(len(table.ids)), table.mean_rating, table.genre_matrix, affinity,
                        w_mean_rating=w_mean_rating, w_genre=w_genre)
    ok = rows >= 0  # an id without features is dropped, never scored on empty ones
    if excluded is not None:
        ok &= ~np.isin(index.id_array, excluded)
    ids, scores = index.id_array[ok], sims[ok] + nudge[rows[ok]]
    top = best_first(ids, scores, k)
    return Ranked(ids[top], scores[top], False, {"model": int(ids.size)})


def best_first(ids: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the `k` best, highest score first and, among equal scores, lowest id first:
    a total order, so a smaller k is always a prefix of a larger one (items with the same
    embedding, mean rating and genres tie exactly, and some MovieLens items do)."""
    if k < scores.size:
        kth = np.partition(scores, scores.size - k)[scores.size - k]  # the k-th highest score
        candidates = np.flatnonzero(scores >= kth)  # ties at the k-th included, then cut below
    else:
        candidates = np.arange(scores.size)
    return candidates[np.lexsort((ids[candidates], -scores[candidates]))][:k]


def top_k(index: ItemIndex, table: ItemTable, user_embedding: np.ndarray, affinity: np.ndarray, seen: set[int],
          k: int, pool: int, *, w_mean_rating: float, w_genre: float) -> Ranked:
    """The `k` best items the user has not seen by the score, best first, exactly as scoring the
    whole catalogue would rank them: by scoring it whole up to EXACT_SCAN_MAX_ITEMS items, else
    from FAISS's candidates, starting with `pool` of them past `seen`.

    Why the loop: FAISS ranks by similarity, the score adds nudges to it, so an item just past
    the searched pool could outscore one inside (a k=10 answer was once not the top 10 of the same
    user's k=100 one). Every item past the pool has a similarity of at most the pool's last, so
    its score is at most that plus `nudge_bound`: when the k-th score found reaches that, nothing
    outside can beat it (the threshold test of Fagin, Lotem and Naor, "Optimal aggregation
    algorithms for middleware", PODS 2001). Else the pool grows 4x, up to the whole catalogue,
    which is always exact."""
    if k <= 0:
        return Ranked(np.empty(0, dtype=np.int64), np.empty(0), False, {"model": 0})
    excluded = np.fromiter(seen, dtype=np.int64, count=len(seen)) if seen else None
    if index.size <= EXACT_SCAN_MAX_ITEMS:
        return _scan(index, table, user_embedding, affinity, excluded, k, w_mean_rating=w_mean_rating,
                     w_genre=w_genre)
    reach = table.nudge_bound(affinity, w_mean_rating=w_mean_rating, w_genre=w_genre)
    wanted = pool + len(seen)
    while True:
        ids, sims = index.search_scored(user_embedding, wanted)
        searched_all = wanted >= index.size
        floor = float(sims[-1]) if sims.size else float("-inf")
        if excluded is not None:
            keep = ~np.isin(ids, excluded)
            ids, sims = ids[keep], sims[keep]
        rows = table.rows(ids)  # features in process: no read at all
        ok = rows >= 0  # an id without features is dropped, never scored on empty ones
        ids, sims, rows = ids[ok], sims[ok], rows[ok]
        scores = score_items(sims, table.mean_rating[rows], table.genre_matrix[rows], affinity,
                             w_mean_rating=w_mean_rating, w_genre=w_genre)
        top = best_first(ids, scores, k)
        if searched_all or (top.size == k and scores[top[-1]] >= floor + reach):
            return Ranked(ids[top], scores[top], False, {"model": int(ids.size)})
        wanted = min(index.size, wanted * 4)


def feature_cache(settings: RecommenderSettings, *, redis_url: str, repo: Path, rocksdb_dir: Path, view: str,
                  entity_key: str, model_version: str, share: float,
                  generations: Callable[[int], str] | None = None) -> FeatureCache:
    if settings.tiers == "feast-only":
        # the benchmark's baseline arm
        return FeatureCache.feast_only(feast_repo=repo, view=view, entity_key=entity_key, model_version=model_version)
    return FeatureCache.open(
        redis_url=redis_url, rocksdb_dir=rocksdb_dir, feast_repo=repo, view=view, entity_key=entity_key,
        model_version=model_version, ram_budget_bytes=int(settings.ram_budget_bytes * share),
        ssd_budget_bytes=int(settings.ssd_budget_bytes * share), ttl_s=settings.feature_ttl_s or None,
        generation_key=generations,
    )


class RecsModel:
    def __init__(self, settings: RecommenderSettings, info: RepoInfo, *, version: str, slot: int, redis_url: str,
                 rocksdb_root: Path) -> None:
        self.version = version  # the label: what answers report, what an admin bumped to
        # What the feature rows and cached answers are keyed on: the label, plus the build on disk
        # when the two differ. After a bump the label sticks in Redis while the pipeline may
        # rebuild the repo under it (new SVD embeddings, new catalogue): rows and answers of the
        # old build must then be unreachable, as a new label would make them.
        self.key_version = version if version == info.model_version else f"{version}+{info.model_version}"
        self.index = ItemIndex(info.files["item_features"], use_gpu=settings.faiss_gpu)
        # Item features belong to the model version (events never change them), so every arm holds
        # them in process, the Feast-only baseline included: the tiered-vs-Feast comparison is about
        # the user rows the tiers cache, not about an item table only one arm gets.
        self.item_table = ItemTable(info.files["item_features"], list(info.genres))
        rated = pd.read_parquet(info.files["rated"])
        self.rated = {int(u): set(map(int, items)) for u, items in zip(rated[names.USER_KEY], rated["item_ids"], strict=True)}
        self.genre_list = list(info.genres)
        self.genres = {g: i for i, g in enumerate(info.genres)}
        popular = self.index.by_popularity
        self.popular = [(item, 1.0 - rank / max(len(popular), 1)) for rank, item in enumerate(popular)]
        # Prefixed and filtered: a version is any string an admin sent ("..", "a/b").
        self.rocksdb_dir = rocksdb_root / f"{slot}-version-{re.sub(r'[^A-Za-z0-9._-]', '_', version)}"
        common = dict(redis_url=redis_url, repo=info.repo_dir, model_version=self.key_version)
        self.users = feature_cache(settings, rocksdb_dir=self.rocksdb_dir / "users", view=names.USER_VIEW,
                                   entity_key=names.USER_KEY, share=0.25, generations=generation_key, **common)
        self.items = feature_cache(settings, rocksdb_dir=self.rocksdb_dir / "items", view=names.ITEM_VIEW,
                                   entity_key=names.ITEM_KEY, share=1.0, **common)
        # The users' keys where this wiring keeps them: on a cluster the counter is the RAM tier's
        # name for it (tagged by its group), and the per-user keys read with it share that tag.
        ram = self.users.tiered.ram
        self.keys = RecsKeys(cluster=is_cluster_url(redis_url),
                             counter_name=ram.counter_name if ram is not None else None)

    def top_k(self, user_embedding: np.ndarray, affinity: np.ndarray, seen: set[int], k: int, pool: int, *,
              w_mean_rating: float, w_genre: float) -> Ranked:
        return top_k(self.index, self.item_table, user_embedding, affinity, seen, k, pool,
                     w_mean_rating=w_mean_rating, w_genre=w_genre)

    def close(self, *, remove_files: bool = False) -> None:
        self.users.close()
        self.items.close()
        if remove_files:  # a retired version's SSD copies are never read again
            shutil.rmtree(self.rocksdb_dir, ignore_errors=True)
