"""The CRI gateway's application state, built at start and closed at stop: its metadata
store, the domain over typed clients of the other services, the streaming server, and
the gRPC server on the CRI socket (its real edge; on the bus it answers health/ping)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from shoal_common.infra import drop_infra
from shoal_common.service import ServiceContext

from shoal_cri_gateway.domain.cri_metrics import CriMetrics
from shoal_cri_gateway.domain.events import ContainerEvents
from shoal_cri_gateway.domain.images import Images
from shoal_cri_gateway.domain.metrics import PodsByState
from shoal_cri_gateway.domain.namespaces import NamespacedClients
from shoal_cri_gateway.domain.pods import Pods
from shoal_cri_gateway.domain.stats import Stats
from shoal_cri_gateway.domain.streams import StreamRuntime
from shoal_cri_gateway.domain.views import Views
from shoal_cri_gateway.grpc_api.runtime import Runtime
from shoal_cri_gateway.grpc_api.server import CriServer
from shoal_cri_gateway.store.metadata import Metadata
from shoal_cri_gateway.streaming.server import StreamServer


@dataclass
class GatewayApp:
    server: CriServer
    runtime: Runtime


@contextlib.asynccontextmanager
async def lifespan(ctx: ServiceContext) -> AsyncIterator[GatewayApp]:
    metadata = Metadata(ctx.state_dir / "metadata.db")
    await metadata.open()
    PodsByState(ctx.state_dir / "metadata.db").register()
    # Per call's namespace (the `shoal-namespace` metadata; kubelet's: k8s.io).
    clients = NamespacedClients(ctx.bus)
    pods = Pods(clients, metadata, ctx.config.cri.sandbox_image, drop_infra(ctx.config))
    views = Views(pods)
    streams = StreamServer(ctx.config.cri.stream_addr, StreamRuntime(pods),
                           ctx.config.cri.stream_idle_timeout)
    runtime = Runtime(ctx.bus, pods, views, Stats(pods, CriMetrics(pods)),
                      ContainerEvents(ctx.bus, views), streams)
    server = CriServer(ctx.config.cri_socket, runtime, Images(clients))
    try:
        await streams.start()
        await server.start()
        yield GatewayApp(server, runtime)
    finally:
        await server.stop(grace=ctx.config.service("cri-gateway").shutdown_timeout)
        await streams.stop()
        await metadata.close()
