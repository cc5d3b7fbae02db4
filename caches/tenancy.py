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

ENV_VAR = "TIERSERVE_API_KEYS"
DEFAULT_TENANT = "default"
# Tenants become key parts: keep them to a safe alphabet rather than escaping everywhere.
_TENANT_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class Unauthorized(Exception):
    """Missing or wrong API key; the HTTP layer answers 401 with this message."""


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
        scheme, _, token = authorization_header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("malformed Authorization header (expected 'Bearer KEY')")
        # compare against every key in constant time so response timing reveals no key prefix
        found: str | None = None
        for key, tenant in self.keys.items():
            if hmac.compare_digest(key.encode(), token.encode()):
                found = tenant
        if found is None:
            raise Unauthorized("invalid API key")
        return found
