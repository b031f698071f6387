"""ExecSync output: conmon's CRI log of an exec, split back into stdout and stderr as it is
written, capped per stream, and kept where the bus can serve it.

conmon writes the log (`<time> <stdout|stderr> <P|F> <content>`) into a FIFO we read, not
into a file: nothing grows on disk beyond what is kept, and a reader that falls behind
slows conmon (and the process) down instead of losing output. A stream is held in memory
up to EXEC_OUTPUT_INLINE bytes, which go in the reply; beyond that it goes to a file
`<run dir>/exec-output/<output id>/<stream>` (0600), read with `exec_output` in chunks
(NATS refuses messages over its 1 MiB payload). Past EXEC_OUTPUT_CAP a stream's bytes are
dropped and the reply says `truncated`. Files whose reader went away are swept: those
idle for OUTPUT_TTL, and at start those idle for START_GRACE (a peer replica's fresh
outputs stay).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import shutil
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from shoal_common.errors import NotFound
from shoal_common.fs import PRIVATE_FILE, private_dir
from shoal_common.messages.monitor import (
    EXEC_OUTPUT_CAP,
    EXEC_OUTPUT_INLINE,
    ExecOutputChunk,
    OutputStream,
)

log = structlog.get_logger("shoal.supervisor")

OUTPUT_TTL = 300.0  # idle seconds before an output nobody removed is dropped
START_GRACE = 30.0  # at start: older leftovers are a dead supervisor's
SWEEP_EVERY = 60.0
PIPE_SIZE = 1 << 20  # fewer wake-ups per MiB of output (the limit root may set)
READ_SIZE = 1 << 20


@dataclass
class StreamOutput:
    """One stream: in memory up to `inline` bytes, then also in `path`; nothing past `cap`."""

    path: Path
    cap: int = EXEC_OUTPUT_CAP
    inline: int = EXEC_OUTPUT_INLINE
    head: bytearray = field(default_factory=bytearray)  # the first `inline` bytes
    size: int = 0
    dropped: int = 0
    in_file: bool = False  # the whole stream is in `path`
    _fd: int = -1

    @property
    def full(self) -> bool:
        return self.size >= self.cap

    def add(self, data: bytes) -> None:
        room = self.cap - self.size
        if len(data) > room:
            self.dropped += len(data) - room
            data = data[:room]
        if not data:
            return
        if not self.in_file and self.size + len(data) > self.inline:
            private_dir(self.path.parent)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                               | os.O_CLOEXEC, PRIVATE_FILE)
            self.in_file = True
            _write_all(self._fd, bytes(self.head))
        if self.in_file:
            _write_all(self._fd, data)
        self.size += len(data)
        if len(self.head) < self.inline:
            self.head += data[:self.inline - len(self.head)]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class ExecOutput:
    """Both streams of one exec, fed with conmon's CRI log lines."""

    def __init__(self, output_dir: Path) -> None:
        self.id = uuid.uuid4().hex
        self.dir = output_dir / self.id
        self.stdout = StreamOutput(self.dir / "stdout")
        self.stderr = StreamOutput(self.dir / "stderr")
        self._rest = b""
        self._overflow = False  # lines came after both streams were full

    @property
    def in_files(self) -> bool:
        return self.stdout.in_file or self.stderr.in_file

    @property
    def truncated(self) -> bool:
        return bool(self._overflow or self.stdout.dropped or self.stderr.dropped)

    def feed(self, chunk: bytes) -> None:
        """Complete log lines of `chunk` (with what an earlier chunk left unfinished)."""
        data = self._rest + chunk
        end = data.rfind(b"\n") + 1
        self._rest = data[end:]
        if self.stdout.full and self.stderr.full:
            self._overflow = self._overflow or end > 0  # dropped unparsed: nothing to keep
            return
        self._lines(data[:end])

    def finish(self) -> None:
        try:
            if self._rest:
                self._lines(self._rest + b"\n")
                self._rest = b""
        finally:
            self.stdout.close()
            self.stderr.close()

    def _lines(self, data: bytes) -> None:
        out: list[bytes] = []
        err: list[bytes] = []
        for line in data.split(b"\n")[:-1]:
            parts = line.split(b" ", 3)
            if len(parts) < 3:
                continue  # not a CRI log line
            pieces = out if parts[1] == b"stdout" else err if parts[1] == b"stderr" else None
            if pieces is None:
                continue
            if len(parts) > 3:
                pieces.append(parts[3])
            if parts[2] == b"F":
                pieces.append(b"\n")  # F ends a line; P continues it
        if out:
            self.stdout.add(b"".join(out))
        if err:
            self.stderr.add(b"".join(err))

    def discard(self) -> None:
        self.finish()
        shutil.rmtree(self.dir, ignore_errors=True)


