"""Semantic cache: answer a question from a cached answer to a question that means the same.

Storage and convergence
    Redis is the source of truth. An entry is a hash ``{scope}:e:{id}`` (:class:`SemanticEntry`)
    with a TTL; per scope a sorted set ranks entries for eviction (least hits first, oldest first
    among equals), another holds expiry times, and a counter holds the scope's bytes. Every
    replica mirrors each scope it serves into a FAISS ``IndexIDMap2(IndexFlatIP)`` (vectors are
    L2-normalised, so inner product is cosine) and converges through one Redis Stream of
    ``add``/``del``/``drop`` events. A scope is loaded lazily from Redis the first time a replica
    touches it; after that the stream keeps it current (:meth:`SemanticCache.sync`, run by a
    background thread and, rate-limited, by lookups). Store, expiry and eviction run in one Lua
    script, so budgets hold with many replicas writing at once.

Why the mirror never serves stale answers
    The mirror (vectors plus each entry's immutable query and answer) only proposes. A lookup
    that the mirror decides is a miss needs no Redis; one it decides is a hit is checked in Redis
    in the same lookup (one script call: does each candidate still exist, what is its learned
    threshold) and decided again on that. An entry purged, evicted or expired on any replica is
    gone from Redis at once, so it cannot be served even before the stream event reaches this
    replica (the stale vector is then dropped locally). The price is that hits need Redis: when
    Redis is down (or failed within the last moments), :class:`~caches.result.CacheUnavailable` is
    raised and the caller answers from the model (``x-cache: bypass``). Entry ids are random 62-bit
    integers, so a replica whose mirror outlived a Redis restart can never map an old vector onto
    a new, different entry.

Deciding a hit
    A hit requires the same scope (tenant, model, version, system prompt, sampling params: see
    :meth:`SemanticCache.scope`); only the user's question is compared. Two modes:

    ``static``: the nearest entry's cosine >= the calibrated threshold and the lexical trap guard
    passes (:func:`trap_guard`: negation, numbers and dates, opposites, one-word swaps, swapped
    from/to; embeddings score these near 1.0, see ``configs/semantic_calibration.png``).

    ``adaptive``: neighbour voting plus per-entry learned thresholds. The nearest entry must be
    above a lower floor, pass the guard and its own learned threshold; every neighbour within
    :data:`VOTE_MARGIN` of it must carry the same answer; and at least :data:`VOTE_MIN` of them
    must agree (one suffices only for a near-duplicate, :data:`NEAR_DUPLICATE`). Close neighbours
    that agree are independent evidence that the region of embedding space around the query maps
    to one answer; one that disagrees means the region is ambiguous, however high the top
    similarity is.
    Per-entry thresholds (vCache's idea) learn only from what a deployment observes: on a miss,
    the caller stores the model's fresh answer; the candidates that lookup proposed for that
    query are compared with it, and each one whose answer differs learns that queries at that
    similarity are not its to answer (its threshold rises to that similarity, shared via Redis).
    The error bound drives the vote floor per replica and scope: the floor starts at
    :data:`VOTE_FLOOR` and steps down only when the misses just below it, where the vote would
    have answered, show (one-sided Wilson bound) a wrong-answer rate within the bound.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import secrets
import threading
import time
import unicodedata
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import faiss
import numpy as np
import redis
from pydantic import BaseModel, Field

from caches.keys import canonical_json, canonical_text, digest, make_key
from caches.result import CacheUnavailable, RedisGuard, glob_escape, safe_part

# --- tuning constants (see module doc) --------------------------------------------------------
VOTE_K = 10  # neighbours fetched per lookup in adaptive mode
VOTE_MARGIN = 0.10  # neighbours within this cosine of the nearest take part in the vote
VOTE_MIN = 2  # agreeing neighbours needed below the static threshold
# A single neighbour may answer alone only this close: such pairs differ by punctuation, case or
# filler words (with the trap guard on, no labelled pair above it is a wrong merge); below it the
# static threshold alone missed its precision target on real streams, so a second vote is required.
NEAR_DUPLICATE = 0.98
VOTE_FLOOR = 0.80  # starting floor for the nearest neighbour in adaptive mode
VOTE_FLOOR_MIN = 0.65  # the floor never adapts below this
FLOOR_STEP = 0.025  # width of the band below the floor that is audited from misses
FLOOR_MIN_OBS = 60  # band observations needed before the floor may move
WILSON_Z = 1.64  # one-sided 95% for the error-bound test
SYNC_MIN_INTERVAL_S = 0.1  # a lookup syncs the stream at most this often (the thread does the rest)
STREAM_MAXLEN = 200_000  # approximate cap on the event stream (events are ~100 bytes)
TRIM_CHECK_S = 5.0  # how often the background thread checks for a stream trimmed past our cursor
RECLAIM_PER_STORE = 32  # expired entries reclaimed per store (bounds the Lua script)
ENTRY_OVERHEAD_BYTES = 256  # per-entry Redis overhead counted against the byte budget
PENDING_MAX = 10_000  # lookups remembered until their store() arrives (for per-entry learning)
SNAPSHOT_BATCH = 1_000
TOKEN_CACHE_SIZE = 65_536  # tokenised texts kept for the guard (a query is checked up to 3 times)
# One query at a time is memory-bound: OpenMP threads only add wake-up latency and compete with
# the other replicas for the few cores a Serve replica gets.
FAISS_OMP_THREADS = 1

STREAM_KEY = "sem.__stream"
EPOCH_KEY = "sem.__meta:epoch"


class SemanticEntry(BaseModel):
    """An entry as stored in Redis (hash fields)."""

    scope: str
    query: str
    embedding: bytes
    response: str
    created: float
    hits: int = 0
    params: dict[str, Any] = Field(default_factory=dict)
    tau: float = -1.0  # learned per-entry threshold: queries at or below it are not answered by it


class SemanticHit(BaseModel):
    response: str
    similarity: float
    entry_id: str
    query: str


# --- request helpers ---------------------------------------------------------------------------
def is_cacheable(params: dict[str, Any], allow_nondeterministic: bool = False) -> bool:
    """Temperature 0 (or absent: our default is 0) is deterministic and cacheable; otherwise only
    when the config allows it, since a cached answer then freezes one sample of many."""
    temperature = params.get("temperature")
    if temperature is None or float(temperature) == 0.0:
        return True
    return allow_nondeterministic


def _words(text: str) -> list[str]:
    return text.split()


_TOKEN = re.compile(r"[a-z0-9£$€%]+(?:'[a-z]+)?")
NEGATIONS = frozenset(
    _words(
        "not no never none nothing nobody nowhere neither nor without cannot non dont doesnt didnt isnt "
        "arent wasnt werent wont wouldnt cant couldnt shouldnt hasnt havent hadnt mustnt neednt aint"
    )
)
# words that carry a quantity or a point in time: a difference in any of them changes the answer
NUMBER_WORDS = frozenset(
    _words(
        "zero one two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty "
        "hundred thousand million billion first second third fourth fifth half quarter double triple "
        "single am pm monday tuesday wednesday thursday friday saturday sunday weekday weekdays weekend "
        "weekends january february march april may june july august september october november december "
        "today tomorrow yesterday daily weekly monthly yearly annual annually morning evening night noon "
        "midnight"
    )
)
_OPPOSITE_PAIRS = _words(
    "most-least more-less more-fewer increase-decrease raise-lower higher-lower open-close open-closed "
    "on-off enable-disable lock-unlock buy-sell before-after include-exclude included-excluded "
    "add-remove start-stop start-end minimum-maximum min-max upload-download import-export in-out "
    "up-down full-part men-women male-female private-public free-paid early-late first-last old-new "
    "send-receive sent-received deposit-withdraw credit-debit allow-block accept-decline join-leave "
    "safe-unsafe legal-illegal above-below over-under"
)
OPPOSITES: dict[str, set[str]] = {}
for _pair in _OPPOSITE_PAIRS:
    _a, _b = _pair.split("-")
    OPPOSITES.setdefault(_a, set()).add(_b)
    OPPOSITES.setdefault(_b, set()).add(_a)
_ANTONYM_PREFIXES = ("un", "in", "im", "dis", "non", "ir", "il", "de")
# words whose presence or absence does not change a question (greetings, function words)
FILLERS = frozenset(
    _words(
        "hi hello hey please pls thanks thank you okay ok so um uh well just team there the a an my me i "
        "im is are do does can could would will to of for and or what whats how it its that this be in "
        "on at with your we our us any"
    )
)
NUMBER_OVERLAP = 0.5  # content-word Jaccard above which a differing number is a trap
_DIRECTIONAL = frozenset(_words("from to into than vs versus between over instead"))


@lru_cache(maxsize=TOKEN_CACHE_SIZE)
def _tokens(text: str) -> tuple[str, ...]:
    t = unicodedata.normalize("NFKC", text).casefold().replace("\u2019", "'")
    return tuple(w.replace("'", "") for w in _TOKEN.findall(t))


def _stem(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    for suffix in ("es", "s"):
        if len(word) > 4 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def _is_number(word: str) -> bool:
    return any(c.isdigit() for c in word) or word in NUMBER_WORDS or word[:1] in "£$€"


def _directions(tokens: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for i, w in enumerate(tokens):
        if w in _DIRECTIONAL:
            nxt = next((x for x in tokens[i + 1 :] if x not in FILLERS), None)
            if nxt:
                out.append((w, nxt))
    return sorted(out)


def trap_guard(query: str, candidate: str) -> str | None:
    """Why two similar questions must not share an answer (None when no trap is seen).

    A second-stage check on the nearest candidate. Sentence embeddings put "lock my card" and
    "unlock my card", or "at 2pm" and "at 2am", at cosine 0.8 to 0.99, above any useful threshold;
    these lexical rules catch such minimal edits. They cost some true paraphrases (a reworded
    question that happens to mention a number) but those become misses, never wrong answers.
    """
    ta, tb = _tokens(query), _tokens(candidate)
    sa, sb = {_stem(w) for w in ta}, {_stem(w) for w in tb}
    only_a, only_b = sa - sb, sb - sa
    rest_a, rest_b = sa - NEGATIONS - FILLERS, sb - NEGATIONS - FILLERS
    overlap = len(rest_a & rest_b) / max(len(rest_a | rest_b), 1)
    # negation matters when the rest of the question is the same; a rewording may add a "not"
    if overlap >= 0.5 and sum(w in NEGATIONS for w in ta) % 2 != sum(w in NEGATIONS for w in tb) % 2:
        return "negation"
    # a number or date that differs matters in a minimal edit; a rewording that mentions one
    # (while sharing little else) is left to the similarity and the vote
    if overlap >= NUMBER_OVERLAP and any(_is_number(w) for w in only_a | only_b):
        return "number"
    for w in only_a:
        for v in only_b:
            if v in OPPOSITES.get(w, ()):
                return "opposite"
            if any(w == p + v or v == p + w for p in _ANTONYM_PREFIXES):
                return "opposite"
    content_a, content_b = only_a - FILLERS, only_b - FILLERS
    if content_a and content_b and len(content_a) <= 2 and len(content_b) <= 2 and len(sa & sb) >= 3:
        return "substitution"
    if sa == sb and ta != tb:
        da, db = _directions(ta), _directions(tb)
        if da and db and da != db:
            return "swap"
    return None


def wilson_upper(errors: int, n: int, z: float = WILSON_Z) -> float:
    if n == 0:
        return 1.0
    p = errors / n
    denom = 1 + z * z / n
    return (p + z * z / (2 * n) + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / denom


def _same_answer(a: str, b: str) -> bool:
    return canonical_text(a) == canonical_text(b)


# --- Lua: store with expiry reclaim and eviction, atomically ----------------------------------
# KEYS: entry, lfu zset, expiry zset, sizes hash, bytes counter, stream
# ARGV: id, query, response, embedding, created, params, size, ttl_ms (0 = none), now_ms,
#       max_entries, max_bytes, scope, stream maxlen, reclaim limit, lfu score
_STORE_SCRIPT = """
local id, scope = ARGV[1], ARGV[12]
local now, ttl = tonumber(ARGV[9]), tonumber(ARGV[8])
local removed = {}
local function forget(victim)
  local s = redis.call('HGET', KEYS[4], victim)
  if s then redis.call('DECRBY', KEYS[5], s) end
  redis.call('HDEL', KEYS[4], victim)
  redis.call('ZREM', KEYS[2], victim)
  redis.call('ZREM', KEYS[3], victim)
  redis.call('UNLINK', scope .. ':e:' .. victim)
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[13], '*', 'op', 'del', 'scope', scope, 'id', victim)
  table.insert(removed, victim)
