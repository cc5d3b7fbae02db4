"""HTTP's own cache controls on a request (RFC 9111 section 5.2.1), as the caches read them.

A client may ask for a fresh answer (``no-cache``), forbid storing this one (``no-store``) or bound
how old a cached answer may be (``max-age=N``). Hits say how old they are with ``Age``. Unknown
directives are ignored, as RFC 9111 asks; a malformed ``max-age`` is ignored too rather than
rejected, because intermediaries add and rewrite this header and a request must not fail on it.
"""

from __future__ import annotations

import math
import time

from pydantic import BaseModel, ConfigDict


class CacheControl(BaseModel):
    """The request directives that change what the caches may do for one request."""

    model_config = ConfigDict(frozen=True)

    no_cache: bool = False  # answer fresh (no lookup), still store the fresh answer
    no_store: bool = False  # do not store this answer anywhere (lookups still allowed)
    max_age: float | None = None  # a hit older than this many seconds is not served

    @classmethod
    def parse(cls, header: str | None) -> CacheControl:
        if not header:
            return cls()
        no_cache = no_store = False
        max_age: float | None = None
        for raw in header.split(","):
            name, _, value = raw.strip().partition("=")
            name = name.strip().lower()
            value = value.strip().strip('"')
            if name == "no-cache":
                no_cache = True
            elif name == "no-store":
                no_store = True
            elif name == "max-age" and value.isascii() and value.isdigit():
                # RFC 9111's delta-seconds is ASCII digits: str.isdigit() alone is also true for
                # "²" or "1¹", which float() then refuses (a 500). Anything else is malformed and
                # ignored, as above. The smallest wins when a header carries several (most
                # restrictive); float() takes any length of digits (a huge one is just "forever").
                age = float(value)
                max_age = age if max_age is None else min(max_age, age)
        return cls(no_cache=no_cache, no_store=no_store, max_age=max_age)

    @property
    def lookup(self) -> bool:
        """Whether a cached answer may be served at all (``max-age=0`` means: never)."""
        return not self.no_cache and self.max_age != 0

    def fresh_enough(self, stored_at: float, now: float | None = None) -> bool:
        return self.max_age is None or age_seconds(stored_at, now) <= self.max_age


def age_seconds(stored_at: float, now: float | None = None) -> int:
    """The ``Age`` header value: whole seconds since the answer was stored (never negative)."""
    return max(0, math.floor((time.time() if now is None else now) - stored_at))
