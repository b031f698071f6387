"""Driving conmon (Debian's, 2.1.x), the per-container monitor CRI-O uses.

How we talk to it (from conmon's --help, its behaviour, and what it writes):
- `_OCI_SYNCPIPE=<fd>` with `--api-version 1`: conmon writes one JSON line
  `{"data": <pid>}` once `runtime create` (or `exec`) succeeded, or
  `{"data": -1, "message": "<the runtime's stderr>"}` when it failed. For `--exec` a second
  line carries the exit code (`{"data": -1, "message": "command timed out"}` on `--timeout`).
  This is how a create learns the container pid or the runtime's own error, without polling.
- Without `--sync` conmon double-forks and calls setsid(): the monitor and the container
  outlive the process that started them (a supervisor killed with -9 loses nothing).
  It ignores SIGPIPE, so our closing the sync pipe early does not hurt it.
- When the container exits it writes the code to `<persist-dir>/exit` and then
  `<exit-dir>/<cid>` (atomically: a temp file renamed into place), after draining the
  container's output into the log. Both directories must exist beforehand.
- On cgroup v1 it registers its own OOM eventfd and touches `<persist-dir>/oom` (and `oom`
  in its working directory, so we start it in the task's run directory).
- The `ctl` FIFO it creates in the bundle takes `<type> <height> <width>\\n` lines:
  type 1 resizes the terminal, type 2 reopens the log file (CRI ReopenContainerLog).
- Whenever it has a bundle it listens on `<socket-dir-path>/<cuuid>/attach` (the directory
  is a symlink it makes to the bundle, keeping the path short): a SOCK_SEQPACKET socket
  where each output packet is the stream byte (2 stdout, 3 stderr) and the data, and what a
  client sends goes to the container's stdin (with `--stdin`); a client shutting down its
  side closes that stdin unless `--leave-stdin-open`.
- `--exec --exec-attach` (an interactive exec) takes two more pipes: `_OCI_ATTACHPIPE`,
  where it writes `{"data": 0}` once its attach socket listens, and `_OCI_STARTPIPE`, which
  it reads twice: before it forks at all, and again before it runs `runtime exec`, so a
  client can connect first and miss no output.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal_common.errors import FailedPrecondition, Internal
from shoal_common.fs import Under, write_private

from shoal_supervisor.domain import monitor
from shoal_supervisor.domain.exec_output import ExecOutput, LogFifo
from shoal_supervisor.domain.metrics import timed
from shoal_supervisor.domain.oci_runtime import runtime_message

TIMED_OUT_MESSAGE = "command timed out"
CONMON_LOG = "conmon.log"  # conmon's own stderr before it detaches from it
EXEC_BACKSTOP_SECONDS = 10  # conmon's own exec timeout, after ours
REPORT_LIMIT = 1 << 20  # one JSON line from conmon (runc's error text is in it)


@dataclass(frozen=True)
class CreateSpec:
    task_id: str
    bundle: Path
    runtime: str  # resolved runtime binary
    runtime_root: str
    log_path: str  # "" = no log
    tty: bool
    stdin: bool
    stdin_once: bool
    task_dir: Path  # pid files and conmon's stderr
    persist_dir: Path
    exit_dir: Path
    socket_dir: Path


@dataclass(frozen=True)
class AttachedExecSpec:
    """An interactive exec: its files live in `session_dir` (the bundle conmon is given, so
    the attach socket, `ctl` and `winsz` go there), its pipes to us are FIFOs in it."""

    task_id: str
    exec_id: str  # conmon's --cuuid: names the attach socket's directory
    runtime: str
    runtime_root: str
    session_dir: Path
    socket_dir: Path
    tty: bool
    stdin: bool

    start_fifo = Under("session_dir", "start")
    sync_fifo = Under("session_dir", "sync")

    @property
    def attach_socket(self) -> Path:
        return self.socket_dir / self.exec_id / "attach"


@dataclass(frozen=True)
class Created:
    pid: int
    conmon_pid: int


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    timed_out: bool  # the output went to the ExecOutput the caller gave


class _SyncPipe:
    """The pipe conmon reports on; our end is read without blocking the event loop."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self._reader: asyncio.StreamReader | None = None
        self._transport: asyncio.ReadTransport | None = None

    def child_env(self) -> dict[str, str]:
        return {**os.environ, "_OCI_SYNCPIPE": str(self.write_fd)}

    async def spawned(self) -> None:
        """The child has its copy: close ours, so EOF means conmon is gone."""
        os.close(self.write_fd)
        self.write_fd = -1
        self._reader, self._transport = await _pipe_reader(self.read_fd)

    async def message(self) -> dict[str, Any] | None:
        """The next JSON line, or None at EOF."""
        assert self._reader is not None
        line = await _report_line(self._reader)
        if not line:
            return None
        try:
            msg: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:
            raise Internal(f"conmon sent an unreadable sync message: {line[:200]!r}") from None
        return msg

    def close(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1
        if self._transport is not None:
            self._transport.close()
        elif self.read_fd >= 0:
            os.close(self.read_fd)
        self.read_fd = -1


async def _pipe_reader(fd: int) -> tuple[asyncio.StreamReader, asyncio.ReadTransport]:
    """A stream over the read end `fd` (owned by the transport from now on)."""
    reader = asyncio.StreamReader(limit=REPORT_LIMIT)
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: protocol, os.fdopen(fd, "rb", buffering=0))
    return reader, transport


