"""What the streaming server does with a stream once its protocol is sorted out: exec and
attach through conmon's attach sockets (the supervisor runs the processes and names the
sockets over the bus), and port-forward by connecting from inside the pod's network
namespace. Protocol-independent: the streaming layer hands over readers and writers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
from shoal_common.errors import FailedPrecondition, NotFound, ShoalError
from shoal_common.messages.monitor import TaskIdRequest
from shoal_common.messages.streams import ExecCreateRequest, ExecIdRequest, ResizeRequest

from shoal_cri_gateway.domain.pods import Pods, new_id
from shoal_cri_gateway.store.metadata import ContainerRecord, PodRecord

log = structlog.get_logger("shoal.cri.streams")

# conmon's attach protocol: output packets start with the stream's byte; it reads at most
# CONN_SOCK_BUF_SIZE - 1 bytes per input packet (and would drop the rest).
ATTACH_STDOUT = 2
ATTACH_STDERR = 3
ATTACH_MAX_INPUT = 32767
CLONE_NEWNET = 0x40000000


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


def _connect_attach(path: str) -> socket.socket:
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


_libc = ctypes.CDLL(None, use_errno=True)


def _enter_netns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


async def in_netns(path: str, fn: Callable[[], Any]) -> Any:
    """Run `fn` on a fresh thread that joined the network namespace at `path`. The thread
    ends right after, so no pooled thread is ever left in a pod's namespace; sockets made
    there keep that namespace for life."""
    result: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        try:
            _enter_netns(path)
            result.set_result(fn())
        except BaseException as exc:
            result.set_exception(exc)

    threading.Thread(target=run, name="shoal-netns", daemon=True).start()
    return await asyncio.wrap_future(result)


class StreamRuntime:
    """A session acts in the Shoal namespace its RPC was checked in (`ns`)."""

    def __init__(self, pods: Pods) -> None:
        self.pods = pods

    # -- validation for the RPCs ----------------------------------------------------------

    async def running_container(self, ns: str, container_id: str) -> ContainerRecord:
        ctr = await self.pods.meta.container(container_id, ns)
        task = await self.pods.task_state(ns, ctr.id)
        if task is None or task.state != "running":
            state = task.state if task is not None else "unknown"
            raise FailedPrecondition(f"container {ctr.id} is not running ({state})")
        return ctr

    async def ready_pod(self, ns: str, pod_id: str) -> PodRecord:
        pod = await self.pods.meta.pod(pod_id, ns)
        if await self.pods.sandbox_state(pod) != "ready":
            raise FailedPrecondition(f"pod sandbox {pod.id} is not ready")
        return pod

    # -- exec and attach ------------------------------------------------------------------

    async def exec(self, ns: str, container_id: str, cmd: list[str], tty: bool,
                   io: ProcessIO) -> int:
        """Run `cmd` in the container wired to `io`; return its exit code."""
        monitor = self.pods.clients(ns).monitor
        exec_id = new_id()[:32]
        size = io.resizes.get_nowait() if tty and not io.resizes.empty() else None
        session = await monitor.exec_create(ExecCreateRequest(
            id=container_id, exec_id=exec_id, cmd=cmd, tty=tty, stdin=io.stdin is not None,
            height=size.height if size else 0, width=size.width if size else 0))
        try:
            sock = _connect_attach(session.attach_socket)
            try:
                await monitor.exec_start(ExecIdRequest(id=container_id, exec_id=exec_id))
                await self._pump(ns, sock, io, container_id, exec_id, stdin_open=True)
            finally:
                sock.close()
            reply = await monitor.exec_wait(ExecIdRequest(id=container_id, exec_id=exec_id))
        except BaseException:
            # Failed, or the client went away: the process must not run on unattended.
            await asyncio.shield(self._remove_exec(ns, container_id, exec_id))
            raise
        return reply.exit_code

    async def _remove_exec(self, ns: str, container_id: str, exec_id: str) -> None:
        try:
            await self.pods.clients(ns).monitor.exec_remove(ExecIdRequest(
                id=container_id, exec_id=exec_id))
        except ShoalError as exc:
            log.warning("could not remove exec session", container=container_id,
                        exec_id=exec_id, error=exc.message)

    async def attach(self, ns: str, container_id: str, io: ProcessIO) -> None:
        """Attach `io` to the container's own streams until it exits or the client leaves."""
        info = await self.pods.clients(ns).monitor.attach(TaskIdRequest(id=container_id))
        sock = _connect_attach(info.attach_socket)
        try:
            # stdin goes on only where the container has one; the client ending it closes
            # the container's stdin if it was created stdin_once (conmon runs others with
            # --leave-stdin-open). What happens to the session then is containerd's rule
            # (pkg/cri/io ContainerIO.Attach): a stdin_once container without a terminal
            # keeps streaming its output until it exits; otherwise the session ends there
            # and the container runs on, its stdin open for the next attach.
            await self._pump(ns, sock, io, container_id, "", stdin_open=info.stdin,
                             end_with_stdin=not (info.stdin_once and not info.tty))
        finally:
            sock.close()

    async def _pump(self, ns: str, sock: socket.socket, io: ProcessIO, container_id: str,
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
                    await self.pods.clients(ns).monitor.resize(ResizeRequest(
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

    # -- port forward ---------------------------------------------------------------------

    async def dial(self, ns: str, pod_id: str, port: int) -> socket.socket:
        """A TCP connection to localhost:`port` as seen from inside the pod."""
        try:
            pod = await self.pods.meta.pod(pod_id, ns)
        except NotFound:
            raise FailedPrecondition(f"pod sandbox {pod_id} is gone") from None

        def make() -> list[socket.socket]:
            return [socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC),
                    socket.socket(socket.AF_INET6, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)]

        # A pod on the host network has no namespace of its own.
        socks = await in_netns(pod.netns_path, make) if pod.netns_path else make()
        loop = asyncio.get_running_loop()
        errors = []
        for sock, host in zip(socks, ("127.0.0.1", "::1"), strict=True):
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (host, port))
            except OSError as exc:
                errors.append(f"{host}: {os.strerror(exc.errno) if exc.errno else exc}")
                sock.close()
                continue
            for other in socks:
                if other is not sock:
                    other.close()
            return sock
        raise FailedPrecondition(f"failed to connect to localhost:{port} inside the network "
                                 f"namespace of pod {pod.id}: {'; '.join(errors)}")
