"""Interactive exec sessions (CRI Exec behind the gateway's streaming server), attach to a
container's own monitor, and terminal resize.

A session is a directory, `<task dir>/exec/<exec id>/`, and a detached conmon started with
`--exec --exec-attach` whose bundle is that directory (so its attach socket, `ctl` and
`winsz` FIFOs and its `exit` file land there). Its start and sync pipes are FIFOs there
too, so every step after `create` reads only files: any supervisor replica can start,
wait for, resize or remove a session another one created.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from shoal_common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Invalid,
    NotFound,
)
from shoal_common.messages import streams
from shoal_common.rootfs_users import resolve_user

from shoal_supervisor.domain import conmon, monitor
from shoal_supervisor.domain.conmon import AttachedExecSpec, Conmon
from shoal_supervisor.domain.layout import Layout
from shoal_supervisor.domain.oci_runtime import runtime_message
from shoal_supervisor.store.tasks import LIVE, RUNNING, TaskRecord

log = structlog.get_logger("shoal.supervisor")

# The task of an id, with an exit conmon already wrote taken into account; NotFound if none.
# Passed in (TaskManager.record), so sessions need not know how tasks are managed.
RecordLookup = Callable[[str], Awaitable[TaskRecord]]

# Stricter than the message's ExecId: no leading dash, as it becomes conmon's --cuuid value.
_EXEC_ID_RE = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_-]{0,63}\Z")
PREPARE_TIMEOUT = 30.0  # conmon up to its attach socket
START_TIMEOUT = 60.0  # `runtime exec` run and reported
REMOVE_GRACE = 2.0  # for conmon to record the exit of a killed exec before it is killed too


PATH_MAX = 4096  # no program has a longer path: nothing longer can be run
MAX_ARG_STRLEN = 131072  # execve refuses a longer argument or variable (with its NUL)


def check_command(verb: str, cmd: list[str], env: list[str]) -> None:
    """Refuse what could never run before runc tries: runc echoes an unknown program's
    name in its error, and conmon only reads that error once runc exits, so a name larger
    than a pipe buffer leaves both stuck until the caller's deadline."""
    if not cmd:
        raise Invalid(f"{verb}: cmd is empty", details={"field": "cmd"})
    if len(cmd[0].encode()) >= PATH_MAX:
        raise Invalid(f"{verb}: cmd[0] is longer than a path can be ({PATH_MAX} bytes)",
                      details={"field": "cmd"})
    for field, values in (("cmd", cmd), ("env", env)):
        if any(len(v.encode()) >= MAX_ARG_STRLEN for v in values):
            raise Invalid(f"{verb}: an item of {field} is longer than execve takes "
                          f"({MAX_ARG_STRLEN - 1} bytes)", details={"field": field})


