"""Waiting in tests for something another process does."""

from __future__ import annotations

import asyncio
from typing import Any


async def eventually(predicate: Any, timeout: float = 10.0, what: str = "condition",
                     every: float = 0.02) -> None:
    """Poll `predicate` (sync, or returning an awaitable) until it is true."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s")
        await asyncio.sleep(every)
