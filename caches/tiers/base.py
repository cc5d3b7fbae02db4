"""The tier protocol: every storage layer of the tiered cache speaks these few batched calls.

Batched by design: one network round trip (MGET, RocksDB multi-get, one Feast read) per batch of
keys, never one per key. Values are bytes; the layers above decide the encoding.

Expiry travels with a value: the RAM and SSD tiers answer a read with a `TierRead`, which also
says when each value found expires (absolute unix seconds), and take the same per key on a write
(`expires_at`). The tiered cache moves a value between them with the expiry it already has, so a
promotion or a demotion never starts an entry's TTL anew (caches/tiered_moves.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    errors: int = 0
    bytes: int = 0
    entries: int = 0
    extra: dict[str, float] = field(default_factory=dict)


# An absolute expiry (unix seconds) meaning "never expires": the RocksDB header's and RedisTier's.
NO_EXPIRY = 0.0


def expired(expires_at: float, now: float) -> bool:
    """Whether a value with this absolute expiry is gone at `now` (NO_EXPIRY never is)."""
    return NO_EXPIRY < expires_at <= now


class TierRead(dict[str, bytes]):
    """A tier's answer to `get_many`: the values found (a plain dict to every caller that only
    wants them) and `expires_at`, each found key's absolute expiry (NO_EXPIRY: none), which a
    move to another tier must keep: a copy gets the time its source had left, not a fresh TTL."""

    def __init__(self, values: dict[str, bytes] | None = None, expires_at: dict[str, float] | None = None) -> None:
        super().__init__(values or {})
        self.expires_at: dict[str, float] = expires_at if expires_at is not None else {}


class TierUnavailable(RuntimeError):
    """The tier's backing store cannot be reached right now; callers degrade, never crash."""


@runtime_checkable
class Tier(Protocol):
    name: str

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """Values for the keys this tier holds; absent keys are simply missing from the dict."""
        ...

    def put_many(self, items: dict[str, bytes], ttl_s: float | None = None) -> None: ...

    def delete_many(self, keys: list[str]) -> int: ...

    def size_bytes(self) -> int: ...

    def stats(self) -> TierStats: ...
