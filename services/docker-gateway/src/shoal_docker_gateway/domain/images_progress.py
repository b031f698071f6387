"""The puller's transfer progress events (`images.pull.progress`, `images.push.progress`)
for one call, as the Docker gateway may read them: from the events stream through an
ordered, ephemeral consumer (its NATS user subscribes to no event subject directly).
Also Docker's progress text."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
from nats.js.api import DeliverPolicy
from shoal_common import codec, subjects
from shoal_common.messages.images import TransferProgress

from shoal_docker_gateway.domain.backend import Backend

# The final progress event is published just before the reply; wait this long for it.
LAST_EVENT_WAIT = 0.3

E = TypeVar("E", bound=TransferProgress)
R = TypeVar("R")


class Followed:
    """A call and the progress events that are its own, in arrival order."""

    def __init__(self, task: asyncio.Future[Any], queue: asyncio.Queue[Any]) -> None:
        self.task = task
        self.queue = queue

    async def events(self) -> AsyncIterator[Any]:
        """Events while the call runs, then those still on their way (up to the one marked
        `finished`) once it has succeeded."""
        while not self.task.done():
            getter = asyncio.ensure_future(self.queue.get())
            waiting: set[asyncio.Future[Any]] = {self.task, getter}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            yield getter.result()
        if self.task.exception() is not None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LAST_EVENT_WAIT):
                while True:
                    event = await self.queue.get()
                    yield event
                    if event.finished:
                        break


@contextlib.asynccontextmanager
async def follow(backend: Backend, event_type: type[E], topic: str, mine: Callable[[E], bool],
                 call: Callable[[], Awaitable[Any]]) -> AsyncIterator[Followed]:
    """Subscribe to `topic`, then start `call`: no event of it can be missed. Leaving stops
    only the wait: the puller's transfer goes on (a retry with its id joins it)."""
    queue: asyncio.Queue[E] = asyncio.Queue()

    async def on_event(msg: Any) -> None:
        with contextlib.suppress(Exception):  # a malformed event is one we skip
            event = codec.decode(msg.data, event_type)
            if mine(event):
                queue.put_nowait(event)

    sub = await backend.bus.js.subscribe(
        subjects.event(backend.node_id, backend.namespace, topic), cb=on_event,
        ordered_consumer=True, deliver_policy=DeliverPolicy.NEW)
    task = asyncio.ensure_future(call())
    try:
        yield Followed(task, queue)
    finally:
        task.cancel()
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}GB"


def bar(done: int, total: int) -> str:
    """Docker's progress text: `[=====>      ]  1.2MB/3.4MB`."""
    width = 50
    filled = min(width, int(width * done / total)) if total else 0
    body = "=" * max(filled - 1, 0) + (">" if 0 < filled < width else "=" if filled else "")
    return f"[{body.ljust(width)}] {human(done):>8}/{human(total)}"


def short_id(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]
