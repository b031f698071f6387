"""A conmon that is already running, seen from outside: its pid files, whether it still
lives, what it said on stderr, waiting for it to go, and its `ctl` FIFO. Starting conmon
(and what it writes where) is conmon.py's."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from shoal_common.errors import FailedPrecondition

CTL_RESIZE = 1
CTL_REOPEN_LOG = 2
PIDFILE = "conmon.pid"


def tail(path: Path, limit: int = 2000) -> str:
    """The end of conmon's own stderr: all there is to explain a monitor that went away."""
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""


def alive(pid: int, task_id: str) -> bool:
    """Whether `pid` is still the conmon of `task_id` (not a zombie, not a reused pid)."""
    if pid <= 0:
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and argv[0].endswith(b"conmon") and task_id.encode() in argv


def read_pid(path: Path) -> int:
    """The pid in a pid file conmon wrote; 0 when there is none (yet)."""
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def conmon_pid(directory: Path) -> int:
    """The pid of the conmon whose `--conmon-pidfile` is in `directory` (a task's run dir or
    an exec session's)."""
    return read_pid(directory / PIDFILE)


async def poll_until(done: Callable[[], bool], timeout: float, interval: float) -> bool:
    """For states only the file system shows (a process gone, a file replaced)."""
    end = time.monotonic() + timeout
    while True:
        if done():
            return True
        if time.monotonic() >= end:
            return False
        await asyncio.sleep(interval)


async def wait_gone(pid: int, name: str, timeout: float, interval: float) -> bool:
    """Until the conmon `pid` of `name` (a task or exec id) has exited, within `timeout`."""
    return await poll_until(lambda: not alive(pid, name), timeout, interval)


async def reopen_log(bundle: Path, log_path: Path) -> None:
    """Ask the container's conmon to reopen its log file (after a rotation). conmon
    reopens asynchronously (a new file renamed into place): wait for it, so returning
    means the old file is no longer written."""
    before = _inode(log_path)
    _control(bundle, f"{CTL_REOPEN_LOG} 0 0\n")
    await poll_until(lambda: _inode(log_path) not in (before, None), 2.0, 0.01)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def resize(bundle: Path, height: int, width: int) -> None:
    """Set the terminal size of the process conmon runs from `bundle` (a container's bundle
    or an exec session's directory)."""
    _control(bundle, f"{CTL_RESIZE} {height} {width}\n")


def _control(bundle: Path, line: str) -> None:
    write_fifo(bundle / "ctl", line.encode(), "the process's monitor is not running")


def write_fifo(path: Path, data: bytes, gone: str) -> None:
    """Write to a FIFO conmon reads; FailedPrecondition(`gone`) when it has no reader."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENOENT):  # no reader: conmon has exited
            raise FailedPrecondition(gone) from None
        if exc.errno == errno.ELOOP:
            raise FailedPrecondition(f"{path} is not a FIFO") from None
        raise
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):  # never write into a file put there
            raise FailedPrecondition(f"{path} is not a FIFO")
        os.write(fd, data)
    finally:
        os.close(fd)
