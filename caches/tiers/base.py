"""The tier protocol: every storage layer of the tiered cache speaks these few batched calls.

Batched by design: one network round trip (MGET, RocksDB multi-get, one Feast read) per batch of
keys, never one per key. Values are bytes; the layers above decide the encoding.
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
