"""Entry point: `shoal-cri-gateway` (or `python -m shoal_cri_gateway`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from shoal_common.service import ServiceContext, ServiceSpec, run_service

from shoal_cri_gateway.domain.metrics import PodsByState
from shoal_cri_gateway.domain.pods import Pods
from shoal_cri_gateway.domain.streams import StreamRuntime
from shoal_cri_gateway.grpc_api.server import CriServer
from shoal_cri_gateway.handlers import router
from shoal_cri_gateway.store.metadata import Metadata
from shoal_cri_gateway.streaming.server import StreamServer


@contextlib.asynccontextmanager
async def lifespan(ctx: ServiceContext) -> AsyncIterator[CriServer]:
    metadata = Metadata(ctx.state_dir / "metadata.db")
    await metadata.open()
    PodsByState(ctx.state_dir / "metadata.db").register()
    pods = Pods(ctx.bus, metadata, ctx.config.cri.sandbox_image)
    streams = StreamServer(ctx.config.cri.stream_addr, StreamRuntime(ctx.bus, pods),
                           ctx.config.cri.stream_idle_timeout)
    server = CriServer(ctx.config.cri_socket, ctx.bus, pods, streams)
    try:
        await streams.start()
        await server.start()
        yield server
    finally:
        await server.stop(grace=ctx.config.service("cri-gateway").shutdown_timeout)
        await streams.stop()
        await metadata.close()


def main() -> None:
    run_service(ServiceSpec(name="cri-gateway", router=router, lifespan=lifespan))