class LogFifo:
    """The FIFO conmon writes an exec's CRI log to (`--log-path k8s-file:<path>`), pumped
    into an ExecOutput by a thread. We hold a write end ourselves until conmon is done
    (`release`), so EOF means every writer is gone, however early conmon failed."""

    def __init__(self, path: Path, output: ExecOutput) -> None:
        self.path = path
        self.output = output
        os.mkfifo(path, 0o600)
        # Non-blocking open: there is no writer yet. conmon opens its end with O_CLOEXEC,
        # so no process it starts can keep the FIFO open after it.
        self._read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._hold_fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        os.set_blocking(self._read_fd, True)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._read_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self._pump = asyncio.ensure_future(asyncio.to_thread(self._run))

    def _run(self) -> None:
        try:
            while chunk := os.read(self._read_fd, READ_SIZE):
                self.output.feed(chunk)
        finally:
            # A failed write (disk full) ends the pump: conmon then writes into a closed
            # pipe, which it ignores, so nothing waits on us.
            os.close(self._read_fd)
            self.output.finish()

    async def release(self) -> None:
        """Once conmon has exited: the rest of the log, then the end of the pump."""
        if self._hold_fd >= 0:
            os.close(self._hold_fd)
            self._hold_fd = -1
        await self._pump


class ExecOutputs:
    """Large outputs on disk: served in chunks, removed on request or when idle."""

    def __init__(self, output_dir: Path) -> None:
        self.dir = output_dir
        self._sweeper: asyncio.Task[None] | None = None

    def new(self) -> ExecOutput:
        return ExecOutput(self.dir)

    async def read(self, output_id: str, stream: OutputStream, offset: int,
                   size: int) -> ExecOutputChunk:
        return await asyncio.to_thread(self._read, output_id, stream, offset, size)

    def _read(self, output_id: str, stream: OutputStream, offset: int,
              size: int) -> ExecOutputChunk:
        d = self.dir / output_id
        try:
            fd = os.open(d / stream, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                raise
            raise NotFound(f"exec output {output_id} has no {stream} (removed, expired, or "
                           "small enough to be in the reply)") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotFound(f"exec output {output_id} has no {stream}")
            data = os.pread(fd, size, offset) if offset < st.st_size else b""
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.utime(d)  # being read: not idle
        return ExecOutputChunk(data=data, total=st.st_size)

    def remove(self, output_id: str) -> None:
        shutil.rmtree(self.dir / output_id, ignore_errors=True)

    def sweep(self, idle: float) -> int:
        """Remove outputs nobody read or wrote for `idle` seconds; how many went."""
        try:
            entries = list(self.dir.iterdir())
        except FileNotFoundError:
            return 0
        cutoff = time.time() - idle
        removed = 0
        for d in entries:
            if _last_change(d) < cutoff:
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        return removed

    def start(self) -> None:
        removed = self.sweep(START_GRACE)
        if removed:
            log.info("removed exec outputs left by an earlier run", count=removed)
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            try:
                removed = await asyncio.to_thread(self.sweep, OUTPUT_TTL)
            except OSError as exc:  # the next round may do better; never stop sweeping
                log.warning("sweeping exec outputs failed", error=str(exc))
                continue
            if removed:
                log.info("removed exec outputs nobody fetched", count=removed)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper


def _last_change(d: Path) -> float:
    """The newest mtime of an output directory and its files (a running exec's file grows
    without touching the directory)."""
    try:
        times = [d.lstat().st_mtime, *(f.lstat().st_mtime for f in d.iterdir())]
    except OSError:
        return 0.0  # not a directory, or half gone: old enough
    return max(times)
