"""Bus edge of the supervisor: the commands it serves on shoal.v1.<node>.monitor.<verb>.

Owns: one conmon per container, exits, logs, stats.
Every replica also answers the runner's built-in `health` and `ping`."""

from __future__ import annotations

from shoal_common.bus import RequestContext, Router
from shoal_common.messages import Empty, RuntimeStatusReply, RuntimeStatusRequest
from shoal_common.messages import monitor as m
from shoal_common.messages import streams as s
from shoal_common.probe import probe_binary

from shoal_supervisor.app import SupervisorApp

router: Router[SupervisorApp] = Router()
Ctx = RequestContext[SupervisorApp]


@router.command("status")
async def status(ctx: Ctx, req: RuntimeStatusRequest) -> RuntimeStatusReply:
    """Ready when conmon can be run; the gateway folds this into CRI Status."""
    component = await probe_binary("conmon", ctx.bus.config.services.supervisor.conmon_path)
    return RuntimeStatusReply(ready=component.ok, components=[component])


@router.command("create")
async def create(ctx: Ctx, req: m.MonitorCreateRequest) -> m.TaskState:
    return await ctx.app.tasks.create(ctx.namespace, req, ctx.remaining())


@router.command("start")
async def start(ctx: Ctx, req: m.TaskIdRequest) -> m.TaskState:
    return await ctx.app.tasks.start(req.id)


@router.command("state", quiet=True)
async def state(ctx: Ctx, req: m.TaskIdRequest) -> m.TaskState:
    return await ctx.app.tasks.state(req.id)


@router.command("list", quiet=True)
async def list_tasks(ctx: Ctx, req: m.TaskListRequest) -> m.TaskListReply:
    return m.TaskListReply(tasks=await ctx.app.tasks.list_tasks(req.sandbox_id))


@router.command("kill")
async def kill(ctx: Ctx, req: m.KillRequest) -> m.TaskState:
    return await ctx.app.tasks.kill(req.id, req.signal, req.all)


@router.command("rerun")
async def rerun(ctx: Ctx, req: m.TaskIdRequest) -> m.TaskState:
    return await ctx.app.tasks.run_again(req.id)


@router.command("stop")
async def stop(ctx: Ctx, req: m.StopRequest) -> m.TaskState:
    return await ctx.app.tasks.stop(req.id, req.signal, req.timeout, ctx.remaining())


@router.command("delete")
async def delete(ctx: Ctx, req: m.TaskIdRequest) -> m.TaskState:
    return await ctx.app.tasks.delete(req.id)


@router.command("exec_sync")
async def exec_sync(ctx: Ctx, req: m.ExecSyncRequest) -> m.ExecSyncReply:
    return await ctx.app.tasks.exec_sync(req)


@router.command("exec_output", quiet=True)
async def exec_output(ctx: Ctx, req: m.ExecOutputRequest) -> m.ExecOutputChunk:
    return await ctx.app.tasks.outputs.read(req.output_id, req.stream, req.offset, req.size)


@router.command("exec_output_remove")
async def exec_output_remove(ctx: Ctx, req: m.ExecOutputIdRequest) -> Empty:
    ctx.app.tasks.outputs.remove(req.output_id)
    return Empty()


@router.command("update")
async def update(ctx: Ctx, req: m.UpdateRequest) -> m.TaskState:
    return await ctx.app.tasks.update(req.id, req.resources)


@router.command("stats", quiet=True)
async def stats(ctx: Ctx, req: m.StatsRequest) -> m.StatsReply:
    return m.StatsReply(stats=await ctx.app.tasks.stats(req.ids))


@router.command("reopen_log")
async def reopen_log(ctx: Ctx, req: m.TaskIdRequest) -> m.TaskState:
    return await ctx.app.tasks.reopen_log(req.id)


# -- interactive streams (the gateway's streaming server) ---------------------------------


@router.command("exec_create")
async def exec_create(ctx: Ctx, req: s.ExecCreateRequest) -> s.ExecSession:
    return await ctx.app.execs.create(req, ctx.remaining())


@router.command("exec_start")
async def exec_start(ctx: Ctx, req: s.ExecIdRequest) -> s.ExecStarted:
    return await ctx.app.execs.start(req, ctx.remaining())


@router.command("exec_wait")
async def exec_wait(ctx: Ctx, req: s.ExecIdRequest) -> s.ExecExit:
    return await ctx.app.execs.wait(req, ctx.remaining())


@router.command("exec_remove")
async def exec_remove(ctx: Ctx, req: s.ExecIdRequest) -> Empty:
    await ctx.app.execs.remove(req)
    return Empty()


@router.command("attach")
async def attach(ctx: Ctx, req: m.TaskIdRequest) -> s.AttachInfo:
    return await ctx.app.execs.attach(req.id)


@router.command("resize")
async def resize(ctx: Ctx, req: s.ResizeRequest) -> Empty:
    await ctx.app.execs.resize(req)
    return Empty()
