"""Tenants and API keys: ``Authorization: Bearer KEY`` selects the tenant.

Keys come from a dict or from ``TIERSERVE_API_KEYS`` (``"key1=tenantA,key2=tenantB"``). With no
keys configured auth is off and every request is the ``default`` tenant. The tenant is part of
every cache key and scope (and is passed to vLLM as ``cache_salt``), so no lookup crosses tenants.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Mapping
from typing import Any

from caches.keys import safe_part, tenant_namespace

ENV_VAR = "TIERSERVE_API_KEYS"
ADMIN_ENV_VAR = "TIERSERVE_ADMIN_KEYS"
DEFAULT_TENANT = "default"
# How an admin caller is named where a tenant would be (the events' audit entries): parentheses
# are outside the tenant alphabet, so no tenant can be mistaken for it.
ADMIN_SENDER = "(admin)"
# Tenants become key parts: keep them to a safe alphabet rather than escaping everywhere.
_TENANT_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class Unauthorized(Exception):
    """Missing or wrong API key; the HTTP layer answers 401 with this message."""


class Forbidden(Exception):
    """A valid caller without the right to this route (admin routes); the HTTP layer answers 403."""


def _bearer(authorization_header: str | None) -> str | None:
    if not authorization_header:
        return None
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _match(token: str, candidates: list[str]) -> bool:
    # compare against every key in constant time so response timing reveals no key prefix
    found = False
    for key in candidates:
        found |= hmac.compare_digest(key.encode(), token.encode())
    return found


class AdminKeys:
    """Bearer keys with admin rights (version bumps, purges, every tenant's numbers), from
    ``TIERSERVE_ADMIN_KEYS`` (comma-separated). None configured means nobody is admin: admin routes
    answer 403 rather than being open, whatever the tenant auth says."""

    def __init__(self, keys: list[str] | None = None) -> None:
        self.keys = [k for k in (keys or []) if k]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AdminKeys:
        env = os.environ if environ is None else environ
        return cls([k.strip() for k in env.get(ADMIN_ENV_VAR, "").split(",") if k.strip()])

    def is_admin(self, authorization_header: str | None) -> bool:
        token = _bearer(authorization_header)
        return bool(self.keys) and token is not None and _match(token, self.keys)

    def require(self, authorization_header: str | None) -> None:
        """Raise :class:`Forbidden` with what to do unless the caller holds an admin key."""
        if not self.keys:
            raise Forbidden(f"admin routes are disabled: no admin keys are configured (set {ADMIN_ENV_VAR})")
        if not self.is_admin(authorization_header):
            raise Forbidden("this route needs an admin key (Authorization: Bearer ADMIN_KEY); tenant keys have no "
                            "admin rights")


def parse_keys(spec: str) -> dict[str, str]:
    """``"key1=tenantA, key2=tenantB"`` -> {key: tenant}; blank items are ignored."""
    keys: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, tenant = item.partition("=")
        key, tenant = key.strip(), tenant.strip()
        if not sep or not key or not tenant:
            raise ValueError(f"{ENV_VAR}: expected key=tenant, got {item!r}")
        keys[key] = tenant
    return keys


class Tenants:
    def __init__(self, keys: Mapping[str, str] | None = None) -> None:
        self.keys = dict(keys or {})
        for tenant in self.keys.values():
            if not _TENANT_RE.match(tenant):
                raise ValueError(f"invalid tenant name {tenant!r}: use letters, digits and _.@-")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Tenants:
        env = os.environ if environ is None else environ
        return cls(parse_keys(env.get(ENV_VAR, "")))

    @property
    def auth_enabled(self) -> bool:
        return bool(self.keys)

    def tenants(self) -> list[str]:
        return sorted(set(self.keys.values())) if self.keys else [DEFAULT_TENANT]

    def resolve(self, authorization_header: str | None) -> str:
        """The tenant of a request; :class:`Unauthorized` on a missing or unknown key."""
        if not self.keys:
            return DEFAULT_TENANT
        if not authorization_header:
            raise Unauthorized("missing Authorization header (expected 'Bearer KEY')")
        token = _bearer(authorization_header)
        if token is None:
            raise Unauthorized("malformed Authorization header (expected 'Bearer KEY')")
        # compare against every key in constant time so response timing reveals no key prefix
        found: str | None = None
        for key, tenant in self.keys.items():
            if hmac.compare_digest(key.encode(), token.encode()):
                found = tenant
        if found is None:
            raise Unauthorized("invalid API key")
        return found


def tenant_view(tenant: str, *, exact: dict[str, Any], semantic: dict[str, Any],
                lookups: dict[str, dict[str, dict[str, float]]],
                recommendations: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``GET /v1/cache/stats`` shows a tenant: its own counters and scopes, nothing of other
    tenants (not even totals: sizes and hit counts of a shared cache tell a tenant what others ask).
    Admins get the whole picture instead."""
    part = safe_part(tenant)  # as the tenant appears inside keys
    own_prefix = tenant_namespace("sem", tenant) + ":"
    mine = (exact.get("by_tenant") or {}).get(part, {"hits": 0, "misses": 0})
    recs = recommendations or {}
    recs_mine = (recs.get("by_tenant") or {}).get(part, {"hits": 0, "misses": 0})
    return {
        "tenant": tenant,
        "exact": {"hits": mine.get("hits", 0), "misses": mine.get("misses", 0),
                  "available": exact.get("available", exact.get("status") != "unavailable")},
        "semantic": {"scopes": {s: v for s, v in (semantic.get("scopes") or {}).items() if s.startswith(own_prefix)},
                     "available": semantic.get("available", semantic.get("status") != "unavailable")},
        "lookups": {layer: by_tenant.get(tenant, {}) for layer, by_tenant in lookups.items()},
        # the recommendation result cache: its own counters only
        "recommendations": {"hits": recs_mine.get("hits", 0), "misses": recs_mine.get("misses", 0),
                            "available": recs.get("available", False)},
    }
