"""Single-use tokens for streaming URLs, as kubelet's streaming server keeps them: the RPC
validates a request and caches it under a random token; the first HTTP request that
presents the token takes it, and a token unused after `ttl` seconds is gone."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from shoal_common.errors import Unavailable

T = TypeVar("T")

TOKEN_TTL = 60.0  # kubelet's CacheTokenTTL
MAX_IN_FLIGHT = 1000  # kubelet's MaxInFlight: requests cached and not yet used


@dataclass(frozen=True)
class _Entry(Generic[T]):
    kind: str
    request: T
    expires: float


class TokenCache(Generic[T]):
    def __init__(self, ttl: float = TOKEN_TTL, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.ttl = ttl
        self.max_in_flight = max_in_flight
        self._entries: OrderedDict[str, _Entry[T]] = OrderedDict()  # oldest first

    def _expire(self, now: float) -> None:
        while self._entries:
            token, entry = next(iter(self._entries.items()))
            if entry.expires > now:
                break
            del self._entries[token]

    def insert(self, kind: str, request: T) -> str:
        now = time.monotonic()
        self._expire(now)
        if len(self._entries) >= self.max_in_flight:
            raise Unavailable(f"too many streaming requests in flight ({self.max_in_flight})")
        token = secrets.token_urlsafe(16)  # 128 random bits, URL-safe
        self._entries[token] = _Entry(kind, request, now + self.ttl)
        return token

    def consume(self, kind: str, token: str) -> T | None:
        """The request cached under `token` for `kind` (exec, attach, portforward), once."""
        self._expire(time.monotonic())
        entry = self._entries.get(token)
        if entry is None or entry.kind != kind:
            return None
        del self._entries[token]
        return entry.request

    def __len__(self) -> int:
        return len(self._entries)
