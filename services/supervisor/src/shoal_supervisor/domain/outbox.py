"""Publishing what the task store's outbox holds, after the transaction that wrote it.

A task row and the event reporting its change commit together (store/tasks.py); this side
publishes them in order and deletes each once JetStream took it. What fails stays for the
next flush (every scan), under the same event id, so nothing is lost or doubled."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from shoal_common.errors import ShoalError
from shoal_common.messages import Event

from shoal_supervisor.domain.metrics import set_task_counts
from shoal_supervisor.store.tasks import TaskStore

log = structlog.get_logger("shoal.supervisor")

Publish = Callable[[Event, str, str], Awaitable[None]]  # event, namespace, event id


class Outbox:
    """The one publisher of task events; a flush at a time, so they leave in order."""

    def __init__(self, store: TaskStore, publish: Publish) -> None:
        self.store = store
        self._publish = publish
        self._flush_lock = asyncio.Lock()

    async def after_change(self) -> None:
        """After any task change: refresh the task gauges and publish its events."""
        set_task_counts(await self.store.count_by_state())
        await self.flush()

    async def flush(self) -> None:
        """Publish the outbox in order; what fails stays for the next flush (every scan)."""
        async with self._flush_lock:
            while True:
                entries = await self.store.pending_events()
                if not entries:
                    return
                for entry in entries:
                    try:
                        await self._publish(entry.event, entry.namespace, entry.event_id)
                    except ShoalError as exc:
                        log.warning("event not published yet; will retry",
                                    topic=type(entry.event).TOPIC, error=exc.message)
                        return
                    await self.store.event_published(entry.seq)
