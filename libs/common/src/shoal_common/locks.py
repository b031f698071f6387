"""One asyncio lock per key (an object id), dropped when nobody holds or waits for it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class KeyedLocks:
    """Serialises the commands on one object: a create resent after a silent attempt (the
    bus resends idempotent verbs) waits for the first, then finds its work done."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class SingleFlight(Generic[K, T]):
    """One run per key at a time: a call with the key of a run in flight joins it (the
    retry of a command idempotent by a caller-chosen id), and a run goes on when its
    callers give up, so that a later retry finds it or its result."""

    def __init__(self) -> None:
        self._runs: dict[K, asyncio.Task[T]] = {}

    async def run(self, key: K, start: Callable[[], Coroutine[Any, Any, T]]) -> T:
        task = self._runs.get(key)
        if task is None:
            task = asyncio.create_task(start())
            self._runs[key] = task
            task.add_done_callback(lambda _: self._runs.pop(key, None))
        return await asyncio.shield(task)