end
for _, victim in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[14]))) do
  forget(victim)
end
redis.call('HSET', KEYS[1], 'scope', scope, 'query', ARGV[2], 'response', ARGV[3], 'embedding', ARGV[4],
  'created', ARGV[5], 'params', ARGV[6], 'hits', 0, 'tau', -1)
redis.call('HSET', KEYS[4], id, ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[15], id)
local total = redis.call('INCRBY', KEYS[5], ARGV[7])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('ZADD', KEYS[3], now + ttl, id)
  -- the scope's bookkeeping outlives its last entry a little, then goes too
  for i = 2, 5 do redis.call('PEXPIRE', KEYS[i], ttl + 60000) end
end
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[13], '*', 'op', 'add', 'scope', scope, 'id', id)
local max_entries, max_bytes = tonumber(ARGV[10]), tonumber(ARGV[11])
while redis.call('ZCARD', KEYS[2]) > max_entries or tonumber(redis.call('GET', KEYS[5]) or '0') > max_bytes do
  local victims = redis.call('ZRANGE', KEYS[2], 0, 1)
  local victim = victims[1]
  if victim == id then victim = victims[2] end
  if not victim then break end
  forget(victim)
end
return removed
"""

# KEYS: entry; ARGV: similarity -> tau = max(tau, similarity) if the entry still exists
_TAU_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local tau = tonumber(redis.call('HGET', KEYS[1], 'tau') or '-1')
  if tonumber(ARGV[1]) > tau then redis.call('HSET', KEYS[1], 'tau', ARGV[1]) end
end
return 0
"""


