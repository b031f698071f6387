"""What confines a container beyond its capabilities: masked and read-only /proc and /sys
paths, its seccomp profile; and the sysctls of the pod, which its pause container sets."""

from __future__ import annotations

from typing import Any

from shoal_executor.domain.seccomp import container_profile
from shoal_executor.domain.spec.context import SpecInput

MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def confinement(req: SpecInput) -> dict[str, Any]:
    """linux.maskedPaths, readonlyPaths (the CRI's, else ours) and seccomp: a privileged
    container gets none of them."""
    sec = req.sec
    out: dict[str, Any] = {}
    if not req.privileged:
        out["maskedPaths"] = list(sec.masked_paths if sec and sec.masked_paths
                                  else MASKED_PATHS)
        out["readonlyPaths"] = list(sec.readonly_paths if sec and sec.readonly_paths
                                    else READONLY_PATHS)
    seccomp = container_profile(sec.seccomp if sec is not None and sec.HasField("seccomp")
                                else None, sec.seccomp_profile_path if sec is not None else "",
                                req.privileged)
    if seccomp is not None:
        out["seccomp"] = seccomp
    return out


def sysctls(req: SpecInput) -> dict[str, Any]:
    """linux.sysctl: the pod's, set once in the namespaces its pause container creates."""
    config = req.pod.config
    if req.ctr.is_sandbox and config.HasField("linux") and config.linux.sysctls:
        return {"sysctl": dict(config.linux.sysctls)}
    return {}