async def _report_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readline()
    except ValueError:  # longer than REPORT_LIMIT: the runtime's error text gone wild
        raise FailedPrecondition(f"conmon reported more than {REPORT_LIMIT} bytes at once"
                                 ) from None


async def read_report(fd: int, timeout: float) -> dict[str, Any] | None:
    """The first JSON line conmon writes to a sync FIFO (our read end `fd`, closed here),
    or None once it has exited: conmon holds the FIFO open, so EOF means conmon is gone."""
    reader, transport = await _pipe_reader(fd)
    try:
        async with asyncio.timeout(timeout):
            line = await _report_line(reader)
    finally:
        transport.close()
    if not line:
        return None
    try:
        msg: dict[str, Any] = json.loads(line)
    except json.JSONDecodeError:
        return {"data": -1, "message": f"unreadable report from conmon: {line[:200]!r}"}
    return msg


def find(path: str) -> str:
    """The conmon binary `path` names (a name is looked up in PATH)."""
    found = shutil.which(path)
    if found is None:
        raise FailedPrecondition(f"conmon {path!r} not found")
    return found


class Conmon:
    def __init__(self, path: str, log_level: str = "info") -> None:
        self.path = path
        self.log_level = log_level

    def _argv(self, cid: str, cuuid: str, runtime: str, runtime_root: str, *args: str,
              tty: bool) -> list[str]:
        """What every conmon we run is told (ids, runtime, its root, our log level) around
        the options of one kind of run."""
        return [
            self.path, "--api-version", "1", "--cid", cid, "--cuuid", cuuid, "--name", cid,
            "--runtime", runtime, *args,
            "--runtime-arg", f"--root={runtime_root}", "--log-level", self.log_level,
            *(["--terminal"] if tty else []),
        ]

    async def create(self, spec: CreateSpec, timeout: float) -> Created:
        """Start a detached conmon that runs `runtime create`; return once the container
        exists (its init waits for `runtime start`) or raise with the runtime's error."""
        argv = self._argv(
            spec.task_id, spec.task_id, spec.runtime, spec.runtime_root,
            "--bundle", str(spec.bundle),
            "--conmon-pidfile", str(spec.task_dir / monitor.PIDFILE),
            "--container-pidfile", str(spec.task_dir / "container.pid"),
            # k8s-file is the CRI format: "<RFC3339Nano> <stdout|stderr> <P|F> <line>".
            "--log-path", f"k8s-file:{spec.log_path}" if spec.log_path else "none:",
            "--exit-dir", str(spec.exit_dir),
            "--persist-dir", str(spec.persist_dir),
            "--socket-dir-path", str(spec.socket_dir),
            tty=spec.tty)
        if spec.stdin:
            argv.append("--stdin")
            if not spec.stdin_once:
                argv.append("--leave-stdin-open")
        conmon_log = spec.task_dir / CONMON_LOG
        pipe = _SyncPipe()
        try:
            with timed("create"):
                proc = await _spawn(argv, conmon_log, pipe, spec.task_dir)
                # The first conmon exits as soon as it forked the monitor (or failed early).
                await proc.wait()
                conmon_pid = monitor.conmon_pid(spec.task_dir)
                msg = await _report_within(pipe, timeout, conmon_pid,
                                           f"report on {spec.task_id}")
        finally:
            pipe.close()
        if msg is None:
            why = monitor.tail(conmon_log) or f"exit status {proc.returncode}"
            raise Internal(f"conmon failed to create {spec.task_id}: {why}")
        pid = int(msg.get("data", -1))
        if pid <= 0:
            text = runtime_message(str(msg.get("message", ""))) or "no error text"
            raise FailedPrecondition(f"{Path(spec.runtime).name} create {spec.task_id} "
                                     f"failed: {text}")
        return Created(pid=pid, conmon_pid=conmon_pid)

    async def exec_sync(self, task_id: str, runtime: str, runtime_root: str,
                        process: dict[str, Any], work_dir: Path, output: ExecOutput, *,
                        tty: bool, timeout: float) -> ExecResult:
        """Run a process in the container under a foreground conmon (`--sync`), which
        writes the output as a CRI log into a FIFO that fills `output`.

        The timeout is ours, not conmon's: conmon's own kills the process and exits without
        reaping it, leaving a zombie in the pod until the host's init gets to it. We kill
        the process group while conmon still lives, so conmon reaps it before we answer.
        conmon keeps a later timeout as a backstop in case this process dies meanwhile."""
        spec_path = work_dir / "process.json"
        write_private(spec_path, json.dumps(process))  # the exec's environment
        fifo = LogFifo(work_dir / "exec.log", output)
        argv = self._argv(
            task_id, f"{task_id}-{work_dir.name}", runtime, runtime_root,
            "--exec", "--exec-process-spec", str(spec_path),
            "--container-pidfile", str(work_dir / "exec.pid"),
            # fsync means nothing on a FIFO (and would only be warned about).
            "--log-path", f"k8s-file:{fifo.path}", "--no-sync-log", "--sync",
            tty=tty)
        if timeout > 0:
            argv += ["--timeout", str(math.ceil(timeout) + EXEC_BACKSTOP_SECONDS)]
        conmon_log = work_dir / CONMON_LOG
        pipe = _SyncPipe()
        proc: asyncio.subprocess.Process | None = None
        try:
            with timed("exec"):
                proc = await _spawn(argv, conmon_log, pipe, work_dir)
                finished, timed_out = await _exec_reports(pipe, proc, task_id, conmon_log,
                                                          timeout)
        except BaseException:
            # Cancelled (the caller's deadline) or failed: the exec's process was killed
            # (_exec_reports); now conmon.
            if proc is not None and proc.returncode is None:
                proc.kill()
                await asyncio.shield(proc.wait())
            raise
        finally:
            pipe.close()
            await fifo.release()  # conmon is gone: the log is complete
        if finished is None and not timed_out:
            raise Internal(f"conmon exec in {task_id} ended without an exit code: "
                           f"{monitor.tail(conmon_log) or proc.returncode}")
        finished = finished or {}
        timed_out = timed_out or finished.get("message") == TIMED_OUT_MESSAGE
        return ExecResult(int(finished.get("data", -1)), timed_out)

    async def exec_attached(self, spec: AttachedExecSpec, process: dict[str, Any],
                            timeout: float) -> int:
        """Start a detached conmon for an interactive exec and return its pid once its attach
        socket listens; the process itself waits for a write to the start FIFO.

        The start and sync pipes are FIFOs in the session directory that conmon holds open
        read-write: whichever supervisor replica handles `exec_start` can then release it
        and read its report, and the FIFO never reads as closed while conmon lives."""
        d = spec.session_dir
        write_private(d / "process.json", json.dumps(process))  # the exec's environment
        os.mkfifo(spec.start_fifo, 0o600)
        os.mkfifo(spec.sync_fifo, 0o600)
        argv = self._argv(
            spec.task_id, spec.exec_id, spec.runtime, spec.runtime_root,
            "--exec", "--exec-attach",
            "--exec-process-spec", str(d / "process.json"), "--bundle", str(d),
            "--socket-dir-path", str(spec.socket_dir),
            "--container-pidfile", str(d / "exec.pid"),
            "--conmon-pidfile", str(d / monitor.PIDFILE),
            # conmon writes the exit code to <persist-dir>/exit: any replica can read it.
            "--persist-dir", str(d), "--log-path", "none:",
            tty=spec.tty)
        if spec.stdin:
            argv.append("--stdin")  # not --leave-stdin-open: our shutdown is the process's EOF
        start_fd = os.open(spec.start_fifo, os.O_RDWR | os.O_CLOEXEC)
        sync_fd = os.open(spec.sync_fifo, os.O_RDWR | os.O_CLOEXEC)
        attach = _SyncPipe()
        log_fd = _open_log(d / CONMON_LOG)
        try:
            # The first start message: conmon reads it before it forks, so it is consumed
            # long before the attach socket exists and the second one can be written.
            os.write(start_fd, b"0\n")
            env = {**os.environ, "_OCI_SYNCPIPE": str(sync_fd), "_OCI_STARTPIPE": str(start_fd),
                   "_OCI_ATTACHPIPE": str(attach.write_fd)}
            with timed("exec"):
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                    pass_fds=(start_fd, sync_fd, attach.write_fd), env=env, cwd=d)
                await attach.spawned()
                await proc.wait()  # the first conmon exits once it forked the monitor
                conmon_pid = monitor.conmon_pid(d)
                msg = await _report_within(attach, timeout, conmon_pid,
                                           f"open the attach socket of exec {spec.exec_id}")
        finally:
            for fd in (start_fd, sync_fd, log_fd):
                os.close(fd)
            attach.close()
        if msg is None or int(msg.get("data", -1)) != 0:
            why = (str(msg.get("message", "")) if msg else "") or monitor.tail(d / CONMON_LOG)
            raise Internal(f"conmon failed to prepare exec {spec.exec_id} in {spec.task_id}: "
                           f"{why or f'exit status {proc.returncode}'}")
        return conmon_pid


