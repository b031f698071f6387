"""The CRI gRPC server on a unix socket, owner-only."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path

import grpc
import structlog
from cri_api.v1 import api_pb2_grpc as cri_grpc

from shoal_cri_gateway.domain.images import Images
from shoal_cri_gateway.grpc_api.images import ImageService
from shoal_cri_gateway.grpc_api.runtime import Runtime, RuntimeService

log = structlog.get_logger("shoal.cri")

# kubelet sends large ListContainers/ListImages answers; containerd allows 16 MiB.
MAX_MESSAGE = 16 * 1024 * 1024
STANDBY_POLL = 1.0  # seconds between a standby replica's checks of the socket's owner


def _someone_listens(path: Path) -> bool:
    """True if a live process accepts connections on the unix socket at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


class CriServer:
    """One replica at a time owns the CRI socket (a unix socket cannot be shared); the
    others stand by and take it over when the owner goes away, so kubelet never loses it
    to a replica starting or stopping."""

    def __init__(self, socket_path: str, runtime: Runtime, images: Images) -> None:
        self.socket_path = socket_path
        self.runtime = runtime
        self.images = images
        self._reconcile: asyncio.Task[None] | None = None
        self._server: grpc.aio.Server | None = None
        self._inode: int | None = None  # of the socket file we bound
        self._standby: asyncio.Task[None] | None = None

    async def start(self) -> None:
        path = Path(self.socket_path)
        # Startup/teardown of a local socket: blocking calls here are brief and happen once.
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket() and await asyncio.to_thread(_someone_listens, path):
            log.info("another replica serves the CRI socket; standing by", socket=str(path))
            self._standby = asyncio.create_task(self._take_over_when_free(path))
            return
        await self._serve(path)

    async def _take_over_when_free(self, path: Path) -> None:
        # Another process owns the socket: polling it is the only signal there is.
        while await asyncio.to_thread(_someone_listens, path):  # noqa: ASYNC110
            await asyncio.sleep(STANDBY_POLL)
        log.info("the CRI socket's owner went away; taking it over", socket=str(path))
        await self._serve(path)

    async def _serve(self, path: Path) -> None:
        if path.is_socket():
            path.unlink()  # left by a replica that was killed
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ])
        cri_grpc.add_RuntimeServiceServicer_to_server(RuntimeService(self.runtime), server)
        cri_grpc.add_ImageServiceServicer_to_server(ImageService(self.images), server)
        old = os.umask(0o077)  # the socket is born owner-only; no window with wider modes
        try:
            server.add_insecure_port(f"unix://{path}")
            await server.start()
        finally:
            os.umask(old)
        path.chmod(0o600)
        self._inode = path.stat().st_ino
        self._server = server
        log.info("CRI socket ready", socket=str(path))
        # Serving alone now: creates another replica left half made are nobody's any more.
        self._reconcile = asyncio.create_task(self._reconcile_pods())

    async def _reconcile_pods(self) -> None:
        try:
            await self.runtime.pods.reconcile()
        except Exception:
            log.exception("reconciling pod records failed")

    async def stop(self, grace: float) -> None:
        if self._reconcile is not None:
            self._reconcile.cancel()
        if self._standby is not None:
            self._standby.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._standby
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        path = Path(self.socket_path)
        # Only our own socket: a standby replica may have taken the path over meanwhile.
        with contextlib.suppress(FileNotFoundError):
            if self._inode is not None and path.stat().st_ino == self._inode:
                path.unlink()
