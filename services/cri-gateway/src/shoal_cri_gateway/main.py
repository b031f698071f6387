"""Entry point: `shoal-cri-gateway` (or `python -m shoal_cri_gateway`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from shoal_common.service import ServiceContext, ServiceSpec, run_service

from shoal_cri_gateway.grpc_api.server import CriServer
from shoal_cri_gateway.handlers import router


@contextlib.asynccontextmanager
async def lifespan(ctx: ServiceContext) -> AsyncIterator[CriServer]:
    server = CriServer(ctx.config.cri_socket, ctx.bus)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=ctx.config.service("cri-gateway").shutdown_timeout)


def main() -> None:
    run_service(ServiceSpec(name="cri-gateway", router=router, lifespan=lifespan))
