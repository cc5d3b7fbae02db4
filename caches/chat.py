"""One identity per request: what the caches may do with it, decided in one place.

A cache is only as good as its identity. :class:`RequestIdentity` (``ChatIdentity`` is the same
class, its older name) is built once from the validated request *as the engine will see it* (for
chat the deployment's system prompt already in front), the route (:data:`ROUTES`), the tenant,
the model identity (served name, a fingerprint of weights and config, a digest of the engine's own
default sampling, all three in every key) and the encoder identity. It says:

- whether the request is cacheable, and why not (``reason``);
- its exact key: SHA-256 of the route and the request with only structural canonicalisation (JSON
  key order). The route is hashed in, so a chat request and a completion request never share an
  entry, whatever their fields.
  Two requests share an exact entry only when every field that reaches the engine is equal, byte
  for byte; merging differently written questions is the semantic layer's job, never this one's;
- whether the semantic layer may answer it, its semantic scope (everything but the last user
  question, hashed) and the question text as written, which the trap guard reads.

Every request field is part of the identity except :data:`NON_ANSWER_FIELDS`, a short list of
fields shown not to change the answer; a field this module has never heard of is part of it.

Only deterministic answers are cached: the effective sampling must be greedy (an explicit
``temperature: 0``, or no temperature and an engine default of 0, read from the engine, never
assumed). ``seed`` does not make a sampled request cacheable: vLLM documents seeded sampling as
reproducible only for the same batch composition and hardware, so a seeded sample is still one
draw of many. Under greedy decoding the seed changes nothing, but it stays in the key (a field we
do not need to merge on is never worth the risk).

A streamed and a non-stream request share an entry, and a stream is stored rebuilt from its
deltas. A request asking for what the deltas lack (the prompt logprobs of a non-stream body:
:data:`TRANSPORT_BOUND_FIELDS`) keeps the transport in its key; one asking for what no stored
answer keeps (:data:`UNREPLAYABLE_FIELDS`) is never cached.

Only complete answers are stored (:func:`storable`): every choice has a finish reason in
:data:`STORED_FINISH_REASONS`. The semantic layer stores only single-choice, text-only answers that
stopped by themselves, because its answers are served to *other* questions.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from caches.cache_control import CacheControl
from caches.keys import digest, make_key, safe_part, tenant_namespace
from caches.prompts import message_text

# Request fields that never change the answer, each with why. Everything else is in the identity.
NON_ANSWER_FIELDS: dict[str, str] = {
    "model": "a key part of its own, as the model identity (name + weights fingerprint + default sampling)",
    "stream": "transport only: a stored answer is replayed streamed or not, with the same content",
    "stream_options": "include_usage/continuous_usage_stats add usage chunks, not content",
    # stream_interval, request_id and priority are validated by the request schemas
    # (deployments/schemas.py) as vLLM would, so a value vLLM refuses is refused on a hit too
    "stream_interval": "how many tokens vLLM groups per streamed chunk, not which tokens",
    "user": "an end-user id for abuse monitoring; never reaches sampling",
    "request_id": "vLLM's name for the request in logs and metrics",
    "metadata": "OpenAI's stored-completion tags; vLLM ignores them",
    "store": "OpenAI's stored-completion switch; vLLM ignores it",
    "service_tier": "OpenAI's scheduling class; vLLM ignores it",
    "priority": "vLLM's scheduling priority: when the request runs, not what it answers",
    "cache_salt": "replaced by the tenant, which is a key part of its own",
}
# Finish reasons of a complete answer. `stop`: the model ended it (EOS or a stop string). `length`:
# max_tokens (in the key) or the context length (in the model fingerprint) cut it, so the same
# request gets the same cut. `tool_calls`: a complete call, replayed exactly. Never stored:
# `abort`/`error` (the engine did not finish) and anything unknown.
STORED_FINISH_REASONS = frozenset({"stop", "length", "tool_calls"})
# Only these answers may be served to a *different* question (the semantic layer).
SEMANTIC_FINISH_REASONS = frozenset({"stop"})
# Fields whose presence keeps a request away from the semantic layer: a semantic hit replays only
# text written for another question, which cannot carry these.
SEMANTIC_EXCLUDED_FIELDS = ("logprobs", "top_logprobs", "tools", "tool_choice", "functions",
                            "prompt_logprobs", "echo", "return_token_ids", "return_tokens_as_token_ids",
                            "return_prompt_text")
# Fields that ask for parts of the answer a stored answer does not carry whole through both
# transports (a stream is rebuilt from its deltas; a replay sends text, tool calls, logprobs):
# such a request is never cached, since a hit would silently lack what it asked for. Which values
# ask for it: :func:`_asks_for`.
UNREPLAYABLE_FIELDS: dict[str, str] = {
    "return_token_ids": "token ids are not kept through a streamed store or a streamed replay",
}
# Fields that ask for what only one transport carries: a non-stream body has the prompt
# logprobs (vLLM's stream chunks do not) and keeps `prompt_text` (a streamed replay drops it). A
# request asking for them keeps `stream` in its key (it is otherwise a NON_ANSWER_FIELD), so a
# stream and a non-stream request never share an entry: each is served what was stored from its
# own kind. (lm-eval-style scoring, `echo` + `logprobs` with `max_tokens` 0, stays cacheable.)
# Which values ask for them: :func:`_asks_for`.
TRANSPORT_BOUND_FIELDS: dict[str, str] = {
    "prompt_logprobs": "prompt logprobs are in a non-stream body only",
    "echo": ("vLLM then computes prompt logprobs (chat: always, from top_logprobs; completions: with logprobs), "
             "in a non-stream body only"),
    "return_prompt_text": "the rendered prompt is not kept through a streamed replay",
}
# vLLM's own fallback when neither the request nor the model's generation config sets it
# (ChatCompletionRequest._DEFAULT_SAMPLING_PARAMS and CompletionRequest._DEFAULT_SAMPLING_PARAMS in
# vLLM 0.32: both 1.0; tests/unit/test_request_identity.py checks them against vLLM's classes).
VLLM_FALLBACK_TEMPERATURE = 1.0
# The routes whose answers the caches keep, each with why the semantic layer does or does not take
# part. `completions` (legacy /v1/completions) is exact only: a raw prompt has no "last user
# question" to compare, its scope would be the whole prompt, and evaluation harnesses use it with
# echo/logprobs, which a reworded question's answer cannot give.
CHAT, COMPLETIONS = "chat", "completions"
ROUTES: dict[str, str | None] = {
    CHAT: None,
    COMPLETIONS: "raw prompt: no question to compare (exact cache only)",
}


# Hex characters of the weights/config fingerprint and of the default-sampling digest in a key.
FINGERPRINT_CHARS = 16
SAMPLING_DIGEST_CHARS = 16


class ModelIdentity(BaseModel):
    """What produced an answer: served name, fingerprint of weights and config, engine defaults."""

    model_config = ConfigDict(frozen=True)

    name: str
    fingerprint: str
    # What vLLM applies to a field the request leaves out (the generation config's temperature,
    # repetition_penalty, top_k, ...): they change answers, greedy ones included.
    default_sampling: dict[str, Any] = {}

    @property
    def sampling_digest(self) -> str:
        """SHA-256 of :attr:`default_sampling` as :func:`caches.keys.canonical_json` writes it: key
        order does not matter, values do (``1.3`` is not ``1.0``), so equal defaults give one digest
        at every start and different defaults never share an entry."""
        return digest({"default_sampling": self.default_sampling})

    @property
    def key_part(self) -> str:
        """``{name}@{fingerprint[:16]}.{sampling digest[:16]}``: a changed model, or the same
        weights under other default sampling (a new generation config, an engine override), makes
        every old key unreachable."""
        return (f"{safe_part(self.name)}@{self.fingerprint[:FINGERPRINT_CHARS]}"
                f".{self.sampling_digest[:SAMPLING_DIGEST_CHARS]}")

    @property
    def default_temperature(self) -> float:
        value = self.default_sampling.get("temperature")
        return VLLM_FALLBACK_TEMPERATURE if value is None else float(value)


# The model version names the cache entries (a bump makes the old ones unreachable). When it
# cannot be read now, the last one seen or the configured one is a guess that could name entries
# of a version bumped away (caches/versions.py `confirmed`): the request goes uncached instead.
VERSION_UNKNOWN = "the model version could not be read from Redis just now: answered uncached"


class EncoderIdentity(BaseModel):
    """Which text encoder produced the vectors the semantic layer compares."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str


