"""Tasks: one container under one conmon, from create to delete.

The commands live here; what happens to a task between them (its exit, its OOM kills, its
conmon dying) is watched by `exits.ExitWatcher`, and the events both record are published
by `outbox.Outbox`. Both sides take the same per-task lock, so a command and the recording
of an exit never interleave.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import structlog
from shoal_common import faults
from shoal_common.config import RuntimeConfig
from shoal_common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Invalid,
    NotFound,
    ShoalError,
    Unavailable,
)
from shoal_common.messages.monitor import (
    EXEC_OUTPUT_CAP,
    ExecSyncReply,
    ExecSyncRequest,
    MonitorCreateRequest,
    Resources,
    TaskState,
    TaskStats,
)

from shoal_supervisor.domain import cgroups, confine, conmon, monitor
from shoal_supervisor.domain.cgroups import Cgroup
from shoal_supervisor.domain.confine import Roots
from shoal_supervisor.domain.conmon import Conmon, CreateSpec
from shoal_supervisor.domain.exec_output import ExecOutput, ExecOutputs
from shoal_supervisor.domain.execs import check_command, discard_sessions, exec_process
from shoal_supervisor.domain.exits import ExitWatcher, Locks
from shoal_supervisor.domain.layout import Layout
from shoal_supervisor.domain.oci_runtime import OciRuntime
from shoal_supervisor.domain.outbox import Outbox, Publish
from shoal_supervisor.domain.restarts import Restarts, wants_restart
from shoal_supervisor.store.tasks import (
    CREATED,
    CREATING,
    LIVE,
    RUNNING,
    STOPPED,
    TaskRecord,
    TaskStore,
)

log = structlog.get_logger("shoal.supervisor")

CREATE_TIMEOUT = 60.0  # conmon + runtime create; beyond this a create is failed
KILL_MARGIN = 2.0  # of a stop's budget, kept for SIGKILL and the reply


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


def _runtime(task: TaskRecord) -> OciRuntime:
    return OciRuntime(task.runtime, task.runtime_root)


class TaskManager:
    """The task commands; owns the per-task locks, the outbox and the exit watcher."""

    def __init__(self, store: TaskStore, layout: Layout, conmon_path: str, publish: Publish,
                 roots: Roots, *, runtimes: RuntimeConfig | None = None,
                 poll_interval: float = 1.0) -> None:
        self.store = store
        self.layout = layout
        self.conmon_path = conmon_path
        self.roots = roots
        self.runtimes = runtimes or RuntimeConfig()
        self.outputs = ExecOutputs(layout.output_dir)
        self._locks: Locks = defaultdict(asyncio.Lock)
        self._outbox = Outbox(store, publish)
        self.exits = ExitWatcher(store, layout, self._locks, self._outbox,
                                 poll_interval=poll_interval)
        self.restarts = Restarts(self.rerun)
        self.exits.on_exit = self.restarts.exited

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Watch first, then reconcile: an exit that lands in between is seen twice, and
        recorded once."""
        self.layout.make()
        self.exits.watch()
        await self._reconcile()
        self.exits.start_polling()
        self.outputs.start()

    async def close(self) -> None:
        await self.restarts.close()
        await self.outputs.close()
        await self.exits.close()
        await self._outbox.close()

    async def _reconcile(self) -> None:
        """After a (re)start: finish interrupted creates, record exits that happened while
        we were down, check every live task's monitor, resume OOM watches, and publish
        events a crash left in the outbox."""
        tasks = await self.store.list_tasks()
        for task in tasks:
            if task.state == CREATING and not _supervisor_alive(task.owner_pid):
                async with self._locks[task.id]:
                    await self._resume_create(task)
        await self.exits.reconcile()
        await self._reconcile_restarts()
        live = sum(1 for t in await self.store.list_tasks() if t.state in LIVE)
        log.info("reconciled tasks", known=len(tasks), live=live)
        await self._outbox.after_change()

    async def _reconcile_restarts(self) -> None:
        """Exits that wait for their rerun (we were down, or killed during one), and reruns
        made but not yet started, go on now."""
        for task in await self.store.list_tasks():
            if task.state == STOPPED:
                self.restarts.exited(task, at_once=True)
            elif task.state == CREATED and task.restart_count > 0:
                try:
                    await self.start(task.id)
                except ShoalError as exc:
                    log.warning("starting an interrupted restart failed", task=task.id,
                                error=exc.message)

    # -- commands --------------------------------------------------------------------------

    async def record(self, task_id: str) -> TaskRecord:
        """The task, with an exit that conmon already wrote taken into account; NotFound if
        none."""
        task = await self.store.get(task_id)
        if task is None:
            raise NotFound(f"task {task_id} not found")
        if self.exits.has_exited(task):
            await self.exits.process_exit(task_id)
            task = await self.store.get(task_id)
            if task is None:
                raise NotFound(f"task {task_id} not found")
        return task

    async def _current_locked(self, task_id: str) -> TaskRecord | None:
        """The task's record after any exit conmon wrote; called with its lock held."""
        await self.exits.process_exit_locked(task_id)
        return await self.store.get(task_id)

    async def create(self, namespace: str, req: MonitorCreateRequest,
                     budget: float) -> TaskState:
        checked = confine.check_create(req, self.roots, self.runtimes)
        bundle = checked.bundle
        conmon_path = conmon.find(self.conmon_path)
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
                    return (await self.record(req.id)).to_state()
            task = TaskRecord(
                id=req.id, uid=uuid.uuid4().hex, namespace=namespace, state=CREATING,
                bundle=str(bundle), runtime=checked.runtime,
                runtime_root=checked.runtime_root or str(self.layout.runtime_root),
                log_path=checked.log_path, tty=req.tty, stdin=req.stdin,
                stdin_once=req.stdin_once, sandbox_id=req.sandbox_id,
                cgroup_path=req.cgroup_path, labels=dict(req.labels), created_at=time.time(),
                owner_pid=os.getpid(), restart_name=req.restart.name,
                restart_max=req.restart.max_retries)
            if not await self.store.insert_creating(task):
                raise Unavailable(f"task {req.id} is being created by another replica")
            await self._run_create(task, conmon_path, budget)
        await self._outbox.after_change()
        return (await self.record(req.id)).to_state()

    async def _run_create(self, task: TaskRecord, conmon_path: str, budget: float) -> None:
        """conmon + `runtime create` for a task recorded `creating`; then `created`. Called
        with the task's lock held."""
        try:
            self._prepare_files(task)
            created = await Conmon(conmon_path).create(CreateSpec(
                task_id=task.id, bundle=Path(task.bundle), runtime=task.runtime,
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
        await faults.point("supervisor.task.created")
        # Where runc really put it; the request's path when the process is already gone.
        cgroup_path = cgroups.proc_cgroup(created.pid) or task.cgroup_path
        updated = await self.store.mark_created(task, created.pid, created.conmon_pid,
                                                cgroup_path)
        if updated is None:
            raise Unavailable(f"task {task.id} changed while being created; retry")
        self.exits.watch_oom(updated)
        log.info("task created", task=task.id, pid=created.pid, conmon=created.conmon_pid)

    def _prepare_files(self, task: TaskRecord) -> None:
        # Leftovers of an earlier task with this id would read as this one's exit or OOM.
        # The log's directory is the CRI's to make (kubelet does): none is made here.
        self.layout.clear_task(task.id)
        self.layout.persist_dir(task.id).mkdir(mode=0o700)
        self.layout.task_dir(task.id).mkdir(mode=0o700)

    async def _resume_create(self, task: TaskRecord) -> bool:
        """A create its supervisor did not finish: adopt the container if conmon made it,
        else clean up. Called with the task's lock held."""
        task_dir = self.layout.task_dir(task.id)
        runtime = _runtime(task)
        conmon_pid = monitor.conmon_pid(task_dir)
        state = await runtime.state(task.id)
        # A conmon still alive without a container is still creating it: let it finish
        # rather than race it (it would leave a container nobody knows).
        end = time.monotonic() + CREATE_TIMEOUT
        while state is None and monitor.alive(conmon_pid, task.id) and time.monotonic() < end:
            await asyncio.sleep(0.1)
            state = await runtime.state(task.id)
        pid = monitor.read_pid(task_dir / "container.pid")
        if (state is not None and state.get("status") in ("created", "running") and pid > 0
                and monitor.alive(conmon_pid, task.id)):
            updated = await self.store.mark_created(
                task, pid, conmon_pid, cgroups.proc_cgroup(pid) or task.cgroup_path)
            if updated is not None:
                self.exits.watch_oom(updated)
                log.info("adopted interrupted create", task=task.id, pid=pid)
                return True
        log.info("discarding interrupted create", task=task.id)
        await self._discard(task)
        return False

    async def _discard(self, task: TaskRecord) -> None:
        """Undo a create that failed or was interrupted; nothing is published. A rerun's
        record stays, stopped (its last exit is still the container's)."""
        try:
            await _runtime(task).delete(task.id, force=True)
        except ShoalError as exc:
            log.warning("cleanup: runtime delete failed", task=task.id, error=exc.message)
        if task.restart_count > 0:
            await self._clear_run(task)
            await self.store.mark_rerun_failed(task, "the restart could not create the "
                                               "container again")
            return
        await self._forget(task, publish=False)

    async def run_again(self, task_id: str) -> TaskState:
        """A stopped task run again from its bundle at once (Docker's `start` of an exited
        container: its rootfs, so its writable layer, kept); its restart policy applies
        again. A running task is answered as it is."""
        task = await self.record(task_id)
        if task.state == STOPPED:
            await self.store.set_manual_stop(task_id, False)
            self.restarts.forget(task_id)
            await self.rerun(task_id, task.uid, asked=True)
        task = await self.record(task_id)
        if task.state != RUNNING and not (task.state == STOPPED and task.started_at):
            raise FailedPrecondition(f"task {task_id} cannot be run again ({task.state}"
                                     f"{': ' + task.message if task.message else ''})")
        return self._shown(task)

    async def rerun(self, task_id: str, uid: str, *, asked: bool = False) -> None:
        """Run a stopped task again from its bundle, as its restart policy (or a caller)
        asks: the old container deleted, then create and start as for a new one, under one
        lock hold (a stop waits for it, then stops the new run)."""
        conmon_path = conmon.find(self.conmon_path)
        async with self._locks[task_id]:
            task = await self.store.get(task_id)
            if task is None or task.uid != uid or task.state != STOPPED:
                return  # deleted, or already rerun
            if not asked and not wants_restart(task):
                return
            await _runtime(task).delete(task.id, force=True)
            await self._clear_run(task)
            rerun = await self.store.mark_rerun(task, uuid.uuid4().hex, os.getpid())
            if rerun is None:
                return  # stopped by hand meanwhile
            await self._run_create(rerun, conmon_path, CREATE_TIMEOUT)
            created = await self.store.get(task_id)
            if created is not None:
                if created.resources:
                    await _runtime(created).update(task_id, created.resources)
                await self._start_locked(created)
            log.info("task restarted", task=task_id, restarts=rerun.restart_count)
        await self._outbox.after_change()

    async def _clear_run(self, task: TaskRecord) -> None:
        """What one run left (its conmon, files, exec sessions); the record stays."""
        pid = monitor.conmon_pid(self.layout.task_dir(task.id))
        await monitor.wait_gone(pid, task.id, 5.0, 0.05)
        self.exits.unwatch_oom(task.id)
        self._remove_files(task)

    async def start(self, task_id: str) -> TaskState:
        async with self._locks[task_id]:
            task = await self._current_locked(task_id)
            if task is None:
                raise NotFound(f"task {task_id} not found")
            if task.state == RUNNING:
                return task.to_state()
            if task.state == STOPPED:
                if task.started_at:
                    # A retry: the start was done by a replica killed before it answered
                    # (or recorded it), and the process has run and exited since.
                    return task.to_state()
                raise FailedPrecondition(f"task {task_id} has exited and cannot be started "
                                         "again")
            if task.state == CREATING:
                raise Unavailable(f"task {task_id} is being created")
            await self._start_locked(task)
        await self._outbox.after_change()
        return (await self.record(task_id)).to_state()

    async def _start_locked(self, task: TaskRecord) -> None:
        # Taken before the runtime runs the process: a fast exit's time (the exit file's)
        # then never precedes the start.
        started_at = time.time()
        await self.store.mark_starting(task, started_at)
        try:
            await self._start_once(task)
        except ShoalError:
            await self.store.mark_starting(task, 0.0)  # the runtime did not start it
            raise
        await faults.point("supervisor.task.started")
        # Under the lock: an exit right after start is recorded after the start.
        await self.store.mark_started(task, started_at)
        log.info("task started", task=task.id, pid=task.pid)

    async def _start_once(self, task: TaskRecord) -> None:
        """`runc start`, unless an earlier attempt did it: killed between the runtime's
        start and our record of it, this replica's predecessor left the task `created` in
        the store while the runtime ran it (and may have seen it exit since)."""
        runtime = _runtime(task)
        try:
            await runtime.start(task.id)
        except FailedPrecondition:
            state = await runtime.state(task.id)
            if state is None or state.get("status") not in ("running", "paused", "stopped"):
                raise
            log.info("task was started by an earlier attempt", task=task.id,
                     status=state.get("status"))

    async def state(self, task_id: str) -> TaskState:
        return self._shown(await self.record(task_id))

    def _shown(self, task: TaskRecord) -> TaskState:
        state = task.to_state()
        state.restarting = task.state == STOPPED and self.restarts.waiting(task.id)
        return state

    async def list_tasks(self, sandbox_id: str) -> list[TaskState]:
        tasks = await self.store.list_tasks(sandbox_id)
        exited = [t.id for t in tasks if self.exits.has_exited(t)]
        for task_id in exited:
            await self.exits.process_exit(task_id)
        if exited:
            tasks = await self.store.list_tasks(sandbox_id)
        return [self._shown(t) for t in tasks]

    async def kill(self, task_id: str, sig: int, all_processes: bool) -> TaskState:
        if not 0 < sig < 65:
            raise Invalid(f"signal {sig} is not a valid signal number")
        task = await self.record(task_id)
        if sig == signal.SIGKILL and task.restart_name:
            await self._stop_restarts(task_id)
        if task.state in LIVE:
            await self._signal(task, sig, all_processes)
        return (await self.record(task_id)).to_state()

    async def _signal(self, task: TaskRecord, sig: int, all_processes: bool = False) -> None:
        res = await _runtime(task).kill(task.id, sig, all_processes=all_processes)
        if res.returncode != 0 and "not running" not in res.message:
            if await self.exits.process_exit(task.id):
                return  # it exited meanwhile: nothing left to signal
            raise FailedPrecondition(f"kill {task.id} {sig} failed: {res.message}")

    async def stop(self, task_id: str, sig: int, timeout: float, budget: float) -> TaskState:
        """Signal, wait up to `timeout` (within the caller's budget), then SIGKILL."""
        task = await self.record(task_id)
        if task.restart_name:
            await self._stop_restarts(task_id)
            task = await self.record(task_id)
        if task.state not in LIVE:
            return task.to_state()
        grace = max(0.0, min(timeout, budget - KILL_MARGIN))
        if sig and grace > 0:
            await self._signal(task, sig)
            if await self.exits.wait_exit(task_id, grace):
                return (await self.record(task_id)).to_state()
            log.info("stop timeout passed; killing", task=task_id, timeout=timeout)
        await self._signal(task, signal.SIGKILL)
        if not await self.exits.wait_exit(task_id, max(KILL_MARGIN, budget - grace) - 0.5):
            raise DeadlineExceeded(f"task {task_id} did not exit after SIGKILL")
        return (await self.record(task_id)).to_state()

    async def _stop_restarts(self, task_id: str) -> None:
        """Stopped or killed by hand: no rerun from now on. A rerun under way holds the lock
        through its start; waiting for it makes the caller stop the new run."""
        await self.store.set_manual_stop(task_id)
        self.restarts.forget(task_id)
        async with self._locks[task_id]:
            pass

    async def delete(self, task_id: str) -> TaskState:
        """Forget a task that is not running (created or stopped); idempotent."""
        async with self._locks[task_id]:
            task = await self._current_locked(task_id)
            if task is None:
                return TaskState(id=task_id, state="unknown", message="not found")
            if task.state == RUNNING:
                raise FailedPrecondition(f"task {task_id} is running; stop it first")
            if task.state == CREATING and _supervisor_alive(task.owner_pid):
                raise Unavailable(f"task {task_id} is being created")
            await _runtime(task).delete(task_id, force=True)
            await self._forget(task, publish=task.state != CREATING)
            self.restarts.forget(task_id)
            log.info("task deleted", task=task_id)
        self._locks.pop(task_id, None)
        await self._outbox.after_change()
        return task.to_state()

    async def _forget(self, task: TaskRecord, *, publish: bool) -> None:
        """After `runtime delete`: every file of the task, then its record."""
        # A created task's conmon sees its container die now; let it finish writing its
        # files before they are removed.
        pid = monitor.conmon_pid(self.layout.task_dir(task.id))
        await monitor.wait_gone(pid, task.id, 5.0, 0.05)
        self.exits.unwatch_oom(task.id)
        self._remove_files(task)
        await self.store.delete(task, publish=publish)

    def _remove_files(self, task: TaskRecord) -> None:
        # Exec sessions live in the task's directory; their conmons and socket links go too.
        discard_sessions(self.layout.task_dir(task.id), self.layout.socket_dir)
        self.layout.clear_task(task.id)
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
        check_command("exec_sync", req.cmd, req.env)
        task = await self.record(req.id)
        if task.state != RUNNING:
            raise FailedPrecondition(f"task {req.id} is not running ({task.state})")
        conmon_path = conmon.find(self.conmon_path)
        process = exec_process(task, req.cmd, req.env, req.tty)
        work_dir = self.layout.task_dir(task.id) / f"exec-{uuid.uuid4().hex[:12]}"
        work_dir.mkdir(mode=0o700)
        output = self.outputs.new()
        try:
            result = await Conmon(conmon_path).exec_sync(
                task.id, task.runtime, task.runtime_root, process, work_dir, output,
                tty=req.tty, timeout=req.timeout)
            if result.timed_out:
                raise DeadlineExceeded(f"exec in {req.id} timed out after {req.timeout:g}s")
        except BaseException:
            output.discard()
            raise
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        return _exec_reply(req.id, result.exit_code, output)

    async def update(self, task_id: str, resources: Resources) -> TaskState:
        task = await self.record(task_id)
        if task.state not in LIVE:
            raise FailedPrecondition(f"task {task_id} is not running ({task.state})")
        body = _resources_json(resources, Cgroup(task.cgroup_path or "/").
                               memory_swap_accounted())
        if body:
            await _runtime(task).update(task_id, body)
            kept = dict(task.resources)
            for section, values in body.items():
                kept[section] = {**kept.get(section, {}), **values}
            await self.store.set_resources(task_id, kept)
        return (await self.record(task_id)).to_state()

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
        task = await self.record(task_id)
        if not task.log_path:
            raise FailedPrecondition(f"task {task_id} has no log file")
        if task.state not in LIVE or not monitor.alive(task.conmon_pid, task.id):
            raise FailedPrecondition(f"task {task_id} is not running")
        await monitor.reopen_log(Path(task.bundle), Path(task.log_path))
        return task.to_state()


def _exec_reply(task_id: str, exit_code: int, output: ExecOutput) -> ExecSyncReply:
    """The reply carries each stream whole, or its head and the id to read the rest."""
    if output.truncated:
        log.warning("exec output truncated", task=task_id, cap=EXEC_OUTPUT_CAP,
                    stdout_dropped=output.stdout.dropped, stderr_dropped=output.stderr.dropped)
    return ExecSyncReply(
        exit_code=exit_code, stdout=bytes(output.stdout.head), stderr=bytes(output.stderr.head),
        output_id=output.id if output.in_files else "", stdout_size=output.stdout.size,
        stderr_size=output.stderr.size, truncated=output.truncated)
