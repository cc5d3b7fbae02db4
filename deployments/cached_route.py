"""The cached flow every model route shares: exact lookup, single flight, the model, storing.

Chat (:mod:`deployments.chat`) and legacy completions (:mod:`deployments.completions`) answer
the same way once the request identity (:class:`caches.chat.RequestIdentity`) is built: a hit
from the exact cache (``x-cache: exact``, with ``Age``), else one engine call per burst of
identical misses (``coalesced`` for the followers), else the model (``miss``), storing only
complete answers written by the model the identity names. A route adds its own parts through a
few hooks: which engine call, how its stream is reassembled and replayed, and (chat only) extra
lookup and store steps for the semantic layer.

Nothing here may block the event loop or fail a request because a cache failed: the exact cache's
sync Redis calls run in a worker thread, and any Redis error there (not only a lost connection:
OOM, BUSY, a script error) turns into ``x-cache: bypass``. Calls to other deployments that only
serve the caches run under a deadline (:func:`bounded`); a miss or an error is a bypass too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from ray.serve.handle import DeploymentHandle
from starlette.types import Receive, Scope, Send

from caches.cache_control import CacheControl, age_seconds
from caches.chat import CachedAnswer, ModelIdentity, RequestIdentity, request_digest, storable
from caches.coalesce import Coalescer, Flight
from caches.redis_client import REDIS_ERRORS, make_async_client
from caches.result import CacheUnavailable, ResultCache
from deployments import metrics
from deployments.config import AppSettings
from deployments.llm import META_PREFIX
from deployments.openai_compat import StreamAssembler, is_done, is_usage_only, refresh, with_usage
from deployments.openai_surface import open_stream

log = logging.getLogger("tierserve.cached_route")

# How often a route re-reads the LLM's identity (fingerprint, engine defaults), in the
# background: a changed model reaches the keys within this long (answers from it are never stored
# under the old identity meanwhile: each answer carries the fingerprint of the replica that wrote it).
IDENTITY_REFRESH_S = 15.0
# Everything the exact cache's Redis may raise: its Breaker (caches.redis_client) turns every Redis
# error into CacheUnavailable; REDIS_ERRORS stays as a belt for calls made outside the cache.
CACHE_ERRORS = (CacheUnavailable, *REDIS_ERRORS)


class ModelUnavailable(Exception):
    """The LLM deployment failed or is gone (a replica died, all are restarting): the Ingress answers
    503 with this message, never a 500. Clients retry; Serve replaces the replica."""


class Degraded(Exception):
    """A call that only serves the caches missed its deadline or failed: answer without them."""


async def bounded(call: Awaitable[Any], timeout_s: float, what: str) -> Any:
    """``call``'s result, or :class:`Degraded` when it takes longer than ``timeout_s`` or raises.
    A cache step must never make a request slower than the model alone, nor fail it."""
    try:
        return await asyncio.wait_for(call, timeout_s)
    except TimeoutError as exc:
        raise Degraded(f"{what}: no answer within {timeout_s:g}s") from exc
    except Exception as exc:  # noqa: BLE001 - any failure of a cache helper is a bypass, by design
        raise Degraded(f"{what}: {type(exc).__name__}: {exc}") from exc


# The exact cache's sync Redis calls run in threads of their own, never in the loop's default
# executor: that one has cpu_count + 4 workers (6 on a 2-core box), and with a slow Redis sixteen
# requests each holding a worker for a socket timeout would queue everything else that uses it
# (found by tests/e2e/test_slow_redis.py: /healthz waited 2.5 s behind them).
CACHE_IO = ThreadPoolExecutor(max_workers=32, thread_name_prefix="exact-cache")
# A Redis call the exact layer waits for at most (the client's own socket timeout is 0.5 s; this
# also bounds the wait for a free CACHE_IO thread). Past it: bypass. A loopback GET takes ~0.1 ms.
EXACT_TIMEOUT_S = 0.75
# A store comes after the answer was computed and only when the lookup just before it worked, so
# it gets longer: giving up on a store that a busy (not broken) Redis would take in 1 s throws the
# model's work away for the next asker (seen on a loaded 2-core CI box).
STORE_TIMEOUT_S = 3.0
# How long a streamed miss's `[DONE]` waits for its store (read-your-writes for a client that
# repeats at once; normally a few ms); past it the marker goes and the store finishes behind it.
STREAM_STORE_WAIT_S = 1.0


async def cache_io(fn: Callable[..., Any], *args: Any, timeout_s: float = EXACT_TIMEOUT_S) -> Any:
    """``fn(*args)`` in a CACHE_IO thread, waited for at most ``timeout_s`` (TimeoutError past it;
    a call still queued then is dropped, one already running finishes in its thread)."""
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.run_in_executor(CACHE_IO, fn, *args), timeout_s)


async def exact_get(results: ResultCache, key: str) -> tuple[bytes | None, bool]:
    """(stored blob or None, whether the cache answered in time), off the event loop."""
    try:
        return await cache_io(results.get, key), True
    except (*CACHE_ERRORS, TimeoutError):
        return None, False


async def exact_put(results: ResultCache, key: str, blob: bytes) -> bool:
    """Store off the event loop; False when the cache could not take it in time (the answer still goes out)."""
    try:
        await cache_io(results.put, key, blob, timeout_s=STORE_TIMEOUT_S)
    except (*CACHE_ERRORS, TimeoutError):
        return False
    return True



class ClosingStream(StreamingResponse):
    """A streamed answer that runs `on_close` however the response ends. A client that hangs up
    before the first chunk is sent ends the response before its generator ever starts, so the
    generator's own `finally` (which ends the request's flight) never runs: its followers would
    wait out the lease's renewals (up to `caches.coalesce.MAX_WAIT_S`, 120 s) for nothing."""

    def __init__(self, content: AsyncIterator[str], *, on_close: Callable[[], object], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()  # not awaited: it must run even while this task is being cancelled

@dataclasses.dataclass
class Turn:
    """One request on its way through the layers."""

    ident: RequestIdentity
    control: CacheControl
    request: dict[str, Any]
    stream: bool
    include_usage: bool
    started: float
    layer: str = "bypass"  # x-cache of a fresh answer: `miss` when the caches were consulted
    vector: list[float] | None = None  # chat: the question's embedding, once computed
    # chat: the semantic layer picked a would-be hit for verification (its similarity): the model
    # answers, `x-cache: miss` with `x-cache-verify`, and storing the answer judges the candidate
    verify: float | None = None
    flight: Flight | None = None


# (completion, layer, age, similarity) of a servable hit
Hit = tuple[dict[str, Any], str, int, float | None]


class CachedRoute:
    """The shared flow; a route sets :attr:`route`, :attr:`id_prefix` and the engine hooks."""

    route = ""  # the identity's route and the metrics label
    id_prefix = ""  # of a replayed answer's fresh id (OpenAI: chatcmpl-, cmpl-)

    def __init__(self, settings: AppSettings, results: ResultCache, version_of: Callable[[str], str | None],
                 llm: DeploymentHandle, coalescer: Coalescer | None = None) -> None:
        self.settings = settings
        self.model_name = settings.llm.served_model_name
        self.results, self.version_of, self.llm = results, version_of, llm
        self.coalescer = coalescer or Coalescer(make_async_client(
            settings.redis, socket_timeout_s=0.5, connect_timeout_s=0.5))
        self._model_ident: ModelIdentity | None = None
        self._model_ident_at = 0.0
        self._refreshing = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------- hooks
    def _sampling_defaults(self, info: dict[str, Any]) -> dict[str, Any]:
        """The engine's defaults for this route's requests, as the LLM replica reports them."""
        return info.get("default_sampling") or {}

    def _call(self, request: dict[str, Any], tenant: str) -> Awaitable[dict[str, Any]]:
        raise NotImplementedError

    def _call_stream(self, request: dict[str, Any], tenant: str) -> AsyncIterator[str]:
        raise NotImplementedError

    def _assembler(self) -> StreamAssembler:
        raise NotImplementedError

    def _replay(self, body: dict[str, Any], include_usage: bool) -> Iterator[str]:
        raise NotImplementedError

    async def _lookup_more(self, turn: Turn) -> Hit | None:
        """After an exact miss (chat: the semantic layer)."""
        return None

    async def _store_more(self, turn: Turn, completion: dict[str, Any]) -> None:
        """After the exact store (chat: the semantic layer)."""

    # --------------------------------------------------------- model identity
    async def _model_identity(self) -> ModelIdentity:
        """The LLM's identity, fetched once and refreshed in the background so that a changed model
        reaches the keys without a hop on the hit path."""
        if self._model_ident is None:
            await self._refresh_model_identity()
        elif time.monotonic() - self._model_ident_at > IDENTITY_REFRESH_S and not self._refreshing:
            self._refreshing = True
            self._background(self._refresh_model_identity())
        assert self._model_ident is not None
        return self._model_ident

    async def _refresh_model_identity(self) -> None:
        try:
            try:
                info = await self.llm.info.remote()
            except Exception as exc:  # noqa: BLE001 - whatever Ray raises for a failed replica
                raise ModelUnavailable(f"the model is unavailable right now ({type(exc).__name__}); retry shortly") from exc
            self._model_ident = ModelIdentity(name=info["id"], fingerprint=info["fingerprint"],
                                              default_sampling=self._sampling_defaults(info))
            self._model_ident_at = time.monotonic()
        finally:
            self._refreshing = False

    async def _version(self, model: str) -> str | None:
        # ModelVersions reads Redis synchronously (at most twice a second, else from memory): a
        # CACHE_IO thread keeps the loop free. No deadline of ours: the client's socket timeout
        # bounds it. None when it could not be read: the request goes uncached, since a guessed
        # version (the last one seen, the configured one) could serve entries bumped away.
        return await asyncio.get_running_loop().run_in_executor(CACHE_IO, self.version_of, model)

    def _background(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # a refresh retried next time
            log.warning("background step failed: %s", task.exception())

    # -------------------------------------------------------------------- flow
    async def _serve(self, turn: Turn) -> Any:
        """Answer a request whose identity is built: cached, coalesced or fresh."""
        ident, control = turn.ident, turn.control
        if ident.lookup_allowed(control):
            hit = await self._lookup(turn)
            if hit is not None:
                return self._reply_cached(turn, *hit)
        elif ident.cacheable and not control.lookup:
            turn.layer = "miss"  # Cache-Control: no-cache / max-age=0: a fresh answer, stored
        if turn.layer == "miss" and ident.coalesce_allowed(control):
            turn.flight = await self.coalescer.join(ident.exact_key or "")
            if not turn.flight.leader:
                outcome = await self._follow(turn)
                if outcome is not None:
                    return outcome
        return await self._generate(turn)

    async def _lookup(self, turn: Turn) -> Hit | None:
        """Exact, then the route's own layers; None with turn.layer `miss` or `bypass`."""
        ident, control = turn.ident, turn.control
        blob, answered = await exact_get(self.results, ident.exact_key or "")
        turn.layer = "miss" if answered else "bypass"
        entry = CachedAnswer.decode(blob) if blob is not None else None
        fresh = entry is not None and control.fresh_enough(entry.stored_at)
        metrics.lookup("exact", ident.tenant, "hit" if fresh else turn.layer)
        if entry is not None and fresh:
            return refresh(entry.body, self.id_prefix), "exact", age_seconds(entry.stored_at), None
        if turn.layer == "bypass":
            return None
        return await self._lookup_more(turn)

    def _reply_cached(self, turn: Turn, completion: dict[str, Any], layer: str, age: int,
                      similarity: float | None, status: int = 200) -> Any:
        headers = {"x-cache": layer, "age": str(age)}
        if similarity is not None:
            headers["x-cache-similarity"] = f"{similarity:.4f}"
        metrics.observe(self.route, layer, status, turn.started)
        if status != 200:
            return JSONResponse(completion, status_code=status, headers=headers)
        if turn.stream:
            return StreamingResponse(self._replay(completion, turn.include_usage),
                                     media_type="text/event-stream", headers=headers)
        return JSONResponse(completion, headers=headers)

    async def _follow(self, turn: Turn) -> Any | None:
        """A follower of an identical request in flight: its outcome, or None to compute."""
        flight = turn.flight
        assert flight is not None
        try:
            outcome = await flight.wait()
        except BaseException:
            await flight.close()
            raise
        if outcome is None:
            if not flight.leader:
                await flight.close()
                turn.flight = None
            return None
        await flight.close()
        turn.flight = None
        shared = CachedAnswer.decode(outcome)
        if shared is None or not shared.answers(turn.request):
            return None  # unreadable, or a refusal of a request that differs from this one
        if not turn.control.fresh_enough(shared.stored_at):
            # a flight's answer outlives it by a few seconds (for late followers on other
            # replicas): a request whose max-age it no longer meets asks for a fresh one
            return None
        body = refresh(shared.body, self.id_prefix) if shared.status == 200 else shared.body
        return self._reply_cached(turn, body, "coalesced", age_seconds(shared.stored_at), None, status=shared.status)

    async def _generate(self, turn: Turn) -> Any:
        headers = {"x-cache": turn.layer}
        if turn.verify is not None:
            headers["x-cache-verify"] = f"{turn.verify:.4f}"
        try:
            if turn.stream:
                return await self._open_stream(turn, headers)
            try:
                result = await self._call(turn.request, turn.ident.tenant)
            except Exception as exc:  # noqa: BLE001 - whatever Ray raises for a failed replica
                metrics.observe(self.route, turn.layer, 503, turn.started)
                raise ModelUnavailable(f"the model failed to answer ({type(exc).__name__}); retry shortly") from exc
            metrics.observe(self.route, turn.layer, result["status"], turn.started)
            await self._finish(turn, result["status"], result["body"], result.get("fingerprint"))
        finally:
            if turn.flight is not None and not turn.stream:
                await turn.flight.close()
        if result["status"] != 200:
            return JSONResponse(result["body"], status_code=result["status"])
        return JSONResponse(result["body"], headers=headers)

    async def _open_stream(self, turn: Turn, headers: dict[str, str]) -> Any:
        """Start the engine's stream; a request it refuses is a real 4xx before any chunk (SDKs
        raise a typed error), shared with the burst's followers like a non-streamed refusal."""
        handed_over = False
        try:
            try:
                meta, error, stream = await open_stream(self._call_stream(with_usage(turn.request), turn.ident.tenant),
                                                         META_PREFIX)
            except Exception as exc:  # noqa: BLE001 - whatever Ray raises for a failed replica
                metrics.observe(self.route, turn.layer, 503, turn.started)
                raise ModelUnavailable(f"the model failed to answer ({type(exc).__name__}); retry shortly") from exc
            if stream is None:
                error = dict(error or {})
                status = int(error.pop("status", 503))
                metrics.observe(self.route, turn.layer, status, turn.started)
                await self._finish(turn, status, error, meta.get("fingerprint"))
                return JSONResponse(error, status_code=status)
            handed_over = True
            flight = turn.flight
            return ClosingStream(self._stream_miss(turn, meta.get("fingerprint"), stream),
                                 on_close=lambda: flight is not None and self._background(flight.close()),
                                 media_type="text/event-stream", headers=headers)
        finally:
            if turn.flight is not None and not handed_over:
                await turn.flight.close()

    async def _stream_miss(self, turn: Turn, fingerprint: str | None, stream: AsyncIterator[str]) -> AsyncIterator[str]:
        """The engine's stream, forwarded as it comes; stored only when it ended properly. A client
        that hangs up closes this generator mid-way: nothing after the loop runs, nothing is stored."""
        assembler = self._assembler()
        try:
            done: str | None = None
            async for chunk in stream:
                assembler.feed(chunk)
                if is_done(chunk):
                    done = chunk  # held back until the answer is stored (below)
                    continue
                if not turn.include_usage and is_usage_only(chunk):
                    continue  # asked of the engine for the stored answer (with_usage), not by this client
                yield chunk
            metrics.observe(self.route, turn.layer, 200, turn.started)
            # Store before the final `[DONE]`: a client that repeats the request the moment its
            # stream ended must find it (read-your-writes). Bounded: a slow Redis delays the end
            # marker by at most STREAM_STORE_WAIT_S, and the store goes on in the background.
            store = self._background(self._finish(turn, 200, assembler.completion(), fingerprint))
            await asyncio.wait({store}, timeout=STREAM_STORE_WAIT_S)
            if done is not None:
                yield done
        finally:
            if turn.flight is not None:
                await turn.flight.close()

    async def _finish(self, turn: Turn, status: int, completion: dict[str, Any] | None,
                      fingerprint: str | None) -> None:
        """After the engine answered: hand the outcome to followers, store what may be stored."""
        ident = turn.ident
        if fingerprint is not None and fingerprint != ident.model.fingerprint:
            # another model answered (a rolling update): its answer is not this identity's
            self._background(self._refresh_model_identity())
            return
        flight = turn.flight
        if status != 200 or completion is None:
            if flight is not None and 400 <= status < 500 and completion is not None:
                # the same request gets the same refusal: followers need not ask again
                await flight.publish(CachedAnswer(stored_at=time.time(), body=completion, status=status,
                                                  request=request_digest(turn.request)).encode())
            return
        complete, _ = storable(completion)
        if not complete:
            return
        blob = CachedAnswer(stored_at=time.time(), body=completion).encode()
        if flight is not None:
            await flight.publish(blob)
        if turn.layer != "miss" or not ident.store_allowed(turn.control):
            return
        if await exact_put(self.results, ident.exact_key or "", blob):
            await self._store_more(turn, completion)