class RequestIdentity(BaseModel):
    """What the caches may do with one request on one route (see the module doc)."""

    model_config = ConfigDict(frozen=True)

    route: str = CHAT
    tenant: str
    model: ModelIdentity
    version: str | None  # None: Redis could not confirm it now (never guessed: VERSION_UNKNOWN)
    cacheable: bool
    reason: str | None = None  # why not cacheable
    semantic_off: str | None = None  # why the semantic layer does not take part
    exact_key: str | None = None
    semantic_scope: str | None = None
    semantic_text: str | None = None
    deterministic: bool = False

    @classmethod
    def build(
        cls,
        request: dict[str, Any],
        *,
        tenant: str,
        model: ModelIdentity,
        version: str | None,
        encoder: EncoderIdentity | None,
        cache_nondeterministic: bool = False,
        semantic_enabled: bool = True,
        route: str = CHAT,
    ) -> RequestIdentity:
        """``request``: the validated request as the engine will get it (system prompt in front)."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; known: {sorted(ROUTES)}")
        body = identity_body(request)
        deterministic = is_greedy(request, model)
        common = {"route": route, "tenant": tenant, "model": model, "version": version,
                  "deterministic": deterministic}
        if version is None:
            return cls(cacheable=False, reason=VERSION_UNKNOWN, **common)
        if not deterministic and not cache_nondeterministic:
            why = "sampled answer (temperature is not 0, explicitly or by the engine's default)"
            return cls(cacheable=False, reason=why, **common)
        unreplayable = [f for f in UNREPLAYABLE_FIELDS if _asks_for(f, body, route)]
        if unreplayable:
            return cls(cacheable=False, reason=f"{unreplayable[0]}: {UNREPLAYABLE_FIELDS[unreplayable[0]]}", **common)
        namespace = tenant_namespace("res", tenant)
        keyed: dict[str, Any] = {"route": route, "request": body}
        if any(_asks_for(f, body, route) for f in TRANSPORT_BOUND_FIELDS):
            keyed["stream"] = bool(request.get("stream"))
        exact_key = make_key(namespace, model.key_part, safe_part(version), digest(keyed))
        scope, text, why = _semantic_parts(body, tenant=tenant, model=model, version=version, encoder=encoder)
        if ROUTES[route] is not None:
            scope, text, why = None, None, ROUTES[route]
        elif not semantic_enabled:
            scope, text, why = None, None, "semantic layer disabled"
        return cls(cacheable=True, exact_key=exact_key, semantic_scope=scope, semantic_text=text,
                   semantic_off=why, **common)

    def lookup_allowed(self, control: CacheControl) -> bool:
        return self.cacheable and control.lookup

    def store_allowed(self, control: CacheControl) -> bool:
        return self.cacheable and not control.no_store

    def coalesce_allowed(self, control: CacheControl) -> bool:
        """Identical concurrent misses share one engine call only where each of them could have
        been served the stored answer anyway: cacheable, not asking for a fresh answer, and (for
        the leader, whose answer the others get) allowed to be stored."""
        return self.cacheable and control.lookup and not control.no_store


# The older name: chat was the first route with an identity.
ChatIdentity = RequestIdentity


def without_nulls(request: dict[str, Any]) -> dict[str, Any]:
    """The request as the engine gets it: a top-level ``null`` means the default, as OpenAI reads
    it, so the field is left out. (vLLM reads some nulls otherwise: ``tool_choice: null`` turns off
    the "tools given -> auto" default, and ``include_reasoning: null`` is a 400.) The identity is
    built from this same body, so the key and the engine never disagree."""
    return {k: v for k, v in request.items() if v is not None}


def identity_body(request: dict[str, Any]) -> dict[str, Any]:
    """The request minus :data:`NON_ANSWER_FIELDS`. It is hashed with
    :func:`caches.keys.canonical_json`: key order does not matter, text and nulls do."""
    return {k: v for k, v in request.items() if k not in NON_ANSWER_FIELDS}


def _asks_for(field: str, body: dict[str, Any], route: str) -> bool:
    """Whether ``body`` asks for what :data:`UNREPLAYABLE_FIELDS` or :data:`TRANSPORT_BOUND_FIELDS`
    says of ``field``, read as vLLM reads it (its ``to_sampling_params``). When unsure, it does:
    a lost hit, never a wrong one."""
    value = body.get(field)
    if field == "prompt_logprobs":
        return value is not None  # 0 asks for them too: each prompt token's own logprob
    if field == "echo":
        # vLLM: `prompt_logprobs = top_logprobs` on chat (0 unless set), `= logprobs` on
        # completions (None unless set; 0 counts), when echo is on and prompt_logprobs unset
        return value not in (None, False) and (route != COMPLETIONS or body.get("logprobs") is not None)
    return value not in (None, False)


def is_greedy(request: dict[str, Any], model: ModelIdentity) -> bool:
    """Greedy decoding: a temperature of 0 (``0`` or ``0.0``), the request's or the engine's."""
    temperature = request.get("temperature")
    effective = model.default_temperature if temperature is None else float(temperature)
    return effective == 0.0


def _semantic_parts(
    body: dict[str, Any], *, tenant: str, model: ModelIdentity, version: str, encoder: EncoderIdentity | None
) -> tuple[str | None, str | None, str | None]:
    """(scope, question text, why-not). The scope hashes everything but the last user question's
    text: system prompt, earlier turns, every other field, the encoder identity."""
    if encoder is None:
        return None, None, "no encoder identity"
    if (body.get("n") or 1) != 1:
        return None, None, "n > 1: the semantic layer stores one answer per question"
    blocked = [f for f in SEMANTIC_EXCLUDED_FIELDS if body.get(f) not in (None, False, [], 0)]
    if blocked:
        return None, None, f"{blocked[0]} asks for what a reworded question's answer cannot give"
    messages = body.get("messages") or []
    if not messages or messages[-1].get("role") != "user":
        return None, None, "the last message is not the user's question"
    last = messages[-1]
    content = last.get("content")
    if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") != "text" for p in content):
        return None, None, "the question has non-text parts"
    text = message_text(last)
    if not text.strip():
        return None, None, "empty question"
    context = {**body, "messages": [*messages[:-1], {k: v for k, v in last.items() if k != "content"}]}
    scope = semantic_scope(tenant=tenant, model=model, version=version, context=context, encoder=encoder)
    return scope, text, None


def semantic_scope(*, tenant: str, model: ModelIdentity, version: str, context: Any, encoder: EncoderIdentity) -> str:
    """``sem.{tenant}:{model}@{fingerprint}.{default sampling}:{version}:{sha256(context, encoder)[:32]}``: tenant,
    model and version stay readable so that purges find a tenant's or a version's scopes."""
    ident = digest({"context": context, "encoder": encoder.model_dump()})[:32]
    return make_key(tenant_namespace("sem", tenant), model.key_part, safe_part(version), ident)


class CachedAnswer(BaseModel):
    """An exact-cache entry: the completion as the engine wrote it, and when it was stored (for
    ``Age`` and ``max-age``)."""

    stored_at: float
    body: dict[str, Any]
    status: int = 200  # a leader shares its 4xx with its followers (see caches.coalesce)
    # A refusal answers the request as sent, byte for byte: vLLM also checks fields that are not
    # in the identity (`stream_options` without `stream`, a `user` that is not a string, an unknown
    # `service_tier`), so identical identities can still get different refusals. For a 4xx, the
    # digest of the whole engine request (`request_digest`); only a follower that sent the same
    # bytes takes it, the others ask the engine themselves.
    request: str | None = None

    def answers(self, request: dict[str, Any]) -> bool:
        """Whether this outcome is the answer to `request` (a follower's, as the engine gets it)."""
        return self.status == 200 or self.request == request_digest(request)

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, blob: bytes) -> CachedAnswer | None:
        """None for an entry this release cannot read (written by an older one): a miss."""
        try:
            return cls.model_validate_json(blob)
        except ValueError:
            return None


def request_digest(request: dict[str, Any]) -> str:
    """SHA-256 of the whole request, non-answer fields included (see :class:`CachedAnswer`)."""
    return digest(request)


def storable(completion: dict[str, Any]) -> tuple[bool, str | None]:
    """Whether a finished completion may be stored in the exact cache (and why not)."""
    choices = completion.get("choices") or []
    if not choices:
        return False, "no choices"
    for choice in choices:
        reason = choice.get("finish_reason")
        if reason not in STORED_FINISH_REASONS:
            return False, f"finish_reason {reason!r} is not a complete answer"
    return True, None


def semantic_answer(completion: dict[str, Any]) -> str | None:
    """The text the semantic layer may store for this completion, or None."""
    choices = completion.get("choices") or []
    if len(choices) != 1 or choices[0].get("finish_reason") not in SEMANTIC_FINISH_REASONS:
        return None
    message = choices[0].get("message") or {}
    if message.get("tool_calls") or choices[0].get("logprobs"):
        return None
    text = message.get("content")
    return text if isinstance(text, str) and text else None
