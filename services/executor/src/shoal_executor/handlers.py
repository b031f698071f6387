"""Bus edge of the executor: commands on shoal.v1.<node>.tasks.<verb>.

Owns: OCI bundles, runc, pod sandboxes (namespaces, CNI), pod networks (CNI configs).
Every replica also answers the runner's built-in `health` and `ping`."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from shoal_common.bus import RequestContext, Router
from shoal_common.errors import ShoalError
from shoal_common.messages import ComponentStatus, Empty, RuntimeStatusReply, RuntimeStatusRequest
from shoal_common.messages import networks as n
from shoal_common.messages import tasks as m
from shoal_common.messages.monitor import TaskState
from shoal_common.probe import probe_binary

from shoal_executor.app import ExecutorApp
from shoal_executor.domain.features import FEATURE_COMPONENT, FEATURES, handler_features

router: Router[ExecutorApp] = Router()
Ctx = RequestContext[ExecutorApp]


class _ForObject(Protocol):
    @property
    def id(self) -> str: ...


Req = TypeVar("Req", bound=_ForObject)
Reply = TypeVar("Reply")


def _locked(handler: Callable[[Ctx, Req], Awaitable[Reply]]
            ) -> Callable[[Ctx, Req], Awaitable[Reply]]:
    """The handler run holding the lock of the sandbox or container its request names, so
    a command resent meanwhile waits for it (functools.wraps keeps the annotations the
    router reads)."""
    @functools.wraps(handler)
    async def held(ctx: Ctx, req: Req) -> Reply:
        async with ctx.app.locks.hold(req.id):
            return await handler(ctx, req)
    return held


async def _feature_components(ctx: Ctx) -> list[ComponentStatus]:
    """Each handler's features as components `feature:<handler>:<feature>` (ok = has it,
    error = why not), until RuntimeStatusReply has a field of its own for them."""
    out: list[ComponentStatus] = []
    runtimes = ctx.bus.config.runtime
    for name in runtimes.names():
        binary = runtimes.binary(name)
        where = ctx.app.runtime.s.where()
        found = await handler_features(binary, where.snapshots_dir, where.run_dir)
        out.extend(ComponentStatus(name=f"{FEATURE_COMPONENT}:{name}:{feature}", path=binary,
                                   ok=found.has(feature), error=found.why_not.get(feature, ""))
                   for feature in FEATURES)
    return out


@router.command("status")
async def status(ctx: Ctx, req: RuntimeStatusRequest) -> RuntimeStatusReply:
    """runc must run; the `cni` component says whether pod networking is usable; the
    `feature:` ones what each handler can do beyond the basics."""
    runc = await probe_binary("runc", ctx.bus.config.runtime.path)
    try:
        net = ctx.app.cni.network()
        cni = ComponentStatus(name="cni", path=net.source, ok=True, version=net.version)
    except ShoalError as exc:
        cni = ComponentStatus(name="cni", path=str(ctx.app.cni.conf_dir), ok=False,
                              error=exc.message)
    return RuntimeStatusReply(ready=runc.ok,
                              components=[runc, cni, *await _feature_components(ctx)],
                              handlers=ctx.bus.config.runtime.names())


@router.command("sandbox.create")
@_locked
async def sandbox_create(ctx: Ctx, req: m.SandboxCreateRequest) -> m.SandboxInfo:
    return await ctx.app.runtime.create_sandbox(req.id, req.config, req.pause_image_config,
                                                req.rootfs, ctx.namespace, req.runtime_handler)


@router.command("sandbox.status")
async def sandbox_status(ctx: Ctx, req: m.SandboxIdRequest) -> m.SandboxInfo:
    return await ctx.app.runtime.sandbox_status(req.id)


@router.command("sandbox.stop")
@_locked
async def sandbox_stop(ctx: Ctx, req: m.SandboxIdRequest) -> m.SandboxInfo:
    return await ctx.app.runtime.stop_sandbox(req.id, ctx.namespace)


@router.command("sandbox.remove")
@_locked
async def sandbox_remove(ctx: Ctx, req: m.SandboxIdRequest) -> Empty:
    await ctx.app.runtime.remove_sandbox(req.id, ctx.namespace)
    return Empty()


@router.command("sandbox.connect")
@_locked
async def sandbox_connect(ctx: Ctx, req: n.SandboxNetworkRequest) -> n.NetworkAttachment:
    return await ctx.app.runtime.net.connect(req.id, req.network)


@router.command("sandbox.disconnect")
@_locked
async def sandbox_disconnect(ctx: Ctx, req: n.SandboxNetworkRequest) -> Empty:
    await ctx.app.runtime.net.disconnect(req.id, req.network)
    return Empty()


@router.command("container.create")
@_locked
async def container_create(ctx: Ctx, req: m.ContainerCreateRequest) -> m.ContainerCreateReply:
    return await ctx.app.runtime.create_container(req.id, req.sandbox_id, req.config,
                                                  req.sandbox_config, req.image_config,
                                                  req.rootfs, ctx.namespace,
                                                  req.runtime_handler)


@router.command("container.start")
@_locked
async def container_start(ctx: Ctx, req: m.ContainerIdRequest) -> TaskState:
    return await ctx.app.runtime.start_container(req.id, ctx.namespace)


@router.command("container.stop")
@_locked
async def container_stop(ctx: Ctx, req: m.ContainerStopRequest) -> TaskState:
    return await ctx.app.runtime.stop_container(req.id, req.timeout, ctx.namespace)


@router.command("container.remove")
@_locked
async def container_remove(ctx: Ctx, req: m.ContainerIdRequest) -> Empty:
    await ctx.app.runtime.remove_container(req.id, ctx.namespace)
    return Empty()


@router.command("network.create")
async def network_create(ctx: Ctx, req: n.NetworkCreateRequest) -> n.NetworkInfo:
    return await ctx.app.networks.create(req)


@router.command("network.list")
async def network_list(ctx: Ctx, req: n.NetworkListRequest) -> n.NetworkList:
    return n.NetworkList(networks=await ctx.app.networks.list())


@router.command("network.get")
async def network_get(ctx: Ctx, req: n.NetworkNameRequest) -> n.NetworkInfo:
    return await ctx.app.networks.get(req)


@router.command("network.remove")
async def network_remove(ctx: Ctx, req: n.NetworkNameRequest) -> Empty:
    await ctx.app.networks.remove(req)
    return Empty()
