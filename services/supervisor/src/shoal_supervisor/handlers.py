"""Bus edge of the supervisor: the commands it serves on shoal.v1.<node>.monitor.<verb>.

Owns: one conmon per container, exits, logs, stats.
Every replica also answers the runner's built-in `health` and `ping`."""

from __future__ import annotations

from typing import Any

from shoal_common.bus import RequestContext, Router
from shoal_common.messages import RuntimeStatusReply, RuntimeStatusRequest
from shoal_common.probe import probe_binary

router: Router[Any] = Router()


@router.command("status")
async def status(ctx: RequestContext[Any], req: RuntimeStatusRequest) -> RuntimeStatusReply:
    """Ready when conmon can be run; the gateway folds this into CRI Status."""
    component = await probe_binary("conmon", ctx.bus.config.services.supervisor.conmon_path)
    return RuntimeStatusReply(ready=component.ok, components=[component])
