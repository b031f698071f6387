"""Exit and OOM watching: what happens to a task after it was created, seen as it happens.

Where the truth lives: the task table (SQLite) says what we recorded; conmon's exit files
say what happened while nobody was looking. Every path that may observe an exit (the
inotify watcher, the periodic scan, a command touching the task, the start-up reconcile)
goes through `process_exit`, whose conditional update records it once; the outbox then
publishes `tasks.exit` once.

Exit detection: conmon writes `<exit-dir>/<id>` when the container exits. We watch that
directory with inotify (the exit is seen within milliseconds, and an idle node costs
nothing) and also rescan it every second: a safety net for an inotify queue overflow and
for the window before the watch existed. Every five seconds the scan also checks that each
live task's conmon is still alive; a container whose conmon died is then judged with
`runtime state` (exit code unknown → 255, as containerd reports it).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from shoal_supervisor.domain import cgroups, monitor
from shoal_supervisor.domain.cgroups import Cgroup, OomWatch
from shoal_supervisor.domain.inotify import IN_CLOSE_WRITE, IN_MOVED_TO, IN_Q_OVERFLOW, Inotify
from shoal_supervisor.domain.layout import Layout
from shoal_supervisor.domain.metrics import EXITS, OOMS
from shoal_supervisor.domain.oci_runtime import OciRuntime
from shoal_supervisor.domain.outbox import Outbox
from shoal_supervisor.store.tasks import LIVE, TaskRecord, TaskStore

log = structlog.get_logger("shoal.supervisor")

# One lock per task id, shared with the commands: a change to a task and the recording of
# its exit never interleave.
Locks = defaultdict[str, asyncio.Lock]

UNKNOWN_EXIT_CODE = 255  # containerd's code for "the exit status was lost"
MONITOR_CHECK_EVERY = 5  # scans between conmon liveness checks
OOM_RECHECK_DELAYS = (0.0, 0.02, 0.05, 0.1, 0.25, 0.5)  # after an OOM event, seconds


def exit_reason(exit_code: int, oom_kills: int) -> str:
    if exit_code == 0:
        return "Completed"
    return "OOMKilled" if oom_kills > 0 else "Error"


class ExitWatcher:
    """Records exits and OOM kills of live tasks, under the commands' per-task locks."""

    def __init__(self, store: TaskStore, layout: Layout, locks: Locks, outbox: Outbox, *,
                 poll_interval: float = 1.0) -> None:
        self.store = store
        self.layout = layout
        self._locks = locks
        self._outbox = outbox
        self._poll_interval = poll_interval
        self._exit_events: dict[str, asyncio.Event] = {}
        self._oom_watches: dict[str, OomWatch] = {}
        self._oom_rechecks: set[str] = set()  # task ids with a recheck under way
        self._background: set[asyncio.Task[Any]] = set()
        self._inotify: Inotify | None = None
        self._poller: asyncio.Task[None] | None = None
        # Told of each exit once it is recorded (the restart policies).
        self.on_exit: Callable[[TaskRecord], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def watch(self) -> None:
        """Start seeing exit files as conmon writes them."""
        self._inotify = Inotify()
        self._inotify.add_watch(self.layout.exit_dir, IN_CLOSE_WRITE | IN_MOVED_TO)
        asyncio.get_running_loop().add_reader(self._inotify.fd, self._on_inotify)

    async def reconcile(self) -> None:
        """After a (re)start: record exits that happened while we were down, check every
        live task's monitor and resume OOM watches."""
        await self.scan(check_monitors=True)
        for task in await self.store.list_tasks():
            if task.state in LIVE:
                self.watch_oom(task)

    def start_polling(self) -> None:
        self._poller = asyncio.create_task(self._poll_loop(), name="supervisor-poll")

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._inotify is not None:
            loop.remove_reader(self._inotify.fd)
            self._inotify.close()
        for task_id in list(self._oom_watches):
            self.unwatch_oom(task_id)
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(self._background, timeout=5)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task failed", error=repr(t.exception()))

        task.add_done_callback(done)

    # -- exits -----------------------------------------------------------------------------

    def _on_inotify(self) -> None:
        assert self._inotify is not None
        for event in self._inotify.read():
            if event.mask & IN_Q_OVERFLOW:
                self._spawn(self.scan(check_monitors=False))
            elif event.name:
                self._spawn(self.process_exit(event.name))

    async def _poll_loop(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(self._poll_interval)
            tick += 1
            try:
                await self.scan(check_monitors=tick % MONITOR_CHECK_EVERY == 0)
                await self._outbox.flush()
            except Exception as exc:
                log.exception("task scan failed", error=str(exc))

    async def scan(self, *, check_monitors: bool) -> None:
        for listed in await self.store.list_tasks():
            if listed.state not in LIVE:
                continue
            async with self._locks[listed.id]:
                if await self.process_exit_locked(listed.id):
                    continue
                task = await self.store.get(listed.id)
                if task is None or task.state not in LIVE:
                    continue
                # The OOM watch makes kills seen at once; this read (one small file per
                # live task) is the backstop.
                task = await self._check_oom(task)
            if check_monitors:
                await self._check_monitor(task)

    def has_exited(self, task: TaskRecord) -> bool:
        """A live task whose exit conmon wrote but nobody recorded yet."""
        return task.state in LIVE and self.layout.exit_file(task.id).exists()

    async def process_exit(self, task_id: str) -> bool:
        async with self._locks[task_id]:
            return await self.process_exit_locked(task_id)

    async def process_exit_locked(self, task_id: str) -> bool:
        """Record the exit conmon wrote for a live task; False when there is nothing new.
        Called with the task's lock held."""
        task = await self.store.get(task_id)
        if task is None or task.state not in LIVE:
            return False
        path = self.layout.exit_file(task_id)
        try:
            text = path.read_text().strip()
            finished_at = path.stat().st_mtime
        except FileNotFoundError:
            return False
        try:
            exit_code = int(text)
        except ValueError:
            log.warning("unreadable exit file", task=task_id, content=text[:50])
            return False
        task = await self._check_oom(task)
        await self._record_exit(task, exit_code, finished_at,
                                exit_reason(exit_code, task.oom_kills), "")
        return True

    async def _record_exit(self, task: TaskRecord, exit_code: int, finished_at: float,
                           reason: str, message: str) -> None:
        updated = await self.store.mark_exited(task, exit_code, finished_at, reason, message)
        if updated is None:
            return
        EXITS.labels(reason).inc()
        log.info("task exited", task=task.id, exit_code=exit_code, reason=reason)
        self.unwatch_oom(task.id)
        event = self._exit_events.pop(task.id, None)
        if event is not None:
            event.set()
        if self.on_exit is not None:
            self.on_exit(updated)
        await self._outbox.after_change()

    async def _check_monitor(self, task: TaskRecord) -> None:
        """A live task whose conmon is gone will never get an exit file: ask the runtime."""
        if monitor.alive(task.conmon_pid, task.id):
            return
        async with self._locks[task.id]:
            if await self.process_exit_locked(task.id):
                return  # conmon wrote the file just before it went
            task = await self.store.get(task.id) or task
            if task.state not in LIVE:
                return
            state = await OciRuntime(task.runtime, task.runtime_root).state(task.id)
            if state is not None and state.get("status") in ("created", "running", "paused"):
                note = "not monitored: its conmon exited; the exit code will be unknown"
                if task.message != note:
                    log.warning("conmon gone, container still running", task=task.id)
                    await self.store.set_message(task.id, note)
                return
            await self._record_exit(task, UNKNOWN_EXIT_CODE, time.time(), "Error",
                                    "exit status unknown: conmon exited without recording it")

    async def wait_exit(self, task_id: str, timeout: float) -> bool:
        """Until the task is recorded stopped (True) or `timeout` passes (False)."""
        end = time.monotonic() + timeout
        while True:
            task = await self.store.get(task_id)
            if task is None or task.state not in LIVE:
                return True
            if await self.process_exit(task_id):
                continue
            if not monitor.alive(task.conmon_pid, task_id):
                await self._check_monitor(task)
                task = await self.store.get(task_id)
                if task is None or task.state not in LIVE:
                    return True
            left = end - time.monotonic()
            if left <= 0:
                return False
            event = self._exit_events.setdefault(task_id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.25)):
                    await event.wait()

    # -- OOM kills -------------------------------------------------------------------------

    async def _check_oom(self, task: TaskRecord) -> TaskRecord:
        """Publish tasks.oom for OOM kills the cgroup counted since we last looked. conmon's
        `oom` mark in the persist dir stands in when the cgroup can no longer be read."""
        kills = Cgroup(task.cgroup_path).oom_kills() if task.cgroup_path else None
        if (self.layout.persist_dir(task.id) / "oom").exists():
            kills = max(kills or 0, 1)
        if not kills or kills <= task.oom_kills:
            return task
        updated = await self.store.record_oom(task, kills)
        if updated is None:
            return await self.store.get(task.id) or task
        OOMS.inc(kills - task.oom_kills)
        log.info("task OOM kill", task=task.id, kills=kills)
        await self._outbox.after_change()
        return updated

    def watch_oom(self, task: TaskRecord) -> None:
        """A watch per live container (v1 eventfd, v2 inotify on memory.events), so
        tasks.oom goes out as the kernel kills, not at the next scan."""
        if not task.cgroup_path or task.id in self._oom_watches:
            return
        try:
            watch = cgroups.oom_watch(Cgroup(task.cgroup_path))
        except OSError as exc:
            log.warning("cannot watch OOM events; polling instead", task=task.id,
                        error=str(exc))
            return
        self._oom_watches[task.id] = watch
        # A fresh context: the command that registered the watch (its trace id, its log
        # fields) has nothing to do with the OOM kills reported later.
        asyncio.get_running_loop().add_reader(watch.fd, contextvars.Context().run,
                                              self._on_oom_event, task.id)

    def unwatch_oom(self, task_id: str) -> None:
        watch = self._oom_watches.pop(task_id, None)
        if watch is not None:
            asyncio.get_running_loop().remove_reader(watch.fd)
            watch.close()

    def _on_oom_event(self, task_id: str) -> None:
        watch = self._oom_watches.get(task_id)
        if watch is None:
            return
        watch.drain()
        # v2's memory.events also changes on each memory.high/max event, which may come
        # in bursts: one recheck at a time per task (the scan is the backstop).
        if task_id not in self._oom_rechecks:
            self._oom_rechecks.add(task_id)
            self._spawn(self._recheck_oom(task_id))

    async def _recheck_oom(self, task_id: str) -> None:
        try:
            await self._recheck_oom_now(task_id)
        finally:
            self._oom_rechecks.discard(task_id)

    async def _recheck_oom_now(self, task_id: str) -> None:
        # The event comes when the cgroup hits its limit, before the kernel has chosen and
        # counted a victim: look again for a moment until the count moves.
        for delay in OOM_RECHECK_DELAYS:
            await asyncio.sleep(delay)
            async with self._locks[task_id]:
                task = await self.store.get(task_id)
                if task is None or task.state not in LIVE:
                    return
                if not Cgroup(task.cgroup_path).exists():  # the event was the removal
                    self.unwatch_oom(task_id)
                    return
                if (await self._check_oom(task)).oom_kills > task.oom_kills:
                    return
