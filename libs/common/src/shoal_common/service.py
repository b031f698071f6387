"""The one way to configure, start and stop a service.

    def main() -> None:
        run_service(ServiceSpec(name="puller", router=router, lifespan=lifespan))

Start: parse flags, load config (refused with a message naming the key), set up logging,
serve /metrics, connect to NATS, ensure the events stream, enter the service's lifespan
(open its stores), serve its commands plus `health` (every replica answers) and `ping`.
Stop (SIGTERM/SIGINT): stop taking work, finish in-flight within the bound, leave the
lifespan, drain the connection, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from shoal_common import __version__, metrics
from shoal_common.bus import Bus, RequestContext, Router
from shoal_common.catalog import ServiceInfo, lookup
from shoal_common.clients import CLIENTS, check_router
from shoal_common.config import Config, ConfigError, load_config
from shoal_common.errors import ShoalError
from shoal_common.fs import TRAVERSE_DIR, private_dir
from shoal_common.logging import configure_logging
from shoal_common.messages import HealthReply, HealthRequest, PingReply, PingRequest
from shoal_common.pages import mark_mergeable

log = structlog.get_logger("shoal.service")


@dataclass
class ServiceContext:
    """What a service's lifespan gets to build its application state."""

    info: ServiceInfo
    config: Config
    bus: Bus
    replica: str
    state_dir: Path
    run_dir: Path


Lifespan = Callable[[ServiceContext], AbstractAsyncContextManager[Any]]


@contextlib.asynccontextmanager
async def _no_state(_: ServiceContext) -> AsyncIterator[None]:
    yield None


@dataclass
class ServiceSpec:
    name: str  # as in catalog.SERVICES
    router: Router[Any]
    # Builds the object handlers see as `ctx.app` and tears it down after the last request.
    lifespan: Lifespan = field(default=_no_state)


@dataclass
class _Runtime:
    info: ServiceInfo
    replica: str
    metrics_addr: str
    started_at: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    bus: Bus | None = None


def release_free_memory() -> None:
    """Give the pages of the C heap that start-up freed back to the kernel (malloc_trim):
    glibc keeps them resident otherwise, ~0.5-1 MiB per service. Not glibc: nothing to do."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _own_dir(root: str, service: str) -> Path:
    """<root>/<service>, owner-only: what a service keeps is nobody else's to read. The
    roots themselves only let others pass (the CRI socket is 0600 in the run root)."""
    private_dir(Path(root), TRAVERSE_DIR)
    return private_dir(Path(root) / service)


def _system_router(rt: _Runtime) -> Router[Any]:
    """Commands every service answers, registered the same way as its own."""
    router: Router[Any] = Router()

    @router.command("health", queue=False, quiet=True)
    async def health(ctx: RequestContext[Any], req: HealthRequest) -> HealthReply:
        return HealthReply(
            service=rt.info.name, node=ctx.bus.node, replica=rt.replica, version=__version__,
            pid=os.getpid(), uptime_seconds=round(time.monotonic() - rt.started_mono, 3),
            started_at=rt.started_at, metrics_addr=rt.metrics_addr,
            in_flight=ctx.bus.in_flight, status="serving" if ctx.bus.serving else "stopping")

    @router.command("ping", quiet=True)
    async def ping(ctx: RequestContext[Any], req: PingRequest) -> PingReply:
        if req.delay_ms:
            await asyncio.sleep(req.delay_ms / 1000)
        return PingReply(payload=req.payload, replica=rt.replica)

    return router


def parse_args(name: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"shoal-{name}", description=f"Shoal {name} service")
    parser.add_argument("--config", help="TOML config file (default $SHOAL_CONFIG or "
                        "/etc/shoal/config.toml if present)")
    parser.add_argument("--node-id", help="overrides node_id")
    parser.add_argument("--nats-url", help="overrides nats.url")
    parser.add_argument("--state-root", help="overrides state_root")
    parser.add_argument("--run-root", help="overrides run_root")
    parser.add_argument("--metrics-addr", help="overrides services.<name>.metrics_addr")
    parser.add_argument("--replica-id", help="replica name (default <name>-<pid>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set any config key, e.g. --set log.level=debug")
    return parser.parse_args(argv)


def load_for(name: str, args: argparse.Namespace) -> Config:
    key = lookup(name).config_key
    return load_config(args.config, overrides=args.set, flags={
        "node_id": args.node_id, "nats.url": args.nats_url, "state_root": args.state_root,
        "run_root": args.run_root, f"services.{key}.metrics_addr": args.metrics_addr})


def run_service(spec: ServiceSpec, argv: list[str] | None = None) -> None:
    info = lookup(spec.name)
    args = parse_args(spec.name, argv)
    try:
        config = load_for(spec.name, args)
    except ConfigError as exc:
        print(f"shoal-{spec.name}: invalid configuration: {exc}", file=sys.stderr)
        sys.exit(2)
    replica = args.replica_id or f"{spec.name}-{os.getpid()}"
    configure_logging(config.log, service=spec.name, node=config.node_id, replica=replica)
    try:
        asyncio.run(_serve(spec, info, config, replica))
    except ShoalError as exc:
        log.error("service failed", error=str(exc))
        sys.exit(1)
    except OSError as exc:
        log.error("service failed", error=f"{exc.strerror or exc}: {exc.filename or ''}")
        sys.exit(1)


async def _serve(spec: ServiceSpec, info: ServiceInfo, config: Config, replica: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    server = metrics.MetricsServer(config.service(info.name).metrics_addr)
    metrics_addr = server.start()
    metrics.SERVICE_INFO.info({"service": info.name, "node": config.node_id,
                               "replica": replica, "version": __version__})
    metrics.SERVICE_START.set(time.time())
    svc_cfg = config.service(info.name)
    bus = Bus(config, service=info.subject, replica=replica,
              max_concurrency=svc_cfg.max_concurrency)
    rt = _Runtime(info, replica, metrics_addr, bus=bus)
    router: Router[Any] = Router()
    router.include(_system_router(rt))
    router.include(spec.router)
    check_router(CLIENTS[info.subject], router)  # served as its callers' client declares
    try:
        await bus.connect()
        await bus.ensure_events_stream()
        ctx = ServiceContext(info, config, bus, replica, _own_dir(config.state_root, info.name),
                             _own_dir(config.run_root, info.name))
        async with spec.lifespan(ctx) as app:
            await bus.serve(router, app)
            # What start-up made (modules, config, connections) lives as long as the process:
            # keep it out of the cyclic collector's full passes, which otherwise walk it all
            # again and again under load.
            gc.freeze()
            release_free_memory()
            if config.launcher.merge_pages:
                mark_mergeable()  # what start-up added (arenas made since the fork)
            log.info("serving", metrics=metrics_addr, nats=config.nats.url,
                     commands=sorted(router.commands))
            await stop.wait()
            log.info("stopping", in_flight=bus.in_flight)
            await bus.stop_serving(svc_cfg.shutdown_timeout)
        await bus.close()
        log.info("stopped")
    finally:
        server.stop()
