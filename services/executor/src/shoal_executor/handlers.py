"""Bus edge of the executor: the commands it serves on shoal.v1.<node>.tasks.<verb>.

Owns: OCI bundles, runc, pod sandboxes.
Every replica also answers the runner's built-in `health` and `ping`."""

from __future__ import annotations

from typing import Any

from shoal_common.bus import RequestContext, Router
from shoal_common.messages import RuntimeStatusReply, RuntimeStatusRequest
from shoal_common.probe import probe_binary

router: Router[Any] = Router()


@router.command("status")
async def status(ctx: RequestContext[Any], req: RuntimeStatusRequest) -> RuntimeStatusReply:
    """Ready when runc can be run; the gateway folds this into CRI Status."""
    component = await probe_binary("runc", ctx.bus.config.services.executor.runtime_path)
    return RuntimeStatusReply(ready=component.ok, components=[component])
