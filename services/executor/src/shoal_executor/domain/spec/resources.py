"""The container's cgroup limits (linux.resources) from the CRI's, trimmed to what this
host's cgroups can enforce."""

from __future__ import annotations

from typing import Any

from cri_api.v1 import api_pb2 as cri

from shoal_executor.domain.cgroups import HostCgroups, fit_resources
from shoal_executor.domain.spec.context import SpecInput

# OCI linux.resources.cpu key <- CRI field; unset (zero or empty) fields stay out.
_CPU_FIELDS = (("shares", "cpu_shares"), ("quota", "cpu_quota"), ("period", "cpu_period"),
               ("cpus", "cpuset_cpus"), ("mems", "cpuset_mems"))


def _memory(res: cri.LinuxContainerResources, host: HostCgroups) -> dict[str, int]:
    out = {"limit": res.memory_limit_in_bytes}
    if res.memory_swap_limit_in_bytes:
        out["swap"] = res.memory_swap_limit_in_bytes
    elif host.swap_accounting:
        # No swap beyond the limit: exceeding it OOM-kills, as kubelet expects.
        out["swap"] = res.memory_limit_in_bytes
    return out


def resources(req: SpecInput, device_rules: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"devices": device_rules}
    res = req.res
    if res is None:
        return out
    cpu = {key: getattr(res, name) for key, name in _CPU_FIELDS if getattr(res, name)}
    if cpu:
        out["cpu"] = cpu
    if res.memory_limit_in_bytes:
        out["memory"] = _memory(res, req.host)
    if res.hugepage_limits:
        out["hugepageLimits"] = [{"pageSize": h.page_size, "limit": h.limit}
                                 for h in res.hugepage_limits]
    if res.unified:
        out["unified"] = dict(res.unified)
    return fit_resources(out, req.host, req.ctr.container_id)
