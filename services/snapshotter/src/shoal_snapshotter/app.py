"""The snapshotter's application state, built at start and closed at stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog
from shoal_common.bus import DEFAULT_NAMESPACE
from shoal_common.consumer import EventConsumer
from shoal_common.messages import Event
from shoal_common.messages.snapshots import FsUsageReply
from shoal_common.service import ServiceContext
from shoal_common.sqlite import Database

from shoal_snapshotter.domain import metrics
from shoal_snapshotter.domain.drivers import choose_driver
from shoal_snapshotter.domain.flush import Flusher, boot_id
from shoal_snapshotter.domain.fsutil import disk_usage
from shoal_snapshotter.domain.images import Images
from shoal_snapshotter.domain.layers import Unpacker
from shoal_snapshotter.domain.locks import ChainLocks
from shoal_snapshotter.domain.snapshots import Snapshots
from shoal_snapshotter.events import (
    FETCHING_TOPICS,
    TOPICS,
    image_event_handler,
    is_permanent,
)
from shoal_snapshotter.store import metadata as md

log = structlog.get_logger("shoal.snapshotter")
T = TypeVar("T")

class FsUsage:
    """Usage of the whole state directory; concurrent callers share one walk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._walk: asyncio.Task[FsUsageReply] | None = None

    async def get(self) -> FsUsageReply:
        if self._walk is None or self._walk.done():
            self._walk = asyncio.create_task(self._measure())
        return await asyncio.shield(self._walk)

    async def _measure(self) -> FsUsageReply:
        used = await asyncio.to_thread(disk_usage, self.root)
        metrics.FS_USED_BYTES.set(used.bytes)
        metrics.FS_USED_INODES.set(used.inodes)
        return FsUsageReply(mountpoint=str(self.root), used_bytes=used.bytes,
                            inodes_used=used.inodes, timestamp_ns=time.time_ns())


@dataclass
class SnapshotterApp:
    snapshots: Snapshots
    unpacker: Unpacker
    images: Images
    fs_usage: FsUsage
    # Unpacks started by requests run here, not in the request's task: a caller's deadline
    # or a lost reply must not throw away work that a retry will want.
    background: set[asyncio.Task[Any]]

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.background.discard(task)
        if not task.cancelled():
            task.exception()  # the request that awaited it reported it (or was gone)


@contextlib.asynccontextmanager
async def lifespan(ctx: ServiceContext) -> AsyncIterator[SnapshotterApp]:
    settings = ctx.config.services.snapshotter
    root = ctx.state_dir
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)  # layer contents (setuid binaries, secrets) are for root only
    db = Database(root / "metadata.db", md.MIGRATIONS)
    await db.open()
    collector = metrics.SnapshotsByKind(db.path)
    unpacker: Unpacker | None = None
    flusher: Flusher | None = None
    consumer: EventConsumer | None = None
    app: SnapshotterApp | None = None
    try:
        recorded = await db.run(lambda c: md.get_setting(c, "driver"))
        has_snapshots = bool(await db.run(md.ids))
        driver = await asyncio.to_thread(choose_driver, settings.driver, root, recorded,
                                         has_snapshots)
        if recorded != driver.name:
            await db.transaction(lambda c: md.set_setting(c, "driver", driver.name))

        async def publish(event: Event, namespace: str) -> None:
            await ctx.bus.publish_event(event, namespace=namespace)

        snapshots = Snapshots(db, driver, root, publish)
        locks = ChainLocks(root / "locks")
        boot = await asyncio.to_thread(boot_id)
        flusher = Flusher(db, snapshots.snap_root, boot, delay=settings.flush_delay,
                          max_wait=settings.flush_max_wait)
        unpacker = Unpacker(snapshots, locks, flusher, workers=settings.unpack_workers)
        images = Images(snapshots, unpacker, fetching_grace=settings.fetching_grace)
        await images.forget_fetching()  # before the clean-up collects unreferenced layers
        # Before the clean-up too: removing torn layers can leave their parents unreferenced.
        await snapshots.remove_torn(boot, DEFAULT_NAMESPACE)
        await snapshots.cleanup(locks, DEFAULT_NAMESPACE)
        await flusher.start()
        collector.register()
        log.info("snapshotter ready", driver=driver.name, root=str(root),
                 counts=await snapshots.counts())
        app = SnapshotterApp(snapshots, unpacker, images, FsUsage(root), set())
        if settings.consume_events:
            consumer = EventConsumer(
                ctx.bus, durable=f"snapshotter-{ctx.bus.node}",
                topics=FETCHING_TOPICS if settings.unpack_while_fetching else TOPICS,
                handler=image_event_handler(images, ctx.bus), permanent=is_permanent,
                concurrency=settings.event_concurrency, ack_wait=settings.events_ack_wait,
                max_deliver=settings.events_max_deliver)
            await consumer.start()
        yield app
    finally:
        timeout = ctx.config.services.snapshotter.shutdown_timeout
        if consumer is not None:
            await consumer.stop(timeout)
        if app is not None:
            await app.images.close()
        if app is not None and app.background:
            _, pending = await asyncio.wait(set(app.background), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        if unpacker is not None:
            await asyncio.to_thread(unpacker.close)
        if flusher is not None:
            await flusher.close()
        with contextlib.suppress(KeyError):
            collector.unregister()
        await db.close()
