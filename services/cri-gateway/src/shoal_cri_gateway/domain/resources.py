"""A container's current resources as ContainerStatus reports them (containerd 1.6+ fills
`status.resources` from the container's OCI spec, updated by UpdateContainerResources).

The base is the OCI spec the executor wrote (the limits runc applied at create, the OOM
score after the executor's clamp, the swap it paired with the memory limit), or the CRI
config when the spec cannot be read. On top come the fields successful updates changed,
kept in the gateway's metadata (the supervisor applies them with `runtime update`, which
leaves the spec as created)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from cri_api.v1 import api_pb2 as cri
from shoal_common.config import Config

# What an UpdateContainerResources applies (the supervisor's `Resources`); 0/"" keeps the
# current value, as in containerd's WithResources. Other fields of the request (hugepages,
# unified, swap, oom_score_adj) are not applied, so they are not recorded either.
UPDATED_FIELDS = ("cpu_period", "cpu_quota", "cpu_shares", "cpuset_cpus", "cpuset_mems",
                  "memory_limit_in_bytes")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup2_mounted(root: Path = CGROUP_ROOT, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether cgroup2 is what is mounted at `root` (the last mount over it), as runc
    tells v2 from v1; a cgroup2 at `root`/unified (systemd's hybrid layout) is v1."""
    try:
        with open(mountinfo) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return False
    unified = False
    for line in lines:
        pre, _, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if len(fields) >= 5 and tail and fields[4] == str(root):
            unified = tail[0] == "cgroup2"
    return unified


def swap_accounting(root: Path = CGROUP_ROOT, unified: bool | None = None) -> bool:
    """Whether the kernel accounts swap in memory cgroups. v1: the memory hierarchy has
    memory.memsw.*; v2: memory.swap.max, which only non-root cgroups have, so any
    first-level cgroup with it answers."""
    if not (cgroup2_mounted(root) if unified is None else unified):
        return (root / "memory" / "memory.memsw.limit_in_bytes").exists()
    try:
        children = list(os.scandir(root))
    except OSError:
        return False
    return any(e.is_dir(follow_symlinks=False) and os.path.exists(
        os.path.join(e.path, "memory.swap.max")) for e in children)


# The executor pairs swap with the memory limit where the kernel accounts swap, and the
# supervisor moves it with the limit on update: the status follows the same rule.
SWAP_ACCOUNTING = swap_accounting()


def cgroup_driver(config: Config) -> cri.CgroupDriver.ValueType:
    """The CRI CgroupDriver Shoal's containers use. The executor's config decides it and
    refuses systemd at start where systemd is not PID 1; a shared `[runtime]
    cgroup_driver`, once there, wins (read defensively until then)."""
    name = getattr(config.runtime, "cgroup_driver", None) or getattr(
        config.service("executor"), "cgroup_driver", "cgroupfs")
    return cri.SYSTEMD if name == "systemd" else cri.CGROUPFS


def from_config(config: cri.ContainerConfig) -> cri.LinuxContainerResources:
    res = cri.LinuxContainerResources()
    if config.HasField("linux") and config.linux.HasField("resources"):
        res.CopyFrom(config.linux.resources)
    return res


def from_spec(spec: dict[str, Any]) -> cri.LinuxContainerResources:
    """The resources of an OCI spec, field by field as containerd's copyResourcesToStatus."""
    res = cri.LinuxContainerResources(
        oom_score_adj=int((spec.get("process") or {}).get("oomScoreAdj") or 0))
    linux = (spec.get("linux") or {}).get("resources") or {}
    cpu = linux.get("cpu") or {}
    res.cpu_period = int(cpu.get("period") or 0)
    res.cpu_quota = int(cpu.get("quota") or 0)
    res.cpu_shares = int(cpu.get("shares") or 0)
    res.cpuset_cpus = str(cpu.get("cpus") or "")
    res.cpuset_mems = str(cpu.get("mems") or "")
    memory = linux.get("memory") or {}
    res.memory_limit_in_bytes = int(memory.get("limit") or 0)
    res.memory_swap_limit_in_bytes = int(memory.get("swap") or 0)
    for limit in linux.get("hugepageLimits") or []:
        res.hugepage_limits.append(cri.HugepageLimit(page_size=str(limit.get("pageSize", "")),
                                                     limit=int(limit.get("limit") or 0)))
    res.unified.update({str(k): str(v) for k, v in (linux.get("unified") or {}).items()})
    return res


def _read_spec(bundle: str) -> dict[str, Any] | None:
    try:
        spec = json.loads((Path(bundle) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # removed meanwhile, or not ours to read: the CRI config stands in
    return spec if isinstance(spec, dict) else None


async def base(config: bytes, bundle: str) -> cri.LinuxContainerResources:
    """The resources the container was created with."""
    spec = await asyncio.to_thread(_read_spec, bundle) if bundle else None
    if spec is not None:
        return from_spec(spec)
    parsed = cri.ContainerConfig()
    parsed.ParseFromString(config)
    return from_config(parsed)


def record_update(stored: bytes | None, request: cri.LinuxContainerResources) -> bytes | None:
    """The updated fields so far (`stored`, serialized) with `request`'s applied on top, or
    None when the request changes nothing Shoal applies."""
    changed = cri.LinuxContainerResources()
    if stored:
        changed.ParseFromString(stored)
    before = changed.SerializeToString(deterministic=True)
    for name in UPDATED_FIELDS:
        if value := getattr(request, name):
            setattr(changed, name, value)
    after = changed.SerializeToString(deterministic=True)
    return after if after != before else None


def current(created: cri.LinuxContainerResources, updated: bytes | None) -> cri.ContainerResources:
    """What ContainerStatus reports: `created` with the recorded updates applied."""
    res = cri.LinuxContainerResources()
    res.CopyFrom(created)
    if updated:
        changed = cri.LinuxContainerResources()
        changed.ParseFromString(updated)
        for name in UPDATED_FIELDS:
            if value := getattr(changed, name):
                setattr(res, name, value)
        limit = changed.memory_limit_in_bytes
        if limit and (SWAP_ACCOUNTING or (created.memory_swap_limit_in_bytes
                                          == created.memory_limit_in_bytes != 0)):
            res.memory_swap_limit_in_bytes = limit
    return cri.ContainerResources(linux=res)
