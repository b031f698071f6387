"""Bus edge of the snapshotter: commands on shoal.v1.<node>.snapshots.<verb>.

Owns: snapshots (metadata and files) and layer unpack.
Every replica also answers the runner's built-in `health` and `ping`."""

from __future__ import annotations

import asyncio

from shoal_common.bus import RequestContext, Router
from shoal_common.errors import Internal
from shoal_common.messages import Empty
from shoal_common.messages import snapshots as m
from shoal_common.tracing import deadline_var

from shoal_snapshotter.app import SnapshotterApp
from shoal_snapshotter.domain.content import BusContent

router: Router[SnapshotterApp] = Router()
Ctx = RequestContext[SnapshotterApp]


@router.command("prepare")
async def prepare(ctx: Ctx, req: m.PrepareRequest) -> m.MountsReply:
    return m.MountsReply(mounts=await ctx.app.snapshots.prepare(req.key, req.parent, req.labels))


@router.command("view")
async def view(ctx: Ctx, req: m.ViewRequest) -> m.MountsReply:
    return m.MountsReply(mounts=await ctx.app.snapshots.view(req.key, req.parent, req.labels))


@router.command("commit")
async def commit(ctx: Ctx, req: m.CommitRequest) -> m.SnapshotInfo:
    return await ctx.app.snapshots.commit(req.name, req.key, req.labels)


@router.command("remove")
async def remove(ctx: Ctx, req: m.SnapshotKeyRequest) -> Empty:
    await ctx.app.snapshots.remove(req.key, ctx.namespace)
    return Empty()


@router.command("mounts")
async def mounts(ctx: Ctx, req: m.SnapshotKeyRequest) -> m.MountsReply:
    return m.MountsReply(mounts=await ctx.app.snapshots.mounts(req.key))


@router.command("stat")
async def stat(ctx: Ctx, req: m.SnapshotKeyRequest) -> m.SnapshotInfo:
    return await ctx.app.snapshots.stat(req.key)


@router.command("usage")
async def usage(ctx: Ctx, req: m.SnapshotKeyRequest) -> m.SnapshotUsage:
    return await ctx.app.snapshots.usage(req.key)


@router.command("list")
async def list_snapshots(ctx: Ctx, req: m.SnapshotListRequest) -> m.SnapshotListReply:
    snapshots = await ctx.app.snapshots.list_snapshots(req.parent, req.kind)
    return m.SnapshotListReply(snapshots=snapshots)


@router.command("unpack")
async def unpack(ctx: Ctx, req: m.UnpackRequest) -> m.UnpackReply:
    async def work() -> m.UnpackReply:
        # Runs on past the caller's deadline (this task's own context): a retry of the same
        # unpack then finds the layers committed instead of starting over.
        deadline_var.set(None)
        reply = await ctx.app.images.unpack(ctx.namespace, req.image, req.layers,
                                            BusContent(ctx.bus, ctx.namespace))
        if reply is None:  # only events can be stale
            raise Internal("unpack request treated as a stale event")
        return reply

    task = ctx.app.spawn(work())
    return await asyncio.shield(task)


@router.command("fsusage")
async def fsusage(ctx: Ctx, req: m.FsUsageRequest) -> m.FsUsageReply:
    return await ctx.app.fs_usage.get()
