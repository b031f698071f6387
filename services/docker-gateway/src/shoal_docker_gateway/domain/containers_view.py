"""How Docker shows containers: `docker ps` rows and `docker inspect` documents, from the
record (what the client asked for) and the CRI (what is running now)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from shoal_common.errors import ShoalError
from shoal_common.messages.monitor import TaskIdRequest

from shoal_docker_gateway.domain import networks, paths
from shoal_docker_gateway.domain.backend import Backend
from shoal_docker_gateway.domain.containers import Observed, observe
from shoal_docker_gateway.domain.containers_body import restart_policy
from shoal_docker_gateway.domain.images import rfc3339
from shoal_docker_gateway.errors import BadParameter
from shoal_docker_gateway.store.containers import ContainerRecord, Containers

FILTERS = ("id", "name", "label", "status", "ancestor", "exited")


def human_duration(seconds: float) -> str:
    """Docker's (go-units HumanDuration)."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(s / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    return f"{hours // (24 * 7)} weeks"


def status_text(seen: Observed) -> str:
    now = time.time()
    if seen.status == "running":
        return f"Up {human_duration(now - seen.started_at)}"
    if seen.status in ("exited", "restarting") and seen.finished_at:
        return (f"{seen.status.capitalize()} ({seen.exit_code}) "
                f"{human_duration(now - seen.finished_at)} ago")
    return seen.status.capitalize()


def _command(rec: ContainerRecord) -> str:
    merged = rec.config.get("Shoal", {})
    return " ".join([merged.get("Path", ""), *merged.get("Args", [])]).strip()


def _ports(rec: ContainerRecord) -> list[dict[str, Any]]:
    out = []
    for key, binds in rec.config.get("Shoal", {}).get("Ports", {}).items():
        port, _, proto = key.partition("/")
        for b in binds or [{}]:
            row: dict[str, Any] = {"PrivatePort": int(port), "Type": proto}
            if b.get("HostPort"):
                row.update(IP=b.get("HostIp", "0.0.0.0"), PublicPort=int(b["HostPort"]))
            out.append(row)
    return out


def _matches(rec: ContainerRecord, seen: Observed, filters: dict[str, Any]) -> bool:
    for key, raw in filters.items():
        if key not in FILTERS:
            raise BadParameter(f"invalid filter '{key}'")
        wanted = list(raw) if isinstance(raw, (list, dict)) else [raw]
        if not wanted:
            continue
        if key == "id" and not any(rec.id.startswith(w) for w in wanted):
            return False
        if key == "name" and not any(w.lstrip("/") in rec.name for w in wanted):
            return False
        if key == "status" and seen.status not in wanted:
            return False
        if key == "ancestor" and not any(w in (rec.image, rec.image_id) for w in wanted):
            return False
        if key == "exited" and (seen.status != "exited" or str(seen.exit_code) not in wanted):
            return False
        if key == "label":
            for w in wanted:
                k, sep, v = str(w).partition("=")
                labels = _user_labels(rec)
                if k not in labels or (sep and labels[k] != v):
                    return False
    return True


async def listing(backend: Backend, all_: bool, filters: dict[str, Any]
                  ) -> list[dict[str, Any]]:
    rows = []
    for rec in await Containers(backend.records).all():
        if rec.state in ("creating", "removing"):
            continue
        seen = await observe(backend, rec)
        if seen.status == "exited" and restart_policy(rec.host_config)[0] != "no" and \
                (await _restarts(backend, rec))[1]:
            seen = dataclasses.replace(seen, status="restarting")  # between two runs
        if (not all_ and seen.status not in ("running", "restarting")) or \
                not _matches(rec, seen, filters):
            continue
        rows.append({
            "Id": rec.id, "Names": [f"/{rec.name}"], "Image": rec.image,
            "ImageID": rec.image_id, "Command": _command(rec), "Created": int(rec.created),
            "Ports": _ports(rec), "Labels": _user_labels(rec), "State": seen.status,
            "Status": status_text(seen),
            "HostConfig": {"NetworkMode": rec.config.get("Shoal", {}).get("NetworkMode",
                                                                          "default")},
            "NetworkSettings": {"Networks": {}},
            "Mounts": rec.config.get("Shoal", {}).get("Mounts", [])})
    return rows


def _user_labels(rec: ContainerRecord) -> dict[str, str]:
    labels = rec.config.get("Labels")
    return dict(labels) if isinstance(labels, dict) else {}


def _time(seconds: float) -> str:
    return rfc3339(seconds) if seconds else "0001-01-01T00:00:00Z"


async def _restarts(backend: Backend, rec: ContainerRecord) -> tuple[int, bool]:
    """Runs the supervisor made under the restart policy, and whether one is waiting."""
    if not rec.cri_id:
        return 0, False
    try:
        task = await backend.clients.monitor.state(TaskIdRequest(id=rec.cri_id))
    except ShoalError:  # gone, or the supervisor away: what the gateway knows
        return 0, False
    return task.restart_count, task.restarting


async def inspect(backend: Backend, rec: ContainerRecord) -> dict[str, Any]:
    seen = await observe(backend, rec)
    restarts, restarting = await _restarts(backend, rec)
    merged = rec.config.get("Shoal", {})
    config = {k: v for k, v in rec.config.items() if k not in ("Shoal", "HostConfig",
                                                                 "NetworkingConfig")}
    config.update(Env=merged.get("Env", []), WorkingDir=merged.get("WorkingDir", ""),
                  User=merged.get("User", ""), Hostname=merged.get("Hostname", ""),
                  Labels=_user_labels(rec), Image=rec.image)
    config.setdefault("Cmd", merged.get("ImageCmd"))
    config.setdefault("Entrypoint", merged.get("ImageEntrypoint"))
    return {
        "Id": rec.id, "Created": _time(rec.created), "Path": merged.get("Path", ""),
        "Args": merged.get("Args", []),
        "State": {"Status": "restarting" if restarting else seen.status,
                  "Running": seen.status == "running", "Paused": False,
                  "Restarting": restarting, "OOMKilled": False,
                  "Dead": seen.status == "dead", "Pid": seen.pid, "ExitCode": seen.exit_code,
                  "Error": "", "StartedAt": _time(seen.started_at),
                  "FinishedAt": _time(seen.finished_at)},
        "Image": rec.image_id, "Name": f"/{rec.name}", "RestartCount": rec.restart_count + restarts,
        "LogPath": str(paths.log_path(backend, rec.id)), "Driver": "overlayfs",
        "Platform": "linux", "MountLabel": "", "ProcessLabel": "", "AppArmorProfile": "",
        # LogConfig: the CRI log file; the SDK's containers.run reads its Type.
        "HostConfig": {"LogConfig": {"Type": "json-file", "Config": {}}, **rec.host_config},
        "Mounts": merged.get("Mounts", []),
        "Config": config,
        "NetworkSettings": await networks.settings(backend, rec),
    }
