"""KeyedLocks: one command at a time per object, and no lock kept once nobody needs it."""

from __future__ import annotations

import asyncio

from shoal_common.locks import KeyedLocks


async def test_commands_on_one_key_run_one_at_a_time_and_others_do_not_wait() -> None:
    locks = KeyedLocks()
    order: list[str] = []

    async def work(key: str, name: str, pause: float) -> None:
        async with locks.hold(key):
            order.append(f"{name}+")
            await asyncio.sleep(pause)
            order.append(f"{name}-")

    await asyncio.gather(work("a", "first", 0.05), work("a", "repeat", 0), work("b", "other", 0))
    assert order.index("first-") < order.index("repeat+")  # the repeat waited
    assert order.index("other+") < order.index("first-")  # another key did not
    assert len(locks) == 0


async def test_a_cancelled_waiter_releases_its_place() -> None:
    locks = KeyedLocks()
    held = asyncio.Event()

    async def holder() -> None:
        async with locks.hold("k"):
            held.set()
            await asyncio.sleep(0.05)

    task = asyncio.create_task(holder())
    await held.wait()
    waiter = asyncio.create_task(locks.hold("k").__aenter__())
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.gather(task, waiter, return_exceptions=True)
    assert len(locks) == 0
