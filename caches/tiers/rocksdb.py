"""SSD tier: RocksDB through rocksdict, one directory per process.

Why these choices:
- RocksDB allows one read-write opener per directory, so each process (Serve replica) owns its
  own directory; a second opener gets `RocksDBLocked`, which names the path and says who to ask,
  instead of RocksDB's bare "IO error: lock hold ...".
- Tuned for point lookups (the only access pattern): `optimize_for_point_lookup` plus a bloom
  filter (`BLOOM_BITS_PER_KEY`, ~1% false positives: a miss rarely touches a data block), a
  hash index inside data blocks, and a block cache with the index and filter blocks in it.
- Multi-get (`db.get([...])`) and one WriteBatch per put/delete batch.
- TTL per entry, not RocksDB's DB-wide TTL: each value carries an 8-byte expiry header, an
  expired entry reads as a miss and is deleted lazily. A read answers each value's expiry with it
  (`TierRead.expires_at`) and a write takes one per key (`expires_at`), so a value moved here
  from RAM, or from here to RAM, keeps the expiry it had instead of a fresh TTL. Sizes (key +
  payload) are kept in memory (rebuilt by one scan at open) so budgets and `size_bytes` cost
  nothing per call.
- Directories are per process and named after it, so a restarted process gets a new one and the
  old one would stay on the node's disk for ever. `claim_dir` marks a directory as owned by a
  live process (a `flock` held on a file beside it for the process' life) and `reclaim_dead_dirs`,
  run at start, deletes the siblings nobody owns (no owner lock and no RocksDB LOCK held).
- Failure is normal here too: rocksdict raises a bare `Exception` ("IO error: No space left on
  device ...", a corrupt or vanished file) from reads and writes. Each becomes `TierUnavailable`
  (the original message kept, the exception chained), so the tiered cache degrades to the tier
  below instead of failing the request. The in-memory sizes change only after a write landed, so
  a refused write leaves them describing what is on disk. A delete the disk refused still takes
  effect for this process (a delete is often an invalidation: the old copy must never be served
  again): the keys leave the index at once, reads skip them, and the physical delete is retried
  with every later write until it lands (`_doomed`). The directory is this process' own, so no
  other reader can see the copies meanwhile.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, NoReturn

from rocksdict import BlockBasedOptions, Cache, DataBlockIndexType, Options, Rdict, WriteBatch

from caches import metrics
from caches.tiers.base import NO_EXPIRY, TierRead, TierStats, TierUnavailable, expired

BLOOM_BITS_PER_KEY = 10
BLOCK_CACHE_BYTES = 64 << 20
POINT_LOOKUP_CACHE_MB = 64
DATA_BLOCK_HASH_RATIO = 0.75
_HEADER = struct.Struct("<d")  # absolute expiry (unix seconds); NO_EXPIRY (0.0) = never


class RocksDBLocked(RuntimeError):
    """Another process (or another open in this one) holds the RocksDB directory's LOCK."""


def _options(block_cache_bytes: int) -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.optimize_for_point_lookup(POINT_LOOKUP_CACHE_MB)
    table = BlockBasedOptions()
    table.set_bloom_filter(BLOOM_BITS_PER_KEY, False)
    table.set_block_cache(Cache(block_cache_bytes))
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    table.set_data_block_index_type(DataBlockIndexType.binary_and_hash())
    table.set_data_block_hash_ratio(DATA_BLOCK_HASH_RATIO)
    opts.set_block_based_table_factory(table)
    return opts


