"""Runtime conditions for CRI Status, asked of the services on the container path."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from shoal_common.bus import Bus
from shoal_common.catalog import BY_NAME
from shoal_common.errors import ShoalError
from shoal_common.messages import (
    HealthReply,
    HealthRequest,
    RuntimeStatusReply,
    RuntimeStatusRequest,
)

RUNTIME_READY = "RuntimeReady"
NETWORK_READY = "NetworkReady"
PROBE_TIMEOUT = 2.0


@dataclass
class Condition:
    type: str
    status: bool
    reason: str = ""
    message: str = ""


async def _problem(bus: Bus, service: str) -> str | None:
    """None when `service` is ready, else why not."""
    subject = BY_NAME[service].subject
    try:
        if service in ("executor", "supervisor"):
            status = await bus.request(subject, "status", RuntimeStatusRequest(),
                                       RuntimeStatusReply, attempt_timeout=PROBE_TIMEOUT,
                                       retries=1)
            if not status.ready:
                return f"{service}: " + "; ".join(c.error for c in status.components if not c.ok)
        else:
            await bus.request(subject, "health", HealthRequest(), HealthReply,
                              attempt_timeout=PROBE_TIMEOUT, retries=1)
    except ShoalError as exc:
        return f"{service}: {exc.message}"
    return None


async def runtime_conditions(bus: Bus) -> list[Condition]:
    """RuntimeReady needs every service on the container path up, and runc and conmon usable."""
    needed = ("puller", "snapshotter", "executor", "supervisor")
    problems = [p for p in await asyncio.gather(*(_problem(bus, s) for s in needed)) if p]
    runtime = (Condition(RUNTIME_READY, True) if not problems else
               Condition(RUNTIME_READY, False, "ServicesUnavailable", "; ".join(problems)))
    # Pod networking (CNI) is not built yet; say so rather than claim readiness.
    network = Condition(NETWORK_READY, False, "NetworkPluginNotReady",
                        "CNI networking is not implemented in this version of Shoal")
    return [runtime, network]