# KEYS: entry, lfu zset; ARGV: id, hits. Counts only entries that still exist: an entry evicted or
# purged since the hit must not be resurrected as a stray hash or zset member.
_HIT_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'hits', ARGV[2])
  redis.call('ZADD', KEYS[2], 'XX', 'INCR', ARGV[2], ARGV[1])
end
return 0
"""


# KEYS: entries; returns each one's learned threshold, or nil where the entry no longer exists
_VALIDATE_SCRIPT = """
local out = {}
for i, k in ipairs(KEYS) do
  out[i] = redis.call('HGET', k, 'tau') or false  -- a nil would end the Lua array
end
return out
"""


@dataclass
class _ScopeIndex:
    dim: int
    index: Any = None
    ids: set[int] = field(default_factory=set)
    # id -> [query, response, tau]: lets a lookup decide a miss without Redis (hits are validated)
    meta: dict[int, list[Any]] = field(default_factory=dict)
    floor: float = VOTE_FLOOR
    band_n: int = 0
    band_wrong: int = 0

    def __post_init__(self) -> None:
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def add(self, ids: Sequence[int], vectors: np.ndarray, meta: Sequence[list[Any]]) -> None:
        fresh = [i for i, entry_id in enumerate(ids) if entry_id not in self.ids]
        if not fresh:
            return
        for i in fresh:
            self.meta[ids[i]] = meta[i]
        self.index.add_with_ids(
            np.ascontiguousarray(vectors[fresh], dtype=np.float32),
            np.asarray([ids[i] for i in fresh], dtype=np.int64),
        )
        self.ids.update(ids[i] for i in fresh)

    def remove(self, ids: Sequence[int]) -> None:
        gone = [i for i in ids if i in self.ids]
        if gone:
            self.index.remove_ids(np.asarray(gone, dtype=np.int64))
            self.ids.difference_update(gone)
            for i in gone:
                self.meta.pop(i, None)


@dataclass
class _Candidate:
    entry_id: int
    similarity: float
    query: str
    response: str
    tau: float


class SemanticCache:
    def __init__(
        self,
        client: redis.Redis,
        *,
        threshold: float,
        mode: Literal["static", "adaptive"] = "adaptive",
        max_entries: int = 100_000,
        max_bytes: int = 256 << 20,
        ttl_s: float | None = 86400,
        error_bound: float = 0.01,
        dim: int = 384,
        guard: bool = True,
    ) -> None:
        if mode not in ("static", "adaptive"):
            raise ValueError(f"mode must be 'static' or 'adaptive', got {mode!r}")
        faiss.omp_set_num_threads(FAISS_OMP_THREADS)
        self.client = client
        self.threshold = threshold
        self.mode = mode
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.error_bound = error_bound
        self.dim = dim
        self.use_guard = guard
        self.guard = RedisGuard()
        self._store = client.register_script(_STORE_SCRIPT)
        self._tau = client.register_script(_TAU_SCRIPT)
        self._hit = client.register_script(_HIT_SCRIPT)
        self._validate = client.register_script(_VALIDATE_SCRIPT)
        self._lock = threading.RLock()
        self._scopes: dict[str, _ScopeIndex] = {}
        self._cursor = "$"  # set properly on the first sync
        self._epoch: bytes | None = None
        self._last_sync = 0.0
        self._last_trim_check = 0.0
        self._needs_reset = False
        self._hit_buffer: Counter[tuple[str, int]] = Counter()
        self._pending: OrderedDict[tuple[str, str], list[_Candidate]] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.counters = {
            "lookups": 0,
            "hits": 0,
            "misses": 0,
            "bypass": 0,
            "stores": 0,
            "evicted": 0,
            "guard_rejects": 0,
            "vote_rejects": 0,
            "tau_rejects": 0,
            "stale_candidates": 0,
            "tau_updates": 0,
        }

    # -- scope ----------------------------------------------------------------------------------
    @staticmethod
    def scope(*, tenant: str, model: str, version: str, system_prompt: str, params: dict[str, Any]) -> str:
        """Everything but the user's question that must be equal for a hit, as one key prefix.

        ``sem.{tenant}:{model}:{version}:{sha256(system prompt, params)}``: tenant, model and
        version stay readable so purges can find a tenant's or a version's scopes by prefix.
        """
        ident = digest(canonical_json({"system": system_prompt or "", "params": params or {}}))[:32]
        return make_key(f"sem.{safe_part(tenant)}", safe_part(model), safe_part(version), ident)

    # -- public API -----------------------------------------------------------------------------
    def lookup(self, scope: str, query: str, vector: np.ndarray) -> SemanticHit | None:
        self.counters["lookups"] += 1
        try:
            return self._lookup(scope, query, self._as_vector(vector))
        except CacheUnavailable:
            self.counters["bypass"] += 1
            self._needs_reset = True
            raise

    def store(
        self, scope: str, query: str, vector: np.ndarray, response: str, params: dict[str, Any] | None = None
    ) -> str | None:
        """Store the model's answer; returns the entry id (None when it exceeds the byte budget)."""
        vec = self._as_vector(vector)
        embedding = vec.tobytes()
        size = len(query.encode()) + len(response.encode()) + len(embedding) + ENTRY_OVERHEAD_BYTES
        if size > self.max_bytes:
            return None
        self._learn(scope, query, response)
        entry_id = secrets.randbits(62)
        now = time.time()
        ttl_ms = int(self.ttl_s * 1000) if self.ttl_s else 0
        keys = [
            f"{scope}:e:{entry_id}",
            f"{scope}:lfu",
            f"{scope}:exp",
            f"{scope}:sizes",
            f"{scope}:bytes",
            STREAM_KEY,
        ]
        args = [
            entry_id, query, response, embedding, now, json.dumps(params or {}), size, ttl_ms, int(now * 1000),
            self.max_entries, self.max_bytes, scope, STREAM_MAXLEN, RECLAIM_PER_STORE, self._lfu_score(0, now),
        ]  # fmt: skip
        self._maybe_sync()
        # this replica's recent hits must count before the store script picks eviction victims
        self.guard.call(self._flush_hits)
        index = self._ensure_scope(scope)
        removed = self.guard.call(lambda: self._store(keys=keys, args=args))
        with self._lock:
            index.add([entry_id], vec[None, :], [[query, response, -1.0]])
            if removed:
                index.remove([int(r) for r in removed])
        self.counters["stores"] += 1
        self.counters["evicted"] += len(removed)
        return str(entry_id)

    def sync(self) -> int:
        """Apply stream events (adds, deletes, scope drops) to the local mirrors; returns how many."""
        return self.guard.call(self._sync)

    def start_background_sync(self, interval_s: float = 0.2) -> None:
        if self._thread and self._thread.is_alive():
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.sync()
                    if time.monotonic() - self._last_trim_check > TRIM_CHECK_S:
                        self._check_trimmed()
                except CacheUnavailable:
                    self._needs_reset = True
                except Exception:  # noqa: BLE001 - a sync thread must survive anything and retry
                    time.sleep(interval_s)

        self._thread = threading.Thread(target=loop, name="semantic-cache-sync", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)
            self._thread = None

    def purge_scope(self, scope: str) -> int:
        """Delete every entry of a scope on all replicas."""
        return self._purge(glob_escape(scope + ":") + "*")

    def delete_model_version(self, model: str, version: str | None = None) -> int:
        """Delete a model's (or one version's) entries in every tenant: the background purge."""
        tail = safe_part(model) + ":" + (safe_part(version) + ":" if version is not None else "")
        return self._purge(glob_escape("sem.") + "*:" + glob_escape(tail) + "*")

    def delete_tenant(self, tenant: str) -> int:
        return self._purge(glob_escape(f"sem.{safe_part(tenant)}:") + "*")

    def stats(self) -> dict[str, Any]:
        with self._lock:
            scopes = {
                s: {"mirrored": len(ix.ids), "floor": round(ix.floor, 3)} for s, ix in self._scopes.items()
            }
        out: dict[str, Any] = {
            "mode": self.mode,
            "threshold": self.threshold,
            "counters": dict(self.counters),
        }
        try:

            def run() -> list[Any]:
                pipe = self.client.pipeline(transaction=False)
                for s in scopes:
                    pipe.zcard(f"{s}:lfu")
                    pipe.get(f"{s}:bytes")
                return pipe.execute()

            raw = self.guard.call(run) if scopes else []
            for i, s in enumerate(scopes):
                scopes[s].update(entries=int(raw[2 * i]), bytes=int(raw[2 * i + 1] or 0))
            out["available"] = True
        except CacheUnavailable:
            out["available"] = False
        out["scopes"] = scopes
        return out

    # -- internals ------------------------------------------------------------------------------
    def _as_vector(self, vector: np.ndarray) -> np.ndarray:
        vec = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vec.shape[0] != self.dim:
            raise ValueError(f"expected a {self.dim}-dim vector, got {vec.shape[0]}")
        return vec

    @staticmethod
    def _lfu_score(hits: int, created: float) -> float:
        # least hits first; among equal hits the oldest first (created/1e10 stays below 1)
        return hits + created / 1e10

    def _reset_local(self) -> None:
        with self._lock:
            self._scopes.clear()
            self._pending.clear()
            self._cursor = "$"
            self._epoch = None
            self._needs_reset = False

    def _maybe_sync(self) -> None:
        if time.monotonic() - self._last_sync >= SYNC_MIN_INTERVAL_S:
            self.sync()

    def _sync(self) -> int:
        if self._needs_reset:
            self._reset_local()
        if self._epoch is not None and self._cursor != "$":
            # steady state, one round trip: buffered hit counts, the epoch, the next events
            with self._lock:
                buffered, self._hit_buffer = self._hit_buffer, Counter()
            pipe = self.client.pipeline(transaction=False)
            self._queue_hits(pipe, buffered)
            pipe.get(EPOCH_KEY)
            pipe.xread({STREAM_KEY: self._cursor}, count=1000)
            replies = pipe.execute()
            epoch, reply = replies[-2], replies[-1]
            if epoch == self._epoch:
                applied = 0
                while reply:
                    events = reply[0][1]
                    applied += self._apply(events)
                    self._cursor = events[-1][0].decode()
                    if len(events) < 1000:
                        break
                    reply = self.client.xread({STREAM_KEY: self._cursor}, count=1000)
                self._last_sync = time.monotonic()
                return applied
        epoch = self.client.get(EPOCH_KEY)
        if epoch is None:
            self.client.set(EPOCH_KEY, secrets.token_hex(8), nx=True)
            epoch = self.client.get(EPOCH_KEY)
        if self._epoch is not None and epoch != self._epoch:
            # Redis was restarted or flushed: everything mirrored is gone from the source of truth
            self._reset_local()
        if self._epoch is None:
            self._epoch = epoch
            if self._cursor == "$":
                last = self.client.xrevrange(STREAM_KEY, count=1)
                self._cursor = last[0][0].decode() if last else "0-0"
        # lost if Redis is down now: eviction order only needs approximate counts
        with contextlib.suppress(redis.RedisError):
            self._flush_hits()
        applied = 0
        while True:
            reply = self.client.xread({STREAM_KEY: self._cursor}, count=1000)
            if not reply:
                break
            events = reply[0][1]
            applied += self._apply(events)
            self._cursor = events[-1][0].decode()
            if len(events) < 1000:
                break
        self._last_sync = time.monotonic()
        return applied

    def _apply(self, events: list[tuple[bytes, dict[bytes, bytes]]]) -> int:
        adds: list[tuple[str, int]] = []
        applied = 0
        with self._lock:
            for _, fields in events:
                scope = fields[b"scope"].decode()
                op = fields[b"op"]
                if op == b"drop":
                    self._scopes.pop(scope, None)
                    applied += 1
                    continue
                index = self._scopes.get(scope)
                if index is None:  # not mirrored here: it will be loaded whole when first used
                    continue
                entry_id = int(fields[b"id"])
                if op == b"add" and entry_id not in index.ids:
                    adds.append((scope, entry_id))
                elif op == b"del":
                    index.remove([entry_id])
                    applied += 1
        if adds:
            pipe = self.client.pipeline(transaction=False)
            for scope, entry_id in adds:
                pipe.hmget(f"{scope}:e:{entry_id}", _MIRROR_FIELDS)
            rows = pipe.execute()
            with self._lock:
                for (scope, entry_id), row in zip(adds, rows, strict=True):
                    index = self._scopes.get(scope)
                    if row[0] is None or index is None:  # deleted since, or scope dropped
                        continue
                    index.add([entry_id], np.frombuffer(row[0], dtype=np.float32)[None, :], [_meta(row)])
                    applied += 1
        return applied

    def _check_trimmed(self) -> None:
        """If the stream was trimmed past our cursor we missed events: reload mirrors lazily."""
        self._last_trim_check = time.monotonic()
        first = self.guard.call(lambda: self.client.xrange(STREAM_KEY, count=1))
        if first and self._cursor not in ("$", "0-0") and _id_lt(self._cursor, first[0][0].decode()):
            self._reset_local()

    def _ensure_scope(self, scope: str) -> _ScopeIndex:
        with self._lock:
            index = self._scopes.get(scope)
        if index is not None:
            return index
        index = _ScopeIndex(self.dim)

        def load() -> None:
            ids = [int(m) for m in self.client.zrange(f"{scope}:lfu", 0, -1)]
            for start in range(0, len(ids), SNAPSHOT_BATCH):
                chunk = ids[start : start + SNAPSHOT_BATCH]
                pipe = self.client.pipeline(transaction=False)
                for entry_id in chunk:
                    pipe.hmget(f"{scope}:e:{entry_id}", _MIRROR_FIELDS)
                rows = pipe.execute()
                alive = [(i, r) for i, r in zip(chunk, rows, strict=True) if r[0] is not None]
                if alive:
                    vectors = np.stack([np.frombuffer(r[0], dtype=np.float32) for _, r in alive])
                    index.add([i for i, _ in alive], vectors, [_meta(r) for _, r in alive])

        # events up to now are reflected in the snapshot; later ones are applied on top (adds are
        # idempotent by id, deletes of absent ids are no-ops), so the mirror converges
        self.guard.call(load)
        with self._lock:
            return self._scopes.setdefault(scope, index)

    def _lookup(self, scope: str, query: str, vec: np.ndarray) -> SemanticHit | None:
        if not self.guard.available:  # Redis failed moments ago: the mirror alone never answers
            raise CacheUnavailable("redis unavailable (backing off)")
        self.guard.call(self._maybe_sync)
        index = self._ensure_scope(scope)
        adaptive = self.mode == "adaptive"
        k = VOTE_K if adaptive else 1
        with self._lock:
            if index.index.ntotal == 0:
                self.counters["misses"] += 1
                return None
            sims, ids = index.index.search(vec[None, :], min(k, index.index.ntotal))
        floor = min(index.floor, self.threshold) if adaptive else self.threshold
        cutoff = floor - (VOTE_MARGIN + FLOOR_STEP if adaptive else 0.0)
        # only the nearest and its vote window can matter, so only they are fetched from Redis
        cutoff = max(cutoff, float(sims[0][0]) - VOTE_MARGIN)
        with self._lock:
            local = [
                _Candidate(int(i), float(s), *index.meta[int(i)])
                for i, s in zip(ids[0], sims[0], strict=True)
                if i >= 0 and s >= cutoff and int(i) in index.meta
            ]
        # Decide on the mirror first: a miss needs no Redis at all. A hit is decided again on the
        # candidates as Redis has them now (existence, learned thresholds), so nothing purged,
        # evicted or expired anywhere is ever served.
        answer = self._decide(scope, query, local, floor, remember=True) if local else None
        if answer is not None:
            fresh = self._fetch(scope, [(c.entry_id, c.similarity) for c in local])
            unchanged = len(fresh) == len(local) and all(
                f.tau == c.tau for f, c in zip(fresh, local, strict=True)
            )
            if not unchanged:
                answer = self._decide(scope, query, fresh, floor, remember=False) if fresh else None
        if answer is None:
            self.counters["misses"] += 1
            return None
        self._count_hit(scope, answer.entry_id)
        self.counters["hits"] += 1
        return SemanticHit(
            response=answer.response,
            similarity=answer.similarity,
            entry_id=str(answer.entry_id),
            query=answer.query,
        )

    def _decide(
        self, scope: str, query: str, candidates: list[_Candidate], floor: float, remember: bool
    ) -> _Candidate | None:
        if self.mode == "static":
            return self._static(candidates[0], query, count=remember)
        answer = self._vote(candidates, query, floor, count=remember)
        if answer is None and remember:
            shadow = self._vote(candidates, query, floor - FLOOR_STEP, count=False)
            self._remember(scope, query, candidates, shadow)
        return answer

    def _fetch(self, scope: str, found: list[tuple[int, float]]) -> list[_Candidate]:
        """Candidates' fields from Redis, the source of truth: an entry gone there is not served."""

        # entries are immutable but for hits and tau, so the answer text comes from the mirror and
        # Redis is asked only whether each entry still exists and what its learned threshold is
        keys = [f"{scope}:e:{entry_id}" for entry_id, _ in found]
        taus = self.guard.call(lambda: self._validate(keys=keys))
        out: list[_Candidate] = []
        gone: list[int] = []
        with self._lock:
            index = self._scopes.get(scope)
            meta = {i: index.meta[i] for i, _ in found if i in index.meta} if index is not None else {}
        for (entry_id, sim), tau in zip(found, taus, strict=True):
            if tau is None or entry_id not in meta:
                gone.append(entry_id)
                continue
            query, response, _ = meta[entry_id]
            out.append(_Candidate(entry_id, sim, query, response, float(tau)))
        with self._lock:
            index = self._scopes.get(scope)
            if index is not None:
                index.remove(gone)
                for c in out:  # refresh the mirror's copy (thresholds learned on other replicas)
                    if c.entry_id in index.meta:
                        index.meta[c.entry_id][2] = c.tau
        self.counters["stale_candidates"] += len(gone)
        return out

    def _static(self, top: _Candidate, query: str, count: bool = True) -> _Candidate | None:
        if top.similarity < self.threshold:
            return None
        if self.use_guard and trap_guard(query, top.query) is not None:
            self.counters["guard_rejects"] += count
            return None
        return top

    def _vote(
        self, candidates: list[_Candidate], query: str, floor: float, count: bool = True
    ) -> _Candidate | None:
        top = candidates[0]
        if top.similarity < floor:
            return None
        if self.use_guard and trap_guard(query, top.query) is not None:
            if count:
                self.counters["guard_rejects"] += 1
            return None
        if top.similarity <= top.tau:
            if count:
                self.counters["tau_rejects"] += 1
            return None
        window = [c for c in candidates if c.similarity >= top.similarity - VOTE_MARGIN]
        needed = 1 if top.similarity >= max(self.threshold, NEAR_DUPLICATE) else VOTE_MIN
        if len(window) < needed or any(not _same_answer(c.response, top.response) for c in window):
            if count:
                self.counters["vote_rejects"] += 1
            return None
        return top

    def _remember(
        self, scope: str, query: str, candidates: list[_Candidate], shadow: _Candidate | None
    ) -> None:
        # kept until the caller stores the model's answer for this query (see _learn); the shadow
        # is what the vote would have answered with the floor one step lower
        key = (scope, query)
        with self._lock:
            self._pending[key] = [shadow, *candidates] if shadow else [None, *candidates]  # type: ignore[list-item]
            self._pending.move_to_end(key)
            while len(self._pending) > PENDING_MAX:
                self._pending.popitem(last=False)

    def _learn(self, scope: str, query: str, response: str) -> None:
        """Learn from a miss whose true answer is now known (the model's, being stored)."""
        with self._lock:
            pending = self._pending.pop((scope, query), None)
        if not pending:
            return
        shadow, candidates = pending[0], pending[1:]
        with self._lock:
            index = self._scopes.get(scope)
            if shadow is not None and index is not None:
                index.band_n += 1
                index.band_wrong += not _same_answer(shadow.response, response)
                self._adapt_floor(index)
        wrong = [c for c in candidates[:3] if not _same_answer(c.response, response)]
        if wrong:
            with self._lock:
                if index is not None:
                    for c in wrong:
                        if c.entry_id in index.meta:
                            index.meta[c.entry_id][2] = max(index.meta[c.entry_id][2], c.similarity)

            def run() -> None:
                pipe = self.client.pipeline(transaction=False)
                for c in wrong:
                    self._tau(keys=[f"{scope}:e:{c.entry_id}"], args=[c.similarity], client=pipe)
                pipe.execute()

            self.guard.call(run)
            self.counters["tau_updates"] += len(wrong)

    def _adapt_floor(self, index: _ScopeIndex) -> None:
        if index.band_n < FLOOR_MIN_OBS:
            return
        if (
            wilson_upper(index.band_wrong, index.band_n) <= self.error_bound
            and index.floor - FLOOR_STEP >= VOTE_FLOOR_MIN - 1e-9
        ):
            index.floor -= FLOOR_STEP
            index.band_n = index.band_wrong = 0
        elif index.band_wrong / index.band_n > 2 * self.error_bound:
            # the band below is clearly riskier than the bound: start counting afresh
            index.band_n = index.band_wrong = 0

    def _count_hit(self, scope: str, entry_id: int) -> None:
        # buffered and written by the next sync (at most SYNC_MIN_INTERVAL_S later): keeps a round
        # trip off the hit path; eviction order only needs approximate counts
        with self._lock:
            self._hit_buffer[(scope, entry_id)] += 1

    def _flush_hits(self) -> None:
        with self._lock:
            buffered, self._hit_buffer = self._hit_buffer, Counter()
        if not buffered:
            return
        pipe = self.client.pipeline(transaction=False)
        self._queue_hits(pipe, buffered)
        pipe.execute()

    def _queue_hits(self, pipe: Any, buffered: Counter[tuple[str, int]]) -> None:
        for (scope, entry_id), n in buffered.items():
            self._hit(keys=[f"{scope}:e:{entry_id}", f"{scope}:lfu"], args=[entry_id, n], client=pipe)

    def _purge(self, pattern: str) -> int:
        def run() -> int:
            scopes: set[str] = set()
            deleted = 0
            batch: list[bytes] = []
            for key in self.client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                k = key.decode()
                if k.endswith(":lfu"):
                    scopes.add(k[: -len(":lfu")])
                if len(batch) >= 1000:
                    deleted += int(self.client.unlink(*batch))
                    batch = []
            if batch:
                deleted += int(self.client.unlink(*batch))
            for scope in scopes:
                self.client.xadd(
                    STREAM_KEY,
                    {"op": "drop", "scope": scope, "id": 0},
                    maxlen=STREAM_MAXLEN,
                    approximate=True,
                )
            with self._lock:
                for scope in scopes:
                    self._scopes.pop(scope, None)
            return deleted

        return self.guard.call(run)


_MIRROR_FIELDS = ["embedding", "query", "response", "tau"]


def _meta(row: list[Any]) -> list[Any]:
    return [row[1].decode(), row[2].decode(), float(row[3]) if row[3] is not None else -1.0]


def _id_lt(a: str, b: str) -> bool:
    ams, _, aseq = a.partition("-")
    bms, _, bseq = b.partition("-")
    return (int(ams), int(aseq or 0)) < (int(bms), int(bseq or 0))