class RocksDBTier:
    def __init__(self, path: Path | str, *, name: str = "rocksdb", block_cache_bytes: int = BLOCK_CACHE_BYTES,
                 cache: str = "all") -> None:
        self.name = name
        self.cache = cache  # whose bytes these are on the tier_bytes gauge (one series per cache)
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        options = _options(block_cache_bytes)
        try:
            self._db = Rdict(str(self.path), options)
        except Exception as exc:  # rocksdict raises a bare Exception for IO errors
            if "lock" in str(exc).lower():
                raise RocksDBLocked(
                    f"RocksDB directory {self.path} is locked by another process (RocksDB allows one "
                    f"writer per directory): give each process its own rocksdb_dir. Detail: {exc}"
                ) from exc
            raise
        self._sizes: dict[str, int] = {}
        # Keys deleted for this process whose physical delete the disk refused (see module note).
        self._doomed: set[str] = set()
        self._stats = TierStats()
        # Sizes and the byte total change together; the invalidation consumer runs on its own thread.
        self._lock = threading.Lock()
        now = time.time()
        gone: list[str] = []
        for raw_key, raw_value in self._db.items():
            key = raw_key.decode()
            if expired(_HEADER.unpack_from(raw_value)[0], now):
                gone.append(key)
            else:
                self._sizes[key] = len(raw_key) + len(raw_value) - _HEADER.size
        self._bytes = sum(self._sizes.values())
        # A full disk must not stop the process from starting: retried with the next write.
        with contextlib.suppress(TierUnavailable):
            self.delete_many(gone)

    def get_many(self, keys: list[str]) -> TierRead:
        """The values held, with each one's absolute expiry (`TierRead.expires_at`, the header's:
        free, the header is read anyway to skip the expired)."""
        if not keys:
            return TierRead()
        t0 = time.perf_counter()
        try:
            raw = self._db.get([k.encode() for k in keys])
        except Exception as exc:  # rocksdict raises a bare Exception for IO errors
            self._failed(exc)
        now = time.time()
        found = TierRead()
        gone: list[str] = []
        for k, v in zip(keys, raw, strict=True):
            # Not in the index: deleted for this process, the disk still holding it (see _doomed).
            if v is None or k not in self._sizes:
                continue
            (expiry,) = _HEADER.unpack_from(v)
            if expired(expiry, now):
                gone.append(k)
            else:
                found[k] = v[_HEADER.size :]
                found.expires_at[k] = expiry
        # The expired values are not served either way; the delete is retried with a later write.
        with contextlib.suppress(TierUnavailable):
            self.delete_many(gone)
        metrics.record_read(self._stats, self.name, keys, found, time.perf_counter() - t0)
        return found

    def put_many(self, items: dict[str, bytes], ttl_s: float | None = None, *,
                 expires_at: Mapping[str, float] | None = None) -> None:
        """Write `items`, each expiring `ttl_s` from now (None: never), or at its own absolute
        expiry in `expires_at` (NO_EXPIRY: never) when it has one there: a value moved from
        another tier keeps the time it had left. One already past its expiry is written all the
        same (it replaces any older copy) and reads as a miss."""
        if not items:
            return
        default = time.time() + ttl_s if ttl_s else NO_EXPIRY
        expiries = expires_at or {}
        batch = WriteBatch(raw_mode=True)
        with self._lock:
            for k, v in items.items():
                batch.put(k.encode(), _HEADER.pack(expiries.get(k, default)) + v)
            retried = self._retry_doomed(batch, skip=items)
            self._write(batch)
            # Only now: a refused write must leave the sizes describing what is on disk.
            for k, v in items.items():
                n = len(k.encode()) + len(v)
                self._bytes += n - self._sizes.get(k, 0)
                self._sizes[k] = n
            self._doomed.difference_update(items)
            self._doomed.difference_update(retried)
        metrics.BYTES.labels(tier=self.name, namespace=self.cache).set(self._bytes)

    def delete_many(self, keys: list[str]) -> int:
        """Delete the keys; raises TierUnavailable when the disk refused, the keys being gone
        for this process all the same (never read again, retried on disk with the next write)."""
        with self._lock:
            present = [k for k in keys if k in self._sizes]
            if not present:
                return 0  # a retry of the doomed rides on real writes, not on every read
            batch = WriteBatch(raw_mode=True)
            for k in present:
                batch.delete(k.encode())
            retried = self._retry_doomed(batch)
            # Out of the index before the write: if the disk refuses, they must still never be served.
            for k in present:
                self._bytes -= self._sizes.pop(k)
            try:
                self._write(batch)
            except TierUnavailable:
                self._doomed.update(present)
                raise
            finally:
                metrics.BYTES.labels(tier=self.name, namespace=self.cache).set(self._bytes)
            self._doomed.difference_update(retried)
        return len(present)

    def _retry_doomed(self, batch: WriteBatch, skip: dict[str, bytes] | None = None) -> list[str]:
        """Add the deletes the disk refused before to `batch` (caller holds the lock): they land
        with the next write that does. Keys in `skip` are being written anew in the same batch."""
        retried = [k for k in self._doomed if skip is None or k not in skip]
        for k in retried:
            batch.delete(k.encode())
        return retried

    def _write(self, batch: WriteBatch) -> None:
        try:
            self._db.write(batch)
        except Exception as exc:  # rocksdict raises a bare Exception for IO errors
            self._failed(exc)

    def _failed(self, exc: Exception) -> NoReturn:
        self._stats.errors += 1
        metrics.ERRORS.labels(tier=self.name, namespace=self.cache).inc()
        raise TierUnavailable(f"RocksDB {self.path}: {exc}") from exc

    def __contains__(self, key: str) -> bool:
        return key in self._sizes

    def entry_size(self, key: str) -> int | None:
        return self._sizes.get(key)

    def keys(self) -> Iterator[str]:
        return iter(list(self._sizes))

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return [k for k in self._sizes if k.startswith(prefix)]

    def size_bytes(self) -> int:
        return self._bytes

    def stats(self) -> TierStats:
        self._stats.bytes = self._bytes
        self._stats.entries = len(self._sizes)
        return self._stats

    def close(self) -> None:
        # Closing releases the LOCK so the directory can be reopened (by us or a successor).
        self._db.close()


