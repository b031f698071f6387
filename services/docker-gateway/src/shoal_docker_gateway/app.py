"""The Docker gateway's application state, built at start and closed at stop: its records,
the CRI channel and bus clients in the Docker namespace, and the HTTP server on the Docker
socket (its real edge; on the bus it answers health/ping)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from shoal_cli.cri_client import Cri, namespaced_channel
from shoal_common.clients import Clients
from shoal_common.messages.namespaces import check_namespace
from shoal_common.service import ServiceContext

from shoal_docker_gateway.api import (
    archive,
    build,
    containers,
    disk,
    events,
    execs,
    images,
    networks,
    stats,
    streams,
    system,
    volumes,
)
from shoal_docker_gateway.api.server import DockerServer, make_app
from shoal_docker_gateway.domain import containers as lifecycle
from shoal_docker_gateway.domain import events as docker_events
from shoal_docker_gateway.domain import networks as docker_networks
from shoal_docker_gateway.domain.backend import Backend
from shoal_docker_gateway.store.records import Records

# Every endpoint group, in the order their routes are added.
GROUPS = (system.routes, images.routes, containers.routes, streams.routes, execs.routes,
          stats.routes, archive.routes, volumes.routes, networks.routes, events.routes,
          disk.routes, build.routes)


log = structlog.get_logger("shoal.docker")


async def _reconcile(backend: Backend) -> None:
    """Half-done creates and removes of a gateway that was killed, finished once the CRI
    gateway answers (it may start after us)."""
    for attempt in range(60):
        try:
            await lifecycle.reconcile(backend)
            return
        except Exception as exc:  # the CRI gateway not up yet: tried again
            if attempt == 59:
                log.warning("reconciling containers failed", error=str(exc))
            await asyncio.sleep(1.0)


@contextlib.asynccontextmanager
async def lifespan(ctx: ServiceContext) -> AsyncIterator[DockerServer]:
    cfg = ctx.config
    namespace = check_namespace(cfg.docker.namespace, "config key docker.namespace")
    records = Records(ctx.state_dir / "docker.db")
    await records.open()
    channel = namespaced_channel(cfg.cri_socket, namespace)
    backend = Backend(config=cfg, namespace=namespace, bus=ctx.bus,
                      clients=Clients(ctx.bus, namespace=namespace), channel=channel,
                      cri=Cri(channel), records=records)
    server = DockerServer(cfg.docker_socket, make_app(backend, GROUPS), cfg.docker.socket_fd)
    reconciled = asyncio.create_task(_reconcile(backend))
    dies = docker_events.task_consumer(backend)
    try:
        await dies.start()
        await server.start()
        await docker_networks.start(backend)  # containers on user networks resolve again
        yield server
    finally:
        reconciled.cancel()
        await dies.stop(5.0)
        await docker_networks.stop(backend)
        await server.stop()
        await channel.close(None)
        await records.close()
