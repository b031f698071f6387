"""The fields of a container create body, checked: each read with its type and size, a bad
one a 400 naming it. Settings Shoal cannot honour are refused (501) rather than ignored,
except where the CLI sends a zero value by default."""

from __future__ import annotations

import re
from typing import Any

from shoal_docker_gateway.errors import BadParameter, Unsupported

NAME_RE = re.compile(r"\A/?[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}\Z")
MAX_ITEMS = 1024
MAX_TEXT = 64 * 1024
RESTART_POLICIES = ("", "no", "always", "on-failure", "unless-stopped")


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BadParameter(f"Invalid container name ({str(name)[:200]}), only "
                           "[a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")
    return name.removeprefix("/")


def text(d: dict[str, Any], key: str, where: str = "") -> str:
    value = d.get(key)
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise BadParameter(f"invalid {where}{key}: expected a string")
    return value


def str_list(d: dict[str, Any], key: str, where: str = "") -> list[str] | None:
    """A list of strings (None when absent or null; a lone string is a one-item list, as
    Docker's strslice reads it)."""
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or len(value) > MAX_ITEMS
            or not all(isinstance(v, str) and len(v) <= MAX_TEXT for v in value)):
        raise BadParameter(f"invalid {where}{key}: expected a list of strings")
    return list(value)


def str_map(d: dict[str, Any], key: str, where: str = "") -> dict[str, str]:
    value = d.get(key)
    if value is None:
        return {}
    if (not isinstance(value, dict) or len(value) > MAX_ITEMS
            or not all(isinstance(k, str) and isinstance(v, str) and len(k) + len(v) <= MAX_TEXT
                       for k, v in value.items())):
        raise BadParameter(f"invalid {where}{key}: expected an object of strings")
    return dict(value)


def integer(d: dict[str, Any], key: str, where: str = "", low: int = 0,
            high: int = 2 ** 63 - 1) -> int:
    value = d.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadParameter(f"invalid {where}{key}: expected an integer in {low}..{high}")
    return value


def flag(d: dict[str, Any], key: str, where: str = "") -> bool:
    value = d.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadParameter(f"invalid {where}{key}: expected a boolean")
    return value


def obj(d: dict[str, Any], key: str, where: str = "") -> dict[str, Any]:
    value = d.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadParameter(f"invalid {where}{key}: expected an object")
    return value


def objects(d: dict[str, Any], key: str, where: str = "") -> list[dict[str, Any]]:
    value = d.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_ITEMS or \
            not all(isinstance(v, dict) for v in value):
        raise BadParameter(f"invalid {where}{key}: expected a list of objects")
    return value


def restart_policy(hc: dict[str, Any]) -> tuple[str, int]:
    """HostConfig.RestartPolicy as (name, maximum retries)."""
    rp = obj(hc, "RestartPolicy", "HostConfig.")
    name = text(rp, "Name", "HostConfig.RestartPolicy.")
    if name not in RESTART_POLICIES:
        raise BadParameter(f"invalid restart policy '{name}'")
    retries = integer(rp, "MaximumRetryCount", "HostConfig.RestartPolicy.", high=1_000_000)
    if retries and name != "on-failure":
        raise BadParameter(f"maximum retry count cannot be used with restart policy '{name}'")
    if name not in ("", "no") and flag(hc, "AutoRemove"):
        raise BadParameter("conflicting options: can't create 'AutoRemove' container with "
                           "restart policy")
    return name or "no", retries


# HostConfig fields Shoal cannot honour, refused when set to anything but their zero value
# (the CLI sends most of them, empty).
_REFUSED = ("VolumesFrom", "Devices", "DeviceRequests", "DeviceCgroupRules", "Ulimits",
            "Tmpfs", "Links", "BlkioWeightDevice", "BlkioDeviceReadBps", "BlkioDeviceWriteBps",
            "BlkioDeviceReadIOps", "BlkioDeviceWriteIOps", "BlkioWeight", "PidsLimit",
            "CpuRealtimePeriod", "CpuRealtimeRuntime", "KernelMemory", "MemoryReservation",
            "CgroupParent", "Runtime", "Init", "VolumeDriver", "StorageOpt", "DnsOptions")
_NAMESPACE_MODES = ("PidMode", "IpcMode", "UTSMode", "UsernsMode", "CgroupnsMode")


def refuse_unsupported(hc: dict[str, Any]) -> None:
    for key in _REFUSED:
        value = hc.get(key)
        if value not in (None, "", 0, [], {}, False):
            raise Unsupported(f"HostConfig.{key} is not supported by Shoal")
    for key in _NAMESPACE_MODES:
        value = hc.get(key)
        if value not in (None, "", "private", "host") or (value == "host" and key not in (
                "PidMode", "IpcMode")):
            raise Unsupported(f"HostConfig.{key}={value!r} is not supported by Shoal")
    log = obj(hc, "LogConfig", "HostConfig.")
    if text(log, "Type", "HostConfig.LogConfig.") not in ("", "json-file", "local"):
        raise Unsupported("HostConfig.LogConfig.Type: Shoal keeps logs itself (json-file)")
    for opt in str_list(hc, "SecurityOpt", "HostConfig.") or []:
        if opt not in ("no-new-privileges", "no-new-privileges:true", "no-new-privileges=true",
                       "seccomp=unconfined", "seccomp:unconfined", "apparmor=unconfined",
                       "apparmor:unconfined", "label=disable", "label:disable"):
            raise Unsupported(f"HostConfig.SecurityOpt {opt!r} is not supported by Shoal")