OWNER_SUFFIX = ".owner"


def claim_dir(path: Path | str) -> IO[bytes]:
    """Mark `path` as this process' own for as long as the returned file stays open.

    The owner file is created already locked (locked under a temporary name, then renamed), and
    before the directory exists, so `reclaim_dead_dirs` in another process never sees the
    directory without a live owner while this one is starting."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}{OWNER_SUFFIX}.tmp"
    handle = open(tmp, "wb")  # noqa: SIM115 (held open on purpose: the lock lives as long as it)
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.replace(tmp, _owner_file(path))
    path.mkdir(parents=True, exist_ok=True)
    return handle


def _owner_file(path: Path) -> Path:
    return path.parent / f"{path.name}{OWNER_SUFFIX}"


def _rocksdb_lock_held(lock: Path) -> bool:
    """RocksDB's LOCK is a POSIX (fcntl) lock, which belongs to a process: only meaningful for
    directories this process has not opened (closing our descriptor would drop our own lock)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def reclaim_dead_dirs(root: Path | str, *, prefix: str, keep: Path | str | None = None,
                      salvage: Callable[[Path], object] | None = None) -> list[Path]:
    """Delete `root`'s directories named `prefix*` that no live process owns; returns them.

    Alive means: its owner file (see `claim_dir`) is locked, or a RocksDB LOCK inside it is held
    (a process of an older build that never wrote an owner file). Call it before this process
    opens any RocksDB under `root` other than `keep`: the LOCK probe must not touch our own.
    `salvage(dir)` runs before a dead directory is deleted (e.g. adopting a dead replica's queued
    events); if it raises, the directory is kept for the next try."""
    root = Path(root)
    if not root.is_dir():
        return []
    keep_path = Path(keep).resolve() if keep is not None else None
    removed: list[Path] = []
    for child in sorted(root.iterdir()):
        if not child.is_dir() or not child.name.startswith(prefix) or child.resolve() == keep_path:
            continue
        if any(_rocksdb_lock_held(lock) for lock in child.rglob("LOCK")):
            continue
        # Take the dead directory's owner lock and hold it until the directory is gone: two
        # replicas starting together must not both salvage it (each would adopt the same queued
        # events and apply them twice). The one that loses the race sees the lock held: skipped.
        taken = _take_owner(child)
        if taken is None:
            continue
        try:
            if salvage is not None:
                try:
                    salvage(child)
                except Exception:  # noqa: BLE001 - kept for the next start; never fails this one
                    continue
            shutil.rmtree(child, ignore_errors=True)
            _owner_file(child).unlink(missing_ok=True)
            removed.append(child)
        finally:
            os.close(taken)  # the lock goes with it
    return removed


def _take_owner(path: Path) -> int | None:
    """The owner lock of `path`'s directory, taken (an open descriptor), or None when a live
    process holds it: its owner, or another process reclaiming it right now."""
    try:
        fd = os.open(_owner_file(path), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd
