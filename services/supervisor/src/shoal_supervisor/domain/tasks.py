"""Tasks: one container under one conmon, from create to delete.

Where the truth lives: the task table (SQLite) says what we recorded; conmon's exit files
say what happened while nobody was looking. Every path that may observe an exit (the
inotify watcher, the periodic scan, a command touching the task, the start-up reconcile)
goes through `_process_exit`, whose conditional update records it once; the outbox then
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
import os
import shutil
import signal
import stat
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from shoal_common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Invalid,
    NotFound,
    ShoalError,
    Unavailable,
)
from shoal_common.messages import Event
from shoal_common.messages.monitor import (
    ExecSyncReply,
    ExecSyncRequest,
    MonitorCreateRequest,
    Resources,
    TaskState,
    TaskStats,
)

from shoal_supervisor.domain import cgroups, conmon
from shoal_supervisor.domain.cgroups import Cgroup, OomEventFd
from shoal_supervisor.domain.conmon import Conmon, CreateSpec
from shoal_supervisor.domain.execs import discard_sessions, exec_process, poll_until
from shoal_supervisor.domain.inotify import IN_CLOSE_WRITE, IN_MOVED_TO, IN_Q_OVERFLOW, Inotify
from shoal_supervisor.domain.metrics import EXITS, OOMS, set_task_counts
from shoal_supervisor.domain.runtime import Runtime
from shoal_supervisor.store.tasks import (
    CREATING,
    LIVE,
    RUNNING,
    STOPPED,
    TaskRecord,
    TaskStore,
)

log = structlog.get_logger("shoal.supervisor")

Publish = Callable[[Event, str, str], Awaitable[None]]  # event, namespace, event id

UNKNOWN_EXIT_CODE = 255  # containerd's code for "the exit status was lost"
CREATE_TIMEOUT = 60.0  # conmon + runtime create; beyond this a create is failed
KILL_MARGIN = 2.0  # of a stop's budget, kept for SIGKILL and the reply
MONITOR_CHECK_EVERY = 5  # scans between conmon liveness checks
OOM_RECHECK_DELAYS = (0.0, 0.02, 0.05, 0.1, 0.25, 0.5)  # after an OOM event, seconds
_ID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+-")


@dataclass(frozen=True)
class Layout:
    """Where the supervisor keeps things. Exit codes and OOM marks are state (they must
    survive a supervisor restart); pid files, attach sockets and runc state are run files."""

    state_dir: Path
    run_dir: Path

    @property
    def db(self) -> Path:
        return self.state_dir / "tasks.db"

    @property
    def exit_dir(self) -> Path:
        return self.state_dir / "exits"

    def persist_dir(self, task_id: str) -> Path:
        return self.state_dir / "persist" / task_id

    def task_dir(self, task_id: str) -> Path:
        return self.run_dir / "tasks" / task_id

    @property
    def socket_dir(self) -> Path:
        return self.run_dir / "attach"

    @property
    def runtime_root(self) -> Path:
        return self.run_dir / "runc"

    def make(self) -> None:
        for d in (self.exit_dir, self.state_dir / "persist", self.run_dir / "tasks",
                  self.socket_dir, self.runtime_root):
            d.mkdir(parents=True, exist_ok=True)


def exit_reason(exit_code: int, oom_kills: int) -> str:
    if exit_code == 0:
        return "Completed"
    return "OOMKilled" if oom_kills > 0 else "Error"


def _validate_id(task_id: str) -> None:
    # The id names files (exit file, run dirs) and runc state: no path tricks.
    if not task_id or len(task_id) > 255 or not set(task_id) <= _ID_OK or task_id[0] in ".-":
        raise Invalid(f"task id {task_id!r} is not valid (letters, digits, _ . + -; at most "
                      "255 characters)")


def _supervisor_alive(pid: int) -> bool:
    """Whether `pid` is a live supervisor process (the owner of an in-progress create)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        return b"supervisor" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _resources_json(res: Resources, swap_accounted: bool) -> dict[str, Any]:
    """CRI resources → the OCI LinuxResources subset `runtime update` takes (0/"" = keep)."""
    out: dict[str, Any] = {}
    cpu = {k: v for k, v in (("shares", res.cpu_shares), ("quota", res.cpu_quota),
                             ("period", res.cpu_period), ("cpus", res.cpuset_cpus),
                             ("mems", res.cpuset_mems)) if v}
    if cpu:
        out["cpu"] = cpu
    if res.memory_limit:
        # Kubernetes containers get no swap: memory+swap = memory, which must move with the
        # limit where swap is accounted, or raising the limit is refused.
        out["memory"] = {"limit": res.memory_limit,
                         **({"swap": res.memory_limit} if swap_accounted else {})}
    if res.pids_limit:
        out["pids"] = {"limit": res.pids_limit}
    return out


class TaskManager:
    def __init__(self, store: TaskStore, layout: Layout, conmon_path: str, publish: Publish,
                 *, poll_interval: float = 1.0) -> None:
        self.store = store
        self.layout = layout
        self.conmon_path = conmon_path
        self._publish = publish
        self._poll_interval = poll_interval
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._exit_events: dict[str, asyncio.Event] = {}
        self._flush_lock = asyncio.Lock()
        self._oom_watches: dict[str, OomEventFd] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._inotify: Inotify | None = None
        self._poller: asyncio.Task[None] | None = None
        self._unified = cgroups.is_unified()

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Watch first, then reconcile: an exit that lands in between is seen twice, and
        recorded once."""
        self.layout.make()
        loop = asyncio.get_running_loop()
        self._inotify = Inotify()
        self._inotify.add_watch(self.layout.exit_dir, IN_CLOSE_WRITE | IN_MOVED_TO)
        loop.add_reader(self._inotify.fd, self._on_inotify)
        await self._reconcile()
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
            self._unwatch_oom(task_id)
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(self._background, timeout=5)

    async def _reconcile(self) -> None:
        """After a (re)start: finish interrupted creates, record exits that happened while
        we were down, check every live task's monitor, resume OOM watches, and publish
        events a crash left in the outbox."""
        tasks = await self.store.list_tasks()
        for task in tasks:
            if task.state == CREATING and not _supervisor_alive(task.owner_pid):
                async with self._locks[task.id]:
                    await self._resume_create(task)
        await self._scan(check_monitors=True)
        for task in await self.store.list_tasks():
            if task.state in LIVE:
                self._watch_oom(task)
        live = sum(1 for t in await self.store.list_tasks() if t.state in LIVE)
        log.info("reconciled tasks", known=len(tasks), live=live)
        await self._after_change()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task failed", error=repr(t.exception()))

        task.add_done_callback(done)

    # -- exit and OOM detection ------------------------------------------------------------

    def _on_inotify(self) -> None:
        assert self._inotify is not None
        for event in self._inotify.read():
            if event.mask & IN_Q_OVERFLOW:
                self._spawn(self._scan(check_monitors=False))
            elif event.name:
                self._spawn(self._process_exit(event.name))

    async def _poll_loop(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(self._poll_interval)
            tick += 1
            try:
                await self._scan(check_monitors=tick % MONITOR_CHECK_EVERY == 0)
                await self.flush_events()
            except Exception as exc:
                log.exception("task scan failed", error=str(exc))

    async def _scan(self, *, check_monitors: bool) -> None:
        for listed in await self.store.list_tasks():
            if listed.state not in LIVE:
                continue
            async with self._locks[listed.id]:
                if await self._process_exit_locked(listed.id):
                    continue
                task = await self.store.get(listed.id)
                if task is None or task.state not in LIVE:
                    continue
                # The eventfd makes OOM kills seen at once; this read (one small file per
                # live task) is the backstop, and the only way on cgroup v2.
                task = await self._check_oom(task)
            if check_monitors:
                await self._check_monitor(task)

    async def _process_exit(self, task_id: str) -> bool:
        async with self._locks[task_id]:
            return await self._process_exit_locked(task_id)

    async def _process_exit_locked(self, task_id: str) -> bool:
        """Record the exit conmon wrote for a live task; False when there is nothing new."""
        task = await self.store.get(task_id)
        if task is None or task.state not in LIVE:
            return False
        path = self.layout.exit_dir / task_id
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
        self._unwatch_oom(task.id)
        event = self._exit_events.pop(task.id, None)
        if event is not None:
            event.set()
        await self._after_change()

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
        await self._after_change()
        return updated

    def _watch_oom(self, task: TaskRecord) -> None:
        """cgroup v1: an eventfd per live container, so tasks.oom goes out as the kernel
        kills, not at the next scan."""
        if self._unified or not task.cgroup_path or task.id in self._oom_watches:
            return
        try:
            watch = OomEventFd(Cgroup(task.cgroup_path))
        except OSError as exc:
            log.warning("cannot watch OOM events; polling instead", task=task.id,
                        error=str(exc))
            return
        self._oom_watches[task.id] = watch
        # A fresh context: the command that registered the watch (its trace id, its log
        # fields) has nothing to do with the OOM kills reported later.
        asyncio.get_running_loop().add_reader(watch.fd, contextvars.Context().run,
                                              self._on_oom_event, task.id)

    def _unwatch_oom(self, task_id: str) -> None:
        watch = self._oom_watches.pop(task_id, None)
        if watch is not None:
            asyncio.get_running_loop().remove_reader(watch.fd)
            watch.close()

    def _on_oom_event(self, task_id: str) -> None:
        watch = self._oom_watches.get(task_id)
        if watch is None:
            return
        watch.drain()

        async def check() -> None:
            # The event comes when the cgroup hits its limit, before the kernel has chosen
            # and counted a victim: look again for a moment until the count moves.
            for delay in OOM_RECHECK_DELAYS:
                await asyncio.sleep(delay)
                async with self._locks[task_id]:
                    task = await self.store.get(task_id)
                    if task is None or task.state not in LIVE:
                        return
                    if not Cgroup(task.cgroup_path).exists():  # the event was the removal
                        self._unwatch_oom(task_id)
                        return
                    if (await self._check_oom(task)).oom_kills > task.oom_kills:
                        return

        self._spawn(check())

    async def _check_monitor(self, task: TaskRecord) -> None:
        """A live task whose conmon is gone will never get an exit file: ask the runtime."""
        if conmon.alive(task.conmon_pid, task.id):
            return
        async with self._locks[task.id]:
            if await self._process_exit_locked(task.id):
                return  # conmon wrote the file just before it went
            task = await self.store.get(task.id) or task
            if task.state not in LIVE:
                return
            runtime = Runtime(task.runtime, task.runtime_root)
            state = await runtime.state(task.id)
            if state is not None and state.get("status") in ("created", "running", "paused"):
                note = "not monitored: its conmon exited; the exit code will be unknown"
                if task.message != note:
                    log.warning("conmon gone, container still running", task=task.id)
                    await self.store.set_message(task.id, note)
                return
            await self._record_exit(task, UNKNOWN_EXIT_CODE, time.time(), "Error",
                                    "exit status unknown: conmon exited without recording it")

    async def _wait_exit(self, task_id: str, timeout: float) -> bool:
        """Until the task is recorded stopped (True) or `timeout` passes (False)."""
        end = time.monotonic() + timeout
        while True:
            task = await self.store.get(task_id)
            if task is None or task.state not in LIVE:
                return True
            if await self._process_exit(task_id):
                continue
            if not conmon.alive(task.conmon_pid, task_id):
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

    # -- events ----------------------------------------------------------------------------

    async def _after_change(self) -> None:
        set_task_counts(await self.store.count_by_state())
        await self.flush_events()

    async def flush_events(self) -> None:
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

    # -- commands --------------------------------------------------------------------------

    async def record(self, task_id: str) -> TaskRecord:
        """The task's record (exits already written taken into account); NotFound if none."""
        return await self._get(task_id)

    async def _get(self, task_id: str) -> TaskRecord:
        """The task, with an exit that conmon already wrote taken into account."""
        task = await self.store.get(task_id)
        if task is None:
            raise NotFound(f"task {task_id} not found")
        if task.state in LIVE and (self.layout.exit_dir / task_id).exists():
            await self._process_exit(task_id)
            task = await self.store.get(task_id)
            if task is None:
                raise NotFound(f"task {task_id} not found")
        return task

    async def create(self, namespace: str, req: MonitorCreateRequest,
                     budget: float) -> TaskState:
        _validate_id(req.id)
        bundle = Path(req.bundle)
        if not bundle.is_absolute():
            raise Invalid(f"bundle {req.bundle!r} is not an absolute path")
        if not (bundle / "config.json").is_file():
            raise Invalid(f"bundle {bundle} has no config.json")
        if req.log_path and not Path(req.log_path).is_absolute():
            raise Invalid(f"log_path {req.log_path!r} is not an absolute path")
        runtime_path = shutil.which(req.runtime or "runc")
        if runtime_path is None:
            raise FailedPrecondition(f"OCI runtime {req.runtime!r} not found")
        conmon_path = shutil.which(self.conmon_path)
        if conmon_path is None:
            raise FailedPrecondition(f"conmon {self.conmon_path!r} not found")
        async with self._locks[req.id]:
            existing = await self.store.get(req.id)
            if existing is not None:
                if existing.bundle != str(bundle):
                    raise AlreadyExists(f"task {req.id} already exists with bundle "
                                        f"{existing.bundle}")
                if existing.state != CREATING:
                    return existing.to_state()  # a retry: answered, not redone
                if _supervisor_alive(existing.owner_pid):
                    raise Unavailable(f"task {req.id} is being created")
                if await self._resume_create(existing):
                    return (await self._get(req.id)).to_state()
            task = TaskRecord(
                id=req.id, uid=uuid.uuid4().hex, namespace=namespace, state=CREATING,
                bundle=str(bundle), runtime=runtime_path,
                runtime_root=req.runtime_root or str(self.layout.runtime_root),
                log_path=req.log_path, tty=req.tty, stdin=req.stdin,
                stdin_once=req.stdin_once, sandbox_id=req.sandbox_id,
                cgroup_path=req.cgroup_path, labels=dict(req.labels), created_at=time.time(),
                owner_pid=os.getpid())
            if not await self.store.insert_creating(task):
                raise Unavailable(f"task {req.id} is being created by another replica")
            try:
                self._prepare_files(task)
                created = await Conmon(conmon_path).create(CreateSpec(
                    task_id=task.id, bundle=bundle, runtime=task.runtime,
                    runtime_root=task.runtime_root, log_path=task.log_path, tty=task.tty,
                    stdin=task.stdin, stdin_once=task.stdin_once,
                    task_dir=self.layout.task_dir(task.id),
                    persist_dir=self.layout.persist_dir(task.id),
                    exit_dir=self.layout.exit_dir, socket_dir=self.layout.socket_dir),
                    timeout=max(1.0, min(CREATE_TIMEOUT, budget)))
            except BaseException:
                # Failed or cancelled: leave no half-made container, files or record.
                await asyncio.shield(self._discard(task))
                raise
            # Where runc really put it; the request's path when the process is already gone.
            cgroup_path = cgroups.proc_cgroup(created.pid) or req.cgroup_path
            updated = await self.store.mark_created(task, created.pid, created.conmon_pid,
                                                    cgroup_path)
            if updated is None:
                raise Unavailable(f"task {req.id} changed while being created; retry")
            self._watch_oom(updated)
            log.info("task created", task=task.id, pid=created.pid, conmon=created.conmon_pid)
        await self._after_change()
        return (await self._get(req.id)).to_state()

    def _prepare_files(self, task: TaskRecord) -> None:
        # Leftovers of an earlier task with this id would read as this one's exit or OOM.
        (self.layout.exit_dir / task.id).unlink(missing_ok=True)
        shutil.rmtree(self.layout.persist_dir(task.id), ignore_errors=True)
        shutil.rmtree(self.layout.task_dir(task.id), ignore_errors=True)
        self.layout.persist_dir(task.id).mkdir(parents=True)
        self.layout.task_dir(task.id).mkdir(parents=True)
        if task.log_path:
            Path(task.log_path).parent.mkdir(parents=True, exist_ok=True)

    async def _resume_create(self, task: TaskRecord) -> bool:
        """A create its supervisor did not finish: adopt the container if conmon made it,
        else clean up. Called with the task's lock held."""
        task_dir = self.layout.task_dir(task.id)
        runtime = Runtime(task.runtime, task.runtime_root)
        conmon_pid = conmon.read_pid(task_dir / "conmon.pid")
        state = await runtime.state(task.id)
        # A conmon still alive without a container is still creating it: let it finish
        # rather than race it (it would leave a container nobody knows).
        end = time.monotonic() + CREATE_TIMEOUT
        while state is None and conmon.alive(conmon_pid, task.id) and time.monotonic() < end:
            await asyncio.sleep(0.1)
            state = await runtime.state(task.id)
        pid = conmon.read_pid(task_dir / "container.pid")
        if (state is not None and state.get("status") in ("created", "running") and pid > 0
                and conmon.alive(conmon_pid, task.id)):
            updated = await self.store.mark_created(
                task, pid, conmon_pid, cgroups.proc_cgroup(pid) or task.cgroup_path)
            if updated is not None:
                self._watch_oom(updated)
                log.info("adopted interrupted create", task=task.id, pid=pid)
                return True
        log.info("discarding interrupted create", task=task.id)
        await self._discard(task)
        return False

    async def _discard(self, task: TaskRecord) -> None:
        try:
            await Runtime(task.runtime, task.runtime_root).delete(task.id, force=True)
        except ShoalError as exc:
            log.warning("cleanup: runtime delete failed", task=task.id, error=exc.message)
        await self._wait_conmon_gone(task.id, 5.0)
        self._remove_files(task)
        await self.store.delete(task, publish=False)

    async def start(self, task_id: str) -> TaskState:
        async with self._locks[task_id]:
            await self._process_exit_locked(task_id)
            task = await self.store.get(task_id)
            if task is None:
                raise NotFound(f"task {task_id} not found")
            if task.state == RUNNING:
                return task.to_state()
            if task.state == STOPPED:
                raise FailedPrecondition(f"task {task_id} has exited and cannot be started "
                                         "again")
            if task.state == CREATING:
                raise Unavailable(f"task {task_id} is being created")
            # Taken before the runtime runs the process: a fast exit's time (the exit file's)
            # then never precedes the start.
            started_at = time.time()
            await Runtime(task.runtime, task.runtime_root).start(task_id)
            # Under the lock: an exit right after start is recorded after the start.
            await self.store.mark_started(task, started_at)
            log.info("task started", task=task_id, pid=task.pid)
        await self._after_change()
        return (await self._get(task_id)).to_state()

    async def state(self, task_id: str) -> TaskState:
        return (await self._get(task_id)).to_state()

    async def list_tasks(self, sandbox_id: str) -> list[TaskState]:
        tasks = await self.store.list_tasks(sandbox_id)
        exited = [t.id for t in tasks
                  if t.state in LIVE and (self.layout.exit_dir / t.id).exists()]
        for task_id in exited:
            await self._process_exit(task_id)
        if exited:
            tasks = await self.store.list_tasks(sandbox_id)
        return [t.to_state() for t in tasks]

    async def kill(self, task_id: str, sig: int, all_processes: bool) -> TaskState:
        if not 0 < sig < 65:
            raise Invalid(f"signal {sig} is not a valid signal number")
        task = await self._get(task_id)
        if task.state in LIVE:
            await self._signal(task, sig, all_processes)
        return (await self._get(task_id)).to_state()

    async def _signal(self, task: TaskRecord, sig: int, all_processes: bool = False) -> None:
        res = await Runtime(task.runtime, task.runtime_root).kill(task.id, sig,
                                                                   all_processes=all_processes)
        if res.returncode != 0 and "not running" not in res.message:
            if await self._process_exit(task.id):
                return  # it exited meanwhile: nothing left to signal
            raise FailedPrecondition(f"kill {task.id} {sig} failed: {res.message}")

    async def stop(self, task_id: str, sig: int, timeout: float, budget: float) -> TaskState:
        """Signal, wait up to `timeout` (within the caller's budget), then SIGKILL."""
        task = await self._get(task_id)
        if task.state not in LIVE:
            return task.to_state()
        grace = max(0.0, min(timeout, budget - KILL_MARGIN))
        if sig and grace > 0:
            await self._signal(task, sig)
            if await self._wait_exit(task_id, grace):
                return (await self._get(task_id)).to_state()
            log.info("stop timeout passed; killing", task=task_id, timeout=timeout)
        await self._signal(task, signal.SIGKILL)
        if not await self._wait_exit(task_id, max(KILL_MARGIN, budget - grace) - 0.5):
            raise DeadlineExceeded(f"task {task_id} did not exit after SIGKILL")
        return (await self._get(task_id)).to_state()

    async def delete(self, task_id: str) -> TaskState:
        """Forget a task that is not running (created or stopped); idempotent."""
        async with self._locks[task_id]:
            await self._process_exit_locked(task_id)
            task = await self.store.get(task_id)
            if task is None:
                return TaskState(id=task_id, state="unknown", message="not found")
            if task.state == RUNNING:
                raise FailedPrecondition(f"task {task_id} is running; stop it first")
            if task.state == CREATING and _supervisor_alive(task.owner_pid):
                raise Unavailable(f"task {task_id} is being created")
            await Runtime(task.runtime, task.runtime_root).delete(task_id, force=True)
            # A created task's conmon sees its container die now; let it finish writing
            # its files before they are removed.
            await self._wait_conmon_gone(task_id, 5.0)
            self._unwatch_oom(task_id)
            self._remove_files(task)
            await self.store.delete(task, publish=task.state != CREATING)
            log.info("task deleted", task=task_id)
        self._locks.pop(task_id, None)
        await self._after_change()
        return task.to_state()

    async def _wait_conmon_gone(self, task_id: str, timeout: float) -> None:
        pid = conmon.read_pid(self.layout.task_dir(task_id) / "conmon.pid")
        await poll_until(lambda: not conmon.alive(pid, task_id), timeout, 0.05)

    def _remove_files(self, task: TaskRecord) -> None:
        (self.layout.exit_dir / task.id).unlink(missing_ok=True)
        shutil.rmtree(self.layout.persist_dir(task.id), ignore_errors=True)
        # Exec sessions live in the task's directory; their conmons and socket links go too.
        discard_sessions(self.layout.task_dir(task.id), self.layout.socket_dir)
        shutil.rmtree(self.layout.task_dir(task.id), ignore_errors=True)
        (self.layout.socket_dir / task.id).unlink(missing_ok=True)
        # What conmon made in the bundle (control FIFOs, attach socket); nothing else.
        for name in ("ctl", "winsz", "attach"):
            path = Path(task.bundle) / name
            try:
                mode = path.lstat().st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                path.unlink(missing_ok=True)

    async def exec_sync(self, req: ExecSyncRequest) -> ExecSyncReply:
        if not req.cmd:
            raise Invalid("exec_sync: cmd is empty")
        task = await self._get(req.id)
        if task.state != RUNNING:
            raise FailedPrecondition(f"task {req.id} is not running ({task.state})")
        conmon_path = shutil.which(self.conmon_path)
        if conmon_path is None:
            raise FailedPrecondition(f"conmon {self.conmon_path!r} not found")
        process = exec_process(task, req.cmd, req.env, req.tty)
        work_dir = self.layout.task_dir(task.id) / f"exec-{uuid.uuid4().hex[:12]}"
        work_dir.mkdir(parents=True)
        try:
            result = await Conmon(conmon_path).exec_sync(
                task.id, task.runtime, task.runtime_root, process, work_dir, tty=req.tty,
                timeout=req.timeout)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        if result.timed_out:
            raise DeadlineExceeded(f"exec in {req.id} timed out after {req.timeout:g}s")
        return ExecSyncReply(exit_code=result.exit_code, stdout=result.stdout,
                             stderr=result.stderr)

    async def update(self, task_id: str, resources: Resources) -> TaskState:
        task = await self._get(task_id)
        if task.state not in LIVE:
            raise FailedPrecondition(f"task {task_id} is not running ({task.state})")
        body = _resources_json(resources, Cgroup(task.cgroup_path or "/").
                               memory_swap_accounted())
        if body:
            await Runtime(task.runtime, task.runtime_root).update(task_id, body)
        return (await self._get(task_id)).to_state()

    async def stats(self, ids: list[str]) -> list[TaskStats]:
        """Usage of the given tasks (all when empty) from their cgroups. Ids this node does
        not know are left out; the caller answers NotFound for a single id."""
        tasks = [t for t in await self.store.list_tasks() if t.state != CREATING]
        if ids:
            by_id = {t.id: t for t in tasks}
            tasks = [by_id[i] for i in ids if i in by_id]

        def read() -> list[TaskStats]:
            out = []
            for t in tasks:
                if t.cgroup_path:
                    u = Cgroup(t.cgroup_path).usage()
                    out.append(TaskStats(
                        id=t.id, timestamp_ns=u.timestamp_ns, cpu_usage_ns=u.cpu_usage_ns,
                        memory_working_set_bytes=u.memory_working_set_bytes,
                        memory_usage_bytes=u.memory_usage_bytes, pids=u.pids))
                else:
                    out.append(TaskStats(id=t.id, timestamp_ns=time.time_ns(), cpu_usage_ns=0,
                                         memory_working_set_bytes=0, memory_usage_bytes=0))
            return out

        return await asyncio.to_thread(read)

    async def reopen_log(self, task_id: str) -> TaskState:
        task = await self._get(task_id)
        if not task.log_path:
            raise FailedPrecondition(f"task {task_id} has no log file")
        if task.state not in LIVE or not conmon.alive(task.conmon_pid, task.id):
            raise FailedPrecondition(f"task {task_id} is not running")
        log_path = Path(task.log_path)
        before = _inode(log_path)
        conmon.reopen_log(Path(task.bundle))
        # conmon reopens asynchronously (a new file renamed into place): wait for it, so
        # the reply means the old file is no longer written.
        await poll_until(lambda: _inode(log_path) not in (before, None), 2.0, 0.01)
        return task.to_state()


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None
