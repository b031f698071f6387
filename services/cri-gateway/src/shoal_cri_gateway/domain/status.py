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


async def _problem(bus: Bus, service: str,
                   components: dict[str, object]) -> str | None:
    """None when `service` is ready, else why not. Fills `components` for verbose Status."""
    subject = BY_NAME[service].subject
    try:
        if service in ("executor", "supervisor"):
            status = await bus.request(subject, "status", RuntimeStatusRequest(),
                                       RuntimeStatusReply, attempt_timeout=PROBE_TIMEOUT,
                                       retries=1)
            if service == "executor":
                components["handlers"] = status.handlers or ["runc"]
            for c in status.components:
                components[c.name] = {"path": c.path, "ok": c.ok, "version": c.version,
                                      "error": c.error}
            if not status.ready:
                return f"{service}: " + "; ".join(c.error for c in status.components if not c.ok)
        else:
            await bus.request(subject, "health", HealthRequest(), HealthReply,
                              attempt_timeout=PROBE_TIMEOUT, retries=1)
    except ShoalError as exc:
        return f"{service}: {exc.message}"
    return None


async def runtime_conditions(bus: Bus) -> tuple[list[Condition], dict[str, object]]:
    """RuntimeReady needs every service on the container path up, and runc and conmon
    usable; NetworkReady needs a usable CNI config (the executor's `cni` component)."""
    components: dict[str, object] = {}
    needed = ("puller", "snapshotter", "executor", "supervisor")
    problems = [p for p in await asyncio.gather(*(_problem(bus, s, components)
                                                  for s in needed)) if p]
    runtime = (Condition(RUNTIME_READY, True) if not problems else
               Condition(RUNTIME_READY, False, "ServicesUnavailable", "; ".join(problems)))
    cni = components.get("cni")
    if isinstance(cni, dict) and cni.get("ok"):
        network = Condition(NETWORK_READY, True)
    else:
        why = cni.get("error") if isinstance(cni, dict) else "the executor did not answer"
        network = Condition(NETWORK_READY, False, "NetworkPluginNotReady",
                            f"Network plugin returns error: cni config uninitialized ({why})")
    return [runtime, network], components
