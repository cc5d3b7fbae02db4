"""Cache key scheme: ``{namespace}:{model}:{version}:{digest}``.

The model name and version sit inside every key so that a version bump makes all old entries
unreachable at once (no scan needed on the hot path); the background purge then deletes them by
prefix. The digest is the SHA-256 of a canonical form of the input, so equivalent inputs that
differ only in whitespace, case, unicode form or JSON key order share one entry.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any

_WS = re.compile(r"\s+")


def canonical_text(text: str) -> str:
    """NFKC-normalise, casefold and collapse whitespace: the text-level equivalence."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()


def canonical_json(value: Any) -> str:
    """Stable JSON: sorted keys, no spaces, strings canonicalised."""

    def norm(v: Any) -> Any:
        if isinstance(v, str):
            return canonical_text(v)
        if isinstance(v, dict):
            return {str(k): norm(x) for k, x in v.items() if x is not None}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return v

    return json.dumps(norm(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(value: Any) -> str:
    payload = value if isinstance(value, str) else canonical_json(value)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


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