async def _exec_reports(pipe: _SyncPipe, proc: asyncio.subprocess.Process, task_id: str,
                        conmon_log: Path, timeout: float
                        ) -> tuple[dict[str, Any] | None, bool]:
    """conmon's two reports on a sync exec, its start and its exit, until conmon exits;
    past `timeout` the process group is killed (conmon then reaps it and reports)."""
    started = await pipe.message()
    if started is None or int(started.get("data", -1)) <= 0:
        await proc.wait()
        text = (runtime_message(str(started.get("message", ""))) if started
                else monitor.tail(conmon_log)) or f"conmon exit status {proc.returncode}"
        raise FailedPrecondition(f"exec in {task_id} failed: {text}")
    exec_pid = int(started["data"])
    timed_out = False
    try:
        try:
            async with asyncio.timeout(timeout if timeout > 0 else None):
                finished = await pipe.message()
        except TimeoutError:
            timed_out = True
            _kill_group(exec_pid)
            finished = await pipe.message()  # conmon reaped it
        await proc.wait()
    except BaseException:
        _kill(exec_pid)
        raise
    return finished, timed_out


def _open_log(path: Path) -> int:
    """conmon's own stderr file, owner-only, appended to."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


async def _spawn(argv: list[str], log_path: Path, pipe: _SyncPipe,
                 cwd: Path) -> asyncio.subprocess.Process:
    """Start conmon with the sync pipe, its own stderr to `log_path` (what it says before
    it detaches from it is all we get to explain an early failure)."""
    log_fd = _open_log(log_path)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
            pass_fds=(pipe.write_fd,), env=pipe.child_env(), cwd=cwd)
    finally:
        os.close(log_fd)
    await pipe.spawned()
    return proc


async def _report_within(pipe: _SyncPipe, timeout: float, conmon_pid: int,
                         what: str) -> dict[str, Any] | None:
    """The detached monitor's first report (None if it closed the pipe); past `timeout`, the
    monitor is killed."""
    try:
        async with asyncio.timeout(timeout):
            return await pipe.message()
    except TimeoutError:
        _kill(conmon_pid)
        raise Internal(f"conmon did not {what} within {timeout:.0f}s") from None


def _kill_group(pid: int) -> None:
    """SIGKILL an exec's process group (what it forked too), as conmon's timeout does; just
    the process when it shares our group (never kill ourselves)."""
    try:
        group = os.getpgid(pid)
    except ProcessLookupError:
        return
    if group > 1 and group != os.getpgrp():
        try:
            os.killpg(group, signal.SIGKILL)
            return
        except ProcessLookupError:
            return
    _kill(pid)


def _kill(pid: int) -> None:
    if pid > 0:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
