"""Cache key scheme: ``{namespace}:{model identity}:{version}:{digest}``.

The tenant sits in the namespace (``res.{<tenant>}``, ``sem.{<tenant>}``), so no lookup ever
crosses tenants. The braces make the tenant the key's Redis Cluster hash tag: every key of a
tenant's exact and semantic caches, and their budget bookkeeping (:mod:`caches.budget`), hash to
one slot, which is what lets one Lua script store an entry and evict others of the same tenant on
a cluster. (The cost: one tenant's caches live on one master; tenants spread over the masters.) The model identity (served name, a fingerprint of weights and config and a digest of the
engine's default sampling, see :class:`caches.chat.ModelIdentity`) and the version sit inside every key, so that a changed model or a version bump
makes all old entries unreachable at once (no scan on the hot path); the background purge then
deletes them by pattern. The digest is the SHA-256 of the input with *structural*
canonicalisation only (JSON key order, no insignificant whitespace): strings and numbers are hashed
exactly as written (``1.0`` is not ``1``). "What is 3²?" and "What is 32?" are different questions; so are ``print("Hello")`` and
``PRINT("hello")``. Merging differently written questions is the semantic layer's job.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any

_WS = re.compile(r"\s+")


def canonical_json(value: Any) -> str:
    """Stable JSON of a request: sorted keys, no spaces. Numbers are kept as written, like strings:
    ``1.0`` and ``1`` are two keys, because the engine gets the body unchanged and a chat template
    renders tools, ``chat_template_kwargs`` and documents with ``tojson``, so ``"default": 1.0`` and
    ``"default": 1`` are two different prompts. The cost is a lost hit, never a wrong one:
    ``presence_penalty: 0`` and ``0.0`` are two entries. (``temperature`` is typed in the request
    schemas, so it reaches the key as a float either way, and whether a request is greedy is
    decided on its value, :func:`caches.chat.is_greedy`: ``0`` and ``0.0`` are both greedy.) An explicit
    ``null`` is kept too: for some fields the engine reads it differently from an absent field (vLLM's
    ``tool_choice: null`` skips the "tools given -> auto" default), so merging the two could serve
    one the other's answer. The routes drop top-level nulls before the engine sees the request
    (:func:`caches.chat.without_nulls`), so in practice only nested ones reach a key."""

    def norm(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): norm(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return v

    return json.dumps(norm(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(value: Any) -> str:
    """SHA-256 hex of a string as written, or of :func:`canonical_json` of anything else."""
    payload = value if isinstance(value, str) else canonical_json(value)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def canonical_text(text: str) -> str:
    """NFKC, casefold, collapsed whitespace: a loose equality for comparing two *answers* (the
    semantic layer's vote). Never a key: it merges "3²" with "32"."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()


def safe_part(part: str) -> str:
    """A key part may not contain ':' (it separates parts), '@' (it separates a model's name
    from its fingerprint) nor braces (a Redis Cluster hash tag); model names like 'llama3:8b' do.
    Escaped, so distinct names stay distinct."""
    if not part:
        raise ValueError("key part must be non-empty")
    return (part.replace("%", "%25").replace(":", "%3A").replace("@", "%40")
            .replace("{", "%7B").replace("}", "%7D"))  # braces would move a key's hash tag


def tenant_namespace(prefix: str, tenant: str) -> str:
    """``<prefix>.{<tenant>}``: the tenant is the hash tag (see the module note)."""
    return f"{prefix}.{{{safe_part(tenant)}}}"


def glob_escape(text: str) -> str:
    """Escape Redis SCAN MATCH metacharacters so a prefix matches only itself."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _check_part(name: str, part: str) -> str:
    if not part or ":" in part:
        raise ValueError(f"{name} must be non-empty and contain no ':' (got {part!r})")
    return part


def make_key(namespace: str, model: str, version: str, ident: str) -> str:
    """``{namespace}:{model}:{version}:{ident}``; ident is a digest or an entity id."""
    return ":".join(
        (
            _check_part("namespace", namespace),
            _check_part("model", model),
            _check_part("version", str(version)),
            ident,
        )
    )


def key_prefix(namespace: str, model: str, version: str | None = None) -> str:
    """Prefix matching every key of a model (or of one version of it), for purges."""
    parts = [namespace, model] + ([str(version)] if version is not None else [])
    return ":".join(parts) + ":"


def model_version_match(namespace_prefix: str, model: str, version: str | None = None) -> re.Pattern[bytes]:
    """The exact test behind :func:`model_version_patterns`: a glob's ``*`` also matches ':', so
    ``sem.*:m@*:e:*`` (version "e") matched every semantic entry of model m (``...:<scope>:e:<id>``)
    and a purge of that old version emptied the current one. Parts are :func:`safe_part`, so the
    tenant and the fingerprint hold no ':' and the model and version sit at fixed places."""
    version_part = re.escape(safe_part(version).encode()) + b":" if version is not None else b""
    return re.compile(re.escape(f"{namespace_prefix}.".encode()) + rb"[^:]*:" + re.escape(safe_part(model).encode())
                      + rb"(?:@[^:]*)?:" + version_part)


def model_version_patterns(namespace_prefix: str, model: str, version: str | None = None) -> list[str]:
    """SCAN patterns of every key of a model (any fingerprint), or of one version of it, in every
    tenant: ``{ns}.*:{model}@*:{version}:*``, and the same without a fingerprint for entries that
    releases before fingerprints stored (they would otherwise linger until their TTL). A SCAN
    pattern over-matches: keep only the keys :func:`model_version_match` accepts."""
    head = glob_escape(f"{namespace_prefix}.") + "*:" + glob_escape(safe_part(model))
    tail = (":" + glob_escape(safe_part(version)) + ":*") if version is not None else ":*"
    return [head + "@*" + tail, head + tail]
