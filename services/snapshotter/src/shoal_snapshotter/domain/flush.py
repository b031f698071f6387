"""Flushing unpacked layers' files to disk off the pull's critical path.

A layer's commit must not outlive its files on a power loss. Flushing each layer before its
commit (syncfs) put about 0.6 s of writeback between a 200 MB pull and its first container,
so instead an unpack commits the layer marked with the current boot ID (its row is durable,
its files maybe not yet), and this flusher runs one syncfs of the snapshot filesystem shortly
after the last commit, then clears the marks of the rows committed before that syncfs began.

A kill -9 loses nothing (the page cache survives the process): a restart in the same boot
flushes what is still marked. A row still marked with another boot ID was committed before a
power loss or kernel crash that may have torn its files: start-up removes it and every
snapshot built on it (Snapshots.remove_torn), and the next unpack of the image makes it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import structlog
from shoal_common.sqlite import Database

from shoal_snapshotter.domain import metrics
from shoal_snapshotter.domain.mounts import syncfs
from shoal_snapshotter.store import metadata as md

log = structlog.get_logger("shoal.snapshotter.flush")

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    return BOOT_ID_PATH.read_text().strip()


class Flusher:
    """One syncfs for many commits: `delay` seconds after the last commit, and at most
    `max_wait` seconds after the first one still waiting."""

    def __init__(self, db: Database, root: Path, boot: str, *, delay: float,
                 max_wait: float) -> None:
        self.db = db
        self.root = root
        self.boot = boot
        self.delay = delay
        self.max_wait = max_wait
        self._due = asyncio.Event()  # a commit is waiting to be flushed
        self._first = 0.0  # monotonic time of the oldest commit waiting
        self._last = 0.0
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one flush at a time (a flush racing close's)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="flusher")
        if await self.db.run(lambda c: md.unsynced(c, self.boot)):
            self.committed()  # left by a process of this boot that stopped before its flush

    def committed(self) -> None:
        """A layer was committed with this boot's mark: flush it soon."""
        now = time.monotonic()
        if not self._due.is_set():
            self._first = now
        self._last = now
        self._due.set()

    async def flush(self) -> int:
        """syncfs now; clear the marks it covers. Returns how many rows it cleared."""
        async with self._lock:
            ids = await self.db.run(lambda c: md.unsynced(c, self.boot))
            if not ids:
                return 0
            started = time.perf_counter()
            await asyncio.to_thread(syncfs, self.root)
            seconds = time.perf_counter() - started
            await self.db.transaction(lambda c: md.mark_synced(c, ids))
        metrics.FLUSH_SECONDS.observe(seconds)
        log.info("flushed unpacked layers", layers=len(ids), seconds=round(seconds, 3))
        return len(ids)

    async def _run(self) -> None:
        while True:
            await self._due.wait()
            while True:  # until `delay` passed without a commit, or `max_wait` in all
                now = time.monotonic()
                wait = min(self._last + self.delay, self._first + self.max_wait) - now
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            self._due.clear()
            try:
                await self.flush()
            except Exception as exc:  # the marks stay: the next commit or start retries
                log.warning("could not flush unpacked layers", error=str(exc))

    async def close(self) -> None:
        """Stop, flushing what is still marked (a graceful stop leaves nothing unflushed)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self.flush()
        except Exception as exc:
            log.warning("could not flush unpacked layers at stop", error=str(exc))