def exec_process(task: TaskRecord, cmd: list[str], env: list[str], tty: bool,
                 console: tuple[int, int] | None = None, user: str = "",
                 cwd: str = "") -> dict[str, Any]:
    """The container's own process settings (user, caps, cwd, env, profiles) with the
    exec's command, terminal and extra environment, as `runtime exec --process` takes;
    `user` and `cwd`, when given, replace the container's."""
    try:
        config = json.loads((Path(task.bundle) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FailedPrecondition(f"cannot read {task.bundle}/config.json: {exc}") from None
    process: dict[str, Any] = dict(config.get("process") or {})
    process.pop("consoleSize", None)
    if tty and console:
        # runc sizes the new terminal at once: no window in which the process sees 0x0.
        process["consoleSize"] = {"height": console[0], "width": console[1]}
    process["args"] = list(cmd)
    process["terminal"] = tty
    merged = {e.split("=", 1)[0]: e for e in process.get("env") or []}
    merged.update({e.split("=", 1)[0]: e for e in env})
    process["env"] = list(merged.values())
    if cwd:
        process["cwd"] = cwd
    if user:
        process["user"] = _exec_user(task, config, user)
    return process


def _exec_user(task: TaskRecord, config: dict[str, Any], user: str) -> dict[str, Any]:
    """`user` resolved in the container's own passwd and group files (read within its
    rootfs: the image must not make us read host files)."""
    root = (config.get("root") or {}).get("path") or "rootfs"
    rootfs = Path(task.bundle, root)  # a relative root.path is the bundle's
    found = resolve_user(str(rootfs), user)
    return {"uid": found.uid, "gid": found.gid, "additionalGids": found.additional_gids}


def sessions_dir(task_dir: Path) -> Path:
    return task_dir / "exec"


def discard_sessions(task_dir: Path, socket_dir: Path) -> None:
    """Before a task's files go: stop every conmon of its exec sessions (one still waiting
    to be started would wait forever) and remove their attach-socket links."""
    root = sessions_dir(task_dir)
    if not root.is_dir():
        return
    for session in root.iterdir():
        _kill(monitor.conmon_pid(session), session.name)
        (socket_dir / session.name).unlink(missing_ok=True)


def _kill(conmon_pid: int, exec_id: str) -> None:
    if monitor.alive(conmon_pid, exec_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(conmon_pid, signal.SIGKILL)


def _parent_of(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state


class ExecSessions:
    def __init__(self, record: RecordLookup, layout: Layout, conmon_path: str) -> None:
        self._record = record
        self.layout = layout
        self.conmon_path = conmon_path

    def _dir(self, task_id: str, exec_id: str) -> Path:
        if not _EXEC_ID_RE.match(exec_id):
            raise Invalid(f"exec id {exec_id!r} is not valid (1-64 of A-Z a-z 0-9 _ -, not "
                          "starting with -)")
        return sessions_dir(self.layout.task_dir(task_id)) / exec_id

    def _existing(self, task_id: str, exec_id: str) -> Path:
        d = self._dir(task_id, exec_id)
        if not d.is_dir():
            raise NotFound(f"exec session {exec_id} of task {task_id} not found")
        return d

    async def _running(self, task_id: str) -> TaskRecord:
        task = await self._record(task_id)
        if task.state != RUNNING:
            raise FailedPrecondition(f"container {task_id} is not running ({task.state})")
        return task

    async def create(self, req: streams.ExecCreateRequest, budget: float) -> streams.ExecSession:
        check_command("exec", req.cmd, req.env)
        if not (0 <= req.height < 65536 and 0 <= req.width < 65536):  # runc takes uint16
            raise Invalid(f"exec: terminal size {req.width}x{req.height} is not valid")
        d = self._dir(req.id, req.exec_id)
        task = await self._running(req.id)
        conmon_path = conmon.find(self.conmon_path)
        spec = AttachedExecSpec(
            task_id=task.id, exec_id=req.exec_id, runtime=task.runtime,
            runtime_root=task.runtime_root, session_dir=d, socket_dir=self.layout.socket_dir,
            tty=req.tty, stdin=req.stdin)
        if d.exists():
            # A retry of a create that got through: the same session, if it still waits.
            if (monitor.alive(monitor.conmon_pid(d), req.exec_id)
                    and spec.attach_socket.exists()):
                return streams.ExecSession(exec_id=req.exec_id,
                                           attach_socket=str(spec.attach_socket))
            raise AlreadyExists(f"exec session {req.exec_id} already exists")
        console = (req.height, req.width) if req.height > 0 and req.width > 0 else None
        process = exec_process(task, req.cmd, req.env, req.tty, console, req.user, req.cwd)
        d.mkdir(mode=0o700, parents=True)
        try:
            await Conmon(conmon_path).exec_attached(
                spec, process, timeout=max(1.0, min(PREPARE_TIMEOUT, budget - 1)))
        except BaseException:
            self._discard(d, req.exec_id)
            raise
        log.info("exec session ready", task=task.id, exec_id=req.exec_id, tty=req.tty,
                 stdin=req.stdin)
        return streams.ExecSession(exec_id=req.exec_id, attach_socket=str(spec.attach_socket))

    async def start(self, req: streams.ExecIdRequest, budget: float) -> streams.ExecStarted:
        d = self._existing(req.id, req.exec_id)
        started = monitor.read_pid(d / "exec.pid")
        if started > 0:
            return streams.ExecStarted(pid=started)  # a retry: already running (or ran)
        # Open the report FIFO before releasing conmon: its report then cannot be lost.
        sync_fd = os.open(d / "sync", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            monitor.write_fifo(d / "start", b"1\n", f"exec session {req.exec_id} has ended")
        except BaseException:
            os.close(sync_fd)
            raise
        try:
            msg = await conmon.read_report(sync_fd, max(1.0, min(START_TIMEOUT, budget - 1)))
        except TimeoutError:
            raise DeadlineExceeded(f"exec {req.exec_id} in {req.id} did not start") from None
        pid = int(msg.get("data", -1)) if msg else -1
        if pid <= 0:
            why = (runtime_message(str(msg.get("message", ""))) if msg else "") or \
                monitor.tail(d / conmon.CONMON_LOG) or "its monitor exited"
            raise FailedPrecondition(f"exec in {req.id} failed: {why}")
        log.info("exec started", task=req.id, exec_id=req.exec_id, pid=pid)
        return streams.ExecStarted(pid=pid)

    async def wait(self, req: streams.ExecIdRequest, budget: float) -> streams.ExecExit:
        """The exit code once conmon recorded it; the session is then forgotten."""
        d = self._existing(req.id, req.exec_id)
        conmon_pid = monitor.conmon_pid(d)
        end = time.monotonic() + max(0.0, budget - 1)
        while True:
            code = _exit_code(d)
            if code is None and not monitor.alive(conmon_pid, req.exec_id):
                code = _exit_code(d)  # written just before it went
                if code is None:
                    why = monitor.tail(d / conmon.CONMON_LOG)
                    self._discard(d, req.exec_id)
                    raise FailedPrecondition(f"exec {req.exec_id} in {req.id} ended without "
                                             f"an exit code{': ' + why if why else ''}")
            if code is not None:
                self._discard(d, req.exec_id)
                log.info("exec exited", task=req.id, exec_id=req.exec_id, exit_code=code)
                return streams.ExecExit(exit_code=code)
            if time.monotonic() >= end:
                raise DeadlineExceeded(f"exec {req.exec_id} in {req.id} is still running")
            await asyncio.sleep(0.02)

    async def remove(self, req: streams.ExecIdRequest) -> None:
        """Kill the exec's process (if it runs) and forget the session; idempotent."""
        d = self._dir(req.id, req.exec_id)
        if not d.is_dir():
            return
        conmon_pid = monitor.conmon_pid(d)
        pid = monitor.read_pid(d / "exec.pid")
        # The exec's parent is its conmon (a subreaper): a check against a reused pid.
        if pid > 0 and conmon_pid > 0 and _parent_of(pid) == conmon_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await monitor.wait_gone(conmon_pid, req.exec_id, REMOVE_GRACE, 0.02)
        self._discard(d, req.exec_id)
        log.info("exec session removed", task=req.id, exec_id=req.exec_id)

    def _discard(self, d: Path, exec_id: str) -> None:
        _kill(monitor.conmon_pid(d), exec_id)
        (self.layout.socket_dir / exec_id).unlink(missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)

    async def attach(self, task_id: str) -> streams.AttachInfo:
        """A created task can be attached too: its conmon is up and listening, and a client
        that must see every byte (docker run) attaches before it starts."""
        task = await self._record(task_id)
        if task.state not in LIVE:
            raise FailedPrecondition(f"container {task_id} is not running ({task.state})")
        socket = self.layout.socket_dir / task.id / "attach"
        if not socket.exists():
            raise FailedPrecondition(f"container {task_id} has no attach socket")
        return streams.AttachInfo(attach_socket=str(socket), tty=task.tty, stdin=task.stdin,
                                  stdin_once=task.stdin_once)

    async def resize(self, req: streams.ResizeRequest) -> None:
        if not (0 < req.height < 65536 and 0 < req.width < 65536):
            raise Invalid(f"terminal size {req.width}x{req.height} is not valid")
        if req.exec_id:
            monitor.resize(self._existing(req.id, req.exec_id), req.height, req.width)
        else:
            task = await self._running(req.id)
            monitor.resize(Path(task.bundle), req.height, req.width)


def _exit_code(d: Path) -> int | None:
    try:
        return int((d / "exit").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
