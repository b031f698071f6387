"""What the streaming server does with a stream once its protocol is sorted out: exec and
attach through conmon's attach sockets (shoal_common.attach), and port-forward by
connecting from inside the pod's network namespace. Protocol-independent: the streaming
layer hands over readers and writers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from shoal_common.attach import ExecProcess, ProcessIO, Reader, Sessions, TerminalSize, Writer
from shoal_common.errors import FailedPrecondition, NotFound

from shoal_cri_gateway.domain.pods import Pods, new_id
from shoal_cri_gateway.store.metadata import ContainerRecord, PodRecord

__all__ = ["ProcessIO", "Reader", "StreamRuntime", "TerminalSize", "Writer", "in_netns"]

CLONE_NEWNET = 0x40000000

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
        return await Sessions(self.pods.clients(ns).monitor).exec(
            container_id, new_id()[:32], ExecProcess(cmd=cmd, tty=tty), io)

    async def attach(self, ns: str, container_id: str, io: ProcessIO) -> None:
        """Attach `io` to the container's own streams until it exits or the client leaves."""
        await Sessions(self.pods.clients(ns).monitor).attach(container_id, io)

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
