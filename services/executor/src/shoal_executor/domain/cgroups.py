"""What this host's cgroups can enforce, and the OCI resources trimmed to that.

runc refuses a whole container when its spec asks for a controller the host lacks
("cannot set hugetlb limit: container could not join or create cgroup"), and kubelet puts
a hugepage limit for every page size the kernel offers into every container, whether or
not the hugetlb controller is mounted. Like containerd, Shoal drops what the host cannot
enforce (logged once per kind) and refuses, with a clear message, what no host could.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Any

import structlog
from shoal_common.errors import Invalid

log = structlog.get_logger("shoal.executor.cgroups")

CGROUP_ROOT = "/sys/fs/cgroup"
_UNITS = ["B", "KB", "MB", "GB", "TB", "PB"]
# A unified key is a cgroup v2 interface file name: "<controller>.<file>", no path parts.
_UNIFIED_KEY = re.compile(r"^[a-z0-9_]+\.[a-z0-9_.]+$")


def page_size_name(size_kib: int) -> str:
    """The name kubelet and runc give a page size: 2048 KiB -> "2MB", 1048576 KiB -> "1GB"."""
    size, unit = float(size_kib) * 1024, 0
    while size >= 1024 and unit < len(_UNITS) - 1:
        size /= 1024
        unit += 1
    return f"{size:g}{_UNITS[unit]}"


@dataclass(frozen=True)
class HostCgroups:
    unified: bool  # /sys/fs/cgroup is cgroup2: runc uses its v2 manager
    controllers: frozenset[str]  # the ones runc can use on this host
    hugepage_sizes: frozenset[str]  # "2MB", "1GB", ... as the kernel offers them
    swap_accounting: bool

    @classmethod
    def detect(cls, mountinfo: str = "/proc/self/mountinfo", root: str = CGROUP_ROOT,
               hugepages: str = "/sys/kernel/mm/hugepages") -> HostCgroups:
        unified = False
        v1: set[str] = set()
        try:
            with open(mountinfo) as fh:
                lines = fh.read().splitlines()
        except OSError:
            lines = []
        for line in lines:
            # id parent maj:min root mount-point opts [optional...] - type source super-opts
            pre, _, post = line.partition(" - ")
            fields, tail = pre.split(), post.split()
            if len(fields) < 5 or len(tail) < 3:
                continue
            mount_point, fstype = fields[4], tail[0]
            if fstype == "cgroup2" and mount_point == root:
                unified = True
            elif fstype == "cgroup" and mount_point.startswith(root + "/"):
                v1.update(o for o in tail[2].split(",")
                          if o not in ("rw", "ro") and "=" not in o)
        if unified:
            try:
                with open(os.path.join(root, "cgroup.controllers")) as fh:
                    controllers = frozenset(fh.read().split())
            except OSError:
                controllers = frozenset()
            swap = os.path.exists(os.path.join(root, "memory.swap.max")) or any(
                os.path.exists(os.path.join(root, d, "memory.swap.max"))
                for d in ("kubepods", "init.scope", "system.slice"))
        else:
            controllers = frozenset(v1)
            swap = os.path.exists(os.path.join(root, "memory", "memory.memsw.limit_in_bytes"))
        sizes: set[str] = set()
        try:
            for name in os.listdir(hugepages):
                m = re.fullmatch(r"hugepages-(\d+)kB", name)
                if m:
                    sizes.add(page_size_name(int(m.group(1))))
        except OSError:
            pass
        return cls(unified, controllers, frozenset(sizes), swap)

    @property
    def version(self) -> int:
        return 2 if self.unified else 1


@functools.cache
def host_cgroups() -> HostCgroups:
    host = HostCgroups.detect()
    log.info("cgroups", version=host.version, controllers=sorted(host.controllers),
             hugepage_sizes=sorted(host.hugepage_sizes), swap_accounting=host.swap_accounting)
    return host


_warned: set[str] = set()


def _drop(kind: str, why: str, container: str) -> None:
    """Logged at warning once per kind (kubelet sends hugepage limits with every
    container), then at debug."""
    if kind not in _warned:
        _warned.add(kind)
        log.warning("resource not enforceable on this host: dropped", resource=kind,
                    reason=why, container=container)
    else:
        log.debug("resource dropped", resource=kind, reason=why, container=container)


def _lacks(host: HostCgroups, controller: str, kind: str, container: str) -> bool:
    """Whether `host` lacks `controller`; if so, `kind` is logged as dropped."""
    if controller in host.controllers:
        return False
    _drop(kind, f"no {controller} cgroup controller", container)
    return True


def _fit_hugepages(out: dict[str, Any], host: HostCgroups, container: str) -> None:
    pages = out.get("hugepageLimits") or []
    for limit in pages:
        if limit["pageSize"] not in host.hugepage_sizes:
            raise Invalid(f"hugepage limit for page size {limit['pageSize']!r}: this host's "
                          f"kernel offers {sorted(host.hugepage_sizes) or 'none'}")
    if pages and _lacks(host, "hugetlb", "hugepageLimits", container):
        out.pop("hugepageLimits")


# The cpu keys each controller enforces.
_CPU_CONTROLLERS = (("cpu", ("shares", "quota", "period")), ("cpuset", ("cpus", "mems")))


def _fit_cpu(out: dict[str, Any], host: HostCgroups, container: str) -> None:
    if "cpu" not in out:
        return
    cpu = dict(out["cpu"] or {})
    for controller, keys in _CPU_CONTROLLERS:
        if cpu.keys() & set(keys) and _lacks(host, controller, controller, container):
            for key in keys:
                cpu.pop(key, None)
    if cpu:
        out["cpu"] = cpu
    else:
        out.pop("cpu")


def _fit_memory(out: dict[str, Any], host: HostCgroups, container: str) -> None:
    memory = dict(out.get("memory") or {})
    if memory and _lacks(host, "memory", "memory", container):
        out.pop("memory")
    elif "swap" in memory and not host.swap_accounting:
        _drop("memory.swap", "no swap accounting (swapaccount=1 is off)", container)
        memory.pop("swap")
        out["memory"] = memory


def _fit_unified(out: dict[str, Any], host: HostCgroups, container: str) -> None:
    unified = out.get("unified")
    if not unified:
        return
    for key in unified:
        if not _UNIFIED_KEY.match(key):
            raise Invalid(f"unified resource {key!r} is not a cgroup v2 file name")
    if not host.unified:
        # runc's v1 manager refuses any unified entry; kubelet sends none on v1.
        _drop("unified", "cgroup v1 host", container)
        out.pop("unified")
        return
    kept = {k: v for k, v in unified.items()
            if k.split(".", 1)[0] in host.controllers or k.startswith("cgroup.")}
    if len(kept) != len(unified):
        _drop("unified", "controller not enabled", container)
    out["unified"] = kept
    if not kept:
        out.pop("unified")


# One per resource kind, each trimming `out` in place, in the order they always ran.
_FITTERS = (_fit_hugepages, _fit_cpu, _fit_memory, _fit_unified)


def fit_resources(resources: dict[str, Any], host: HostCgroups, container: str
                  ) -> dict[str, Any]:
    """`resources` (an OCI linux.resources) without what `host` cannot enforce.
    Raises Invalid for a request no host could satisfy (an unknown page size, a malformed
    unified key)."""
    out = dict(resources)
    for fit in _FITTERS:
        fit(out, host, container)
    return out
