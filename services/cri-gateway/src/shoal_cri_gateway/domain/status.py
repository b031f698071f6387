"""CRI Status: runtime conditions asked of the services on the container path, and the
verbose info (effective config with secrets removed, component versions)."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.client import ServerVersion
from shoal_common import __version__
from shoal_common.bus import Bus
from shoal_common.clients import CLIENTS
from shoal_common.clients.monitor import MonitorClient
from shoal_common.clients.tasks import TasksClient
from shoal_common.errors import ShoalError
from shoal_common.messages import HealthRequest, RuntimeStatusRequest

RUNTIME_READY = "RuntimeReady"
# The executor reports each runtime handler's features as components
# `feature:<handler>:<feature>` (ok = supported), until RuntimeStatusReply has a field.
FEATURE_COMPONENT = "feature"
RRO = "recursive_read_only"
USERNS = "user_namespaces"
NETWORK_READY = "NetworkReady"
# On the container path; executor and supervisor also report runc/conmon/CNI readiness.
NEEDED = {"puller": "images", "snapshotter": "snapshots", "executor": "tasks",
          "supervisor": "monitor"}


@dataclass
class Condition:
    type: str
    status: bool
    reason: str = ""
    message: str = ""


async def _problem(bus: Bus, service: str, components: dict[str, object]) -> str | None:
    """None when `service` is ready, else why not. Fills `components` for verbose Status."""
    client = CLIENTS[NEEDED[service]](bus)
    try:
        if isinstance(client, TasksClient | MonitorClient):
            status = await client.status(RuntimeStatusRequest())
            if service == "executor":
                components["handlers"] = status.handlers or ["runc"]
            for c in status.components:
                components[c.name] = {"path": c.path, "ok": c.ok, "version": c.version,
                                      "error": c.error}
            if not status.ready:
                return f"{service}: " + "; ".join(
                    c.error for c in status.components
                    if not c.ok and not c.name.startswith(f"{FEATURE_COMPONENT}:"))
        else:
            await client.health(HealthRequest())
    except ShoalError as exc:
        return f"{service}: {exc.message}"
    return None


async def runtime_conditions(bus: Bus) -> tuple[list[Condition], dict[str, object]]:
    """RuntimeReady needs every service on the container path up, and runc and conmon
    usable; NetworkReady needs a usable CNI config (the executor's `cni` component)."""
    components: dict[str, object] = {}
    problems = [p for p in await asyncio.gather(*(_problem(bus, s, components)
                                                  for s in NEEDED)) if p]
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


@dataclass
class Handler:
    """A runtime handler as CRI Status lists it."""

    name: str
    recursive_read_only: bool = False
    user_namespaces: bool = False


def _has(components: dict[str, object], handler: str, feature: str) -> bool:
    entry = components.get(f"{FEATURE_COMPONENT}:{handler}:{feature}")
    return isinstance(entry, dict) and bool(entry.get("ok"))


def runtime_handlers(components: dict[str, object]) -> list[Handler]:
    """The executor's handlers with their features, led by "" (the default, which is
    runc), as containerd 2 lists them: critest and kubelet look the default up by ""."""
    names = components.get("handlers")
    handlers = [str(n) for n in names] if isinstance(names, list) else ["runc"]
    return [Handler(name, _has(components, name or "runc", RRO),
                    _has(components, name or "runc", USERNS))
            for name in ["", *handlers]]


def nats_server_version(version: ServerVersion) -> str:
    """The version the NATS server reports ("2.10.7"), or "" when unknown: str() of
    nats-py's ServerVersion is its repr ("<nats server v2.10.7>"), and it reads
    "0.0.0-unknown" while disconnected."""
    try:
        text = f"{version.major}.{version.minor}.{version.patch}"
        pre, build = version.prerelease, version.build
    except (AttributeError, TypeError, ValueError):
        return ""
    text += (f"-{pre}" if pre else "") + (f"+{build}" if build else "")
    return "" if text == "0.0.0-unknown" else text


def _version_of(components: dict[str, object], name: str) -> str:
    entry = components.get(name)
    return str(entry.get("version", "")) if isinstance(entry, dict) else ""


# Keys whose values are secrets, or say where one lives: never shown (registry passwords,
# NATS credentials, TLS keys).
SECRET_KEYS = re.compile(r"password|passwd|secret|token|(^|_)key$|credential", re.I)
REDACTED = "<redacted>"


def redact(tree: Any) -> Any:
    """`tree` with every secret-looking key's value replaced (non-empty ones only, so an
    operator can still see that none is set)."""
    if isinstance(tree, dict):
        return {k: (REDACTED if SECRET_KEYS.search(str(k)) and v not in ("", None, [], {})
                    else redact(v)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    return tree


def verbose_info(bus: Bus, components: dict[str, object]) -> dict[str, str]:
    config = redact(msgspec.to_builtins(bus.config))
    return {
        "config": json.dumps(config),
        "components": json.dumps(components),
        "version": json.dumps({
            "shoal": __version__,
            "nats_server": nats_server_version(bus.nc.connected_server_version),
            "runc": _version_of(components, "runc"),
            "conmon": _version_of(components, "conmon"),
            "cni": _version_of(components, "cni")}),
    }
