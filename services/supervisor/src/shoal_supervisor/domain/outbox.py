"""Publishing what the task store's outbox holds, after the transaction that wrote it.

A task row and the event reporting its change commit together (store/tasks.py); this side
publishes them in order and deletes each once JetStream took it. What fails stays for the
next flush (every scan), under the same event id, so nothing is lost or doubled."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog
from shoal_common.errors import ShoalError
from shoal_common.messages import Event

from shoal_supervisor.domain.metrics import set_task_counts
from shoal_supervisor.store.tasks import TaskStore

log = structlog.get_logger("shoal.supervisor")

CLOSE_GRACE = 2.0  # seconds a stopping supervisor gives a flush under way

Publish = Callable[[Event, str, str], Awaitable[None]]  # event, namespace, event id


class Outbox:
    """The one publisher of task events; a flush at a time, so they leave in order."""

    def __init__(self, store: TaskStore, publish: Publish) -> None:
        self.store = store
        self._publish = publish
        self._flush_lock = asyncio.Lock()
        self._runner: asyncio.Task[None] | None = None
        self._again = False

    async def after_change(self) -> None:
        """After any task change: refresh the task gauges and publish its events in the
        background. A command never waits for JetStream: while NATS restarts an ack can
        take the whole publish timeout, and every command would queue behind it (nor for
        the gauges' count: a read on the database thread)."""
        self._again = True
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())

    async def _run(self) -> None:
        # Until no change came in during the last flush, or one failed (the poll loop's
        # flush tries again every second).
        while self._again:
            self._again = False
            set_task_counts(await self.store.count_by_state())
            if not await self.flush():
                return

    async def close(self) -> None:
        """A flush under way gets a moment to finish; what it leaves is published at the
        next start (the outbox is durable)."""
        if self._runner is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._runner), CLOSE_GRACE)
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)

    async def flush(self) -> bool:
        """Publish the outbox in order; what fails stays for the next flush (every scan).
        True when it is empty."""
        async with self._flush_lock:
            while True:
                entries = await self.store.pending_events()
                if not entries:
                    return True
                # A fact leaves only once its change is durable: the marks written with it
                # (created, started) did not wait for the disk (Database.transaction).
                await self.store.db.sync()
                for entry in entries:
                    try:
                        await self._publish(entry.event, entry.namespace, entry.event_id)
                    except ShoalError as exc:
                        log.warning("event not published yet; will retry",
                                    topic=type(entry.event).TOPIC, error=exc.message)
                        return False
                    await self.store.event_published(entry.seq)
