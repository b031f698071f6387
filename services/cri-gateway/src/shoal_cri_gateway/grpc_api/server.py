"""The CRI gRPC server on a unix socket, owner-only."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import structlog
from cri_api.v1 import api_pb2_grpc as cri_grpc
from shoal_common.bus import Bus

from shoal_cri_gateway.domain.pods import Pods
from shoal_cri_gateway.grpc_api.images import ImageService
from shoal_cri_gateway.grpc_api.runtime import RuntimeService
from shoal_cri_gateway.streaming.server import StreamServer

log = structlog.get_logger("shoal.cri")

# kubelet sends large ListContainers/ListImages answers; containerd allows 16 MiB.
MAX_MESSAGE = 16 * 1024 * 1024


class CriServer:
    def __init__(self, socket_path: str, bus: Bus, pods: Pods, streams: StreamServer) -> None:
        self.socket_path = socket_path
        self.bus = bus
        self.pods = pods
        self.streams = streams
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        path = Path(self.socket_path)
        # Startup/teardown of a local socket: blocking calls here are brief and happen once.
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # left by a replica that was killed
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ])
        runtime = RuntimeService(self.bus, self.pods, self.streams)
        cri_grpc.add_RuntimeServiceServicer_to_server(runtime, server)
        cri_grpc.add_ImageServiceServicer_to_server(ImageService(self.bus), server)
        old = os.umask(0o077)  # the socket is born owner-only; no window with wider modes
        try:
            server.add_insecure_port(f"unix://{path}")
            await server.start()
        finally:
            os.umask(old)
        path.chmod(0o600)
        self._server = server
        log.info("CRI socket ready", socket=str(path))

    async def stop(self, grace: float) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        Path(self.socket_path).unlink(missing_ok=True)
