"""Interactive sessions on conmon's attach sockets, for every edge that streams a process to
a client (the CRI streaming server, the Docker gateway): `exec` runs a command in a
container wired to the client, `attach` joins a container's own streams. The supervisor
runs the processes and names the sockets over the bus (`monitor.exec_*`, `monitor.attach`);
the edge hands over readers and writers and knows nothing of conmon's packet format."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from shoal_common.clients.monitor import MonitorClient
from shoal_common.errors import FailedPrecondition, ShoalError
from shoal_common.messages.monitor import TaskIdRequest
from shoal_common.messages.streams import ExecCreateRequest, ExecIdRequest, ResizeRequest

log = structlog.get_logger("shoal.attach")

# conmon's attach protocol: output packets start with the stream's byte; it reads at most
# CONN_SOCK_BUF_SIZE - 1 bytes per input packet (and would drop the rest).
ATTACH_STDOUT = 2
ATTACH_STDERR = 3
ATTACH_MAX_INPUT = 32767


class Reader(Protocol):
    async def read(self) -> bytes:
        """The next bytes; b"" at the end."""
        ...


class Writer(Protocol):
    async def write(self, data: bytes) -> None: ...


@dataclass(frozen=True)
class TerminalSize:
    width: int
    height: int


@dataclass
class ProcessIO:
    """A client's side of an exec or attach; absent streams were not asked for."""

    stdin: Reader | None = None
    stdout: Writer | None = None
    stderr: Writer | None = None
    resizes: asyncio.Queue[TerminalSize] = field(default_factory=asyncio.Queue)


@dataclass(frozen=True)
class ExecProcess:
    """What runs in an exec session, beyond the container's own process settings."""

    cmd: list[str]
    tty: bool = False
    env: list[str] = field(default_factory=list)
    user: str = ""  # an image-style user ("name", "uid", "uid:gid"); "" = the container's
    cwd: str = ""  # "" = the container's


def connect_attach(path: str) -> socket.socket:
    """Connect to a conmon attach socket. Its path may exceed what a sockaddr holds (long
    run roots, 64-character ids): connect through an O_PATH descriptor of its directory."""
    where = Path(path)
    try:
        dir_fd = os.open(where.parent, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FailedPrecondition(f"attach socket {path} is gone") from None
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(f"/proc/self/fd/{dir_fd}/{where.name}")
        except OSError as exc:
            sock.close()
            raise FailedPrecondition(f"cannot connect to attach socket {path}: "
                                     f"{exc.strerror}") from None
    finally:
        os.close(dir_fd)
    sock.setblocking(False)
    return sock


class Sessions:
    """Exec and attach through one supervisor client (its namespace is the caller's)."""

    def __init__(self, monitor: MonitorClient) -> None:
        self.monitor = monitor

    async def exec(self, container_id: str, exec_id: str, process: ExecProcess,
                   io: ProcessIO, on_start: Callable[[int], None] | None = None) -> int:
        """Run `process` in the container wired to `io`; return its exit code. `on_start`
        is told the process's pid once it runs."""
        tty = process.tty
        size = io.resizes.get_nowait() if tty and not io.resizes.empty() else None
        session = await self.monitor.exec_create(ExecCreateRequest(
            id=container_id, exec_id=exec_id, cmd=process.cmd, env=process.env, tty=tty,
            stdin=io.stdin is not None, user=process.user, cwd=process.cwd,
            height=size.height if size else 0, width=size.width if size else 0))
        try:
            sock = connect_attach(session.attach_socket)
            try:
                run = await self.monitor.exec_start(ExecIdRequest(id=container_id,
                                                                  exec_id=exec_id))
                if on_start is not None:
                    on_start(run.pid)
                await self._pump(sock, io, container_id, exec_id, stdin_open=True)
            finally:
                sock.close()
            reply = await self.monitor.exec_wait(ExecIdRequest(id=container_id,
                                                               exec_id=exec_id))
        except BaseException:
            # Failed, or the client went away: the process must not run on unattended.
            await asyncio.shield(self._remove_exec(container_id, exec_id))
            raise
        return reply.exit_code

    async def _remove_exec(self, container_id: str, exec_id: str) -> None:
        try:
            await self.monitor.exec_remove(ExecIdRequest(id=container_id, exec_id=exec_id))
        except ShoalError as exc:
            log.warning("could not remove exec session", container=container_id,
                        exec_id=exec_id, error=exc.message)

    async def attach(self, container_id: str, io: ProcessIO, *,
                     outlive_stdin: bool = False) -> None:
        """Attach `io` to the container's own streams until it exits or the client leaves;
        with `outlive_stdin` the end of the client's stdin never ends the session (Docker's
        CLI waits for the container's exit anyway, and so gets all of its output)."""
        info = await self.monitor.attach(TaskIdRequest(id=container_id))
        sock = connect_attach(info.attach_socket)
        try:
            # stdin goes on only where the container has one; the client ending it closes
            # the container's stdin if it was created stdin_once (conmon runs others with
            # --leave-stdin-open). What happens to the session then is containerd's rule
            # (pkg/cri/io ContainerIO.Attach): a stdin_once container without a terminal
            # keeps streaming its output until it exits; otherwise the session ends there
            # and the container runs on, its stdin open for the next attach.
            await self._pump(sock, io, container_id, "", stdin_open=info.stdin,
                             end_with_stdin=not outlive_stdin
                             and not (info.stdin_once and not info.tty))
        finally:
            sock.close()

    async def _pump(self, sock: socket.socket, io: ProcessIO, container_id: str,
                    exec_id: str, *, stdin_open: bool, end_with_stdin: bool = False) -> None:
        """Move bytes between the client and conmon until conmon closes the socket (the
        process ended) or, with `end_with_stdin`, the client's stdin ends; input and
        resizes run alongside."""
        loop = asyncio.get_running_loop()

        async def output() -> None:
            while packet := await loop.sock_recv(sock, 65536):
                kind, data = packet[0], packet[1:]
                target = io.stdout if kind == ATTACH_STDOUT else \
                    io.stderr if kind == ATTACH_STDERR else None
                if target is not None and data:
                    await target.write(data)

        async def stdin(reader: Reader) -> None:
            while data := await reader.read():
                if not stdin_open:
                    continue  # nowhere to go: read and drop, so the client is not blocked
                for i in range(0, len(data), ATTACH_MAX_INPUT):
                    await loop.sock_sendall(sock, data[i:i + ATTACH_MAX_INPUT])
            if stdin_open:
                # SHUT_WR: the process's stdin ends (unless conmon leaves it open). SHUT_RDWR
                # also ends the output loop: recv gives what conmon already queued, then EOF,
                # so nothing is cancelled mid-write to the client.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR if end_with_stdin else socket.SHUT_WR)

        async def resizes() -> None:
            while True:
                size = await io.resizes.get()
                try:
                    await self.monitor.resize(ResizeRequest(
                        id=container_id, exec_id=exec_id, height=size.height,
                        width=size.width))
                except ShoalError as exc:
                    log.info("terminal resize failed", container=container_id,
                             exec_id=exec_id, error=exc.message)

        helpers = [asyncio.create_task(resizes())]
        if io.stdin is not None:
            helpers.append(asyncio.create_task(stdin(io.stdin)))
        try:
            await output()
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
