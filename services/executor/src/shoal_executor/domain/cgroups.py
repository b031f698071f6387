"""What this host's cgroups can enforce, and the OCI resources trimmed to that.

runc refuses a whole container when its spec asks for a controller the host lacks
("cannot set hugetlb limit: container could not join or create cgroup"), and kubelet puts
a hugepage limit for every page size the kernel offers into every container, whether or
not the hugetlb controller is mounted. Like containerd, Shoal drops what the host cannot
enforce (logged once per kind) and refuses, with a clear message, what no host could.

The version is what is mounted at /sys/fs/cgroup (cgroup2: v2; a tmpfs of v1 hierarchies,
with or without a cgroup2 at /sys/fs/cgroup/unified: v1, as runc decides). The cgroup
driver (config `cgroup_driver`) decides the form of linux.cgroupsPath.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, replace
from typing import Any

import structlog
from shoal_common.errors import Invalid

from shoal_executor.config import CGROUP_DRIVERS, CGROUPFS, SYSTEMD

log = structlog.get_logger("shoal.executor.cgroups")

CGROUP_ROOT = "/sys/fs/cgroup"
# runtime.DEFAULT_CGROUP_PARENT, the parent of pods that name none (runtime imports us).
DEFAULT_PARENT = "/shoal"
DEFAULT_SLICE = "shoal.slice"  # the same with the systemd driver
SYSTEMD_PREFIX = "cri-shoal"  # runc's systemd scope prefix (containerd: cri-containerd)
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


def _read_controllers(path: str) -> frozenset[str] | None:
    """A cgroup.controllers file: the controllers available in that cgroup (v2)."""
    try:
        with open(path) as fh:
            return frozenset(fh.read().split())
    except OSError:
        return None


def _v2_swap(root: str) -> bool:
    """Whether the kernel accounts swap on v2: memory.swap.max exists in any non-root
    cgroup with the memory controller (never in the root itself); absent when the kernel
    lacks swap accounting (CONFIG_MEMCG_SWAP off or swapaccount=0)."""
    if os.path.exists(os.path.join(root, "memory.swap.max")):
        return True
    try:
        children = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return False
    return any(e.is_dir(follow_symlinks=False)
               and os.path.exists(os.path.join(e.path, "memory.swap.max")) for e in children)


def _mounts(mountinfo: str, root: str) -> tuple[bool, set[str]]:
    """(cgroup2 is mounted at `root`, the v1 controllers mounted below it), from
    /proc/self/mountinfo as runc's mountinfo-based helpers read it. A cgroup2 at
    `root`/unified (systemd's hybrid layout) is not unified mode: runc uses v1 there."""
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
        if mount_point == root:
            unified = fstype == "cgroup2"  # the last mount over the point wins
        elif fstype == "cgroup" and mount_point.startswith(root + "/"):
            v1.update(o for o in tail[2].split(",") if o not in ("rw", "ro") and "=" not in o)
    return unified, v1


@dataclass(frozen=True)
class HostCgroups:
    unified: bool  # /sys/fs/cgroup is cgroup2: runc uses its v2 manager
    controllers: frozenset[str]  # the ones runc can use on this host
    hugepage_sizes: frozenset[str]  # "2MB", "1GB", ... as the kernel offers them
    swap_accounting: bool
    root: str = ""  # where detect() found it; "" (built by hand): below() reads nothing
    driver: str = CGROUPFS  # how runc is told to manage cgroups (cgroupsPath's form)

    @classmethod
    def detect(cls, mountinfo: str = "/proc/self/mountinfo", root: str = CGROUP_ROOT,
               hugepages: str = "/sys/kernel/mm/hugepages") -> HostCgroups:
        unified, v1 = _mounts(mountinfo, root)
        if unified:
            controllers = _read_controllers(os.path.join(root, "cgroup.controllers"))
            swap = _v2_swap(root)
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
        return cls(unified, controllers or frozenset(), frozenset(sizes), swap, root)

    @property
    def version(self) -> int:
        return 2 if self.unified else 1

    def below(self, cgroups_path: str) -> HostCgroups:
        """What a container at `cgroups_path` (a cgroupfs path, "<parent>/<id>") can use.
        On v2 a cgroup gets only the controllers its parent offers: runc enables, along
        the path, what each existing ancestor's cgroup.controllers lists, so the nearest
        existing one decides (kubelet's pod cgroups may offer fewer than the root). v1
        hierarchies are per controller: the host's set stands."""
        if not self.unified or not self.root:
            return self
        parts = [p for p in cgroups_path.split("/")[:-1] if p and p not in (".", "..")]
        for depth in range(len(parts), 0, -1):
            path = os.path.join(self.root, *parts[:depth])
            if not os.path.realpath(path).startswith(os.path.realpath(self.root) + "/"):
                continue
            offered = _read_controllers(os.path.join(path, "cgroup.controllers"))
            if offered is not None:
                return replace(self, controllers=self.controllers & offered)
        return self


def systemd_cgroups_path(cgroups_path: str) -> str:
    """runc's systemd form `slice:prefix:name` of "<parent>/<id>": the pod's slice (the
    last component of its expanded parent, as containerd's getCgroupsPath takes it), the
    prefix `cri-shoal`, the id; systemd then makes `<slice path>/cri-shoal-<id>.scope`.
    The parent must be the expansion of its own last slice (what checks.pod_cgroup_parent
    makes of kubelet's slice name), so systemd puts the scope where the parent said; Shoal's
    default parent (/shoal) becomes shoal.slice."""
    parent, _, cid = cgroups_path.rpartition("/")
    if parent == DEFAULT_PARENT:
        return f"{DEFAULT_SLICE}:{SYSTEMD_PREFIX}:{cid}"
    name = parent.rpartition("/")[2]
    stem = name.removesuffix(".slice")
    parts = stem.split("-")
    expanded = "".join(f"/{'-'.join(parts[:i + 1])}.slice" for i in range(len(parts)))
    if not name.endswith(".slice") or not stem or expanded != parent:
        raise Invalid(f"cgroup parent {parent!r} is not a systemd slice: with the systemd "
                      "cgroup driver kubelet must use its systemd driver too "
                      "(cgroupDriver: systemd)")
    return f"{name}:{SYSTEMD_PREFIX}:{cid}"


def cgroups_path(cgroups_path: str, host: HostCgroups) -> str:
    """linux.cgroupsPath as runc takes it with the host's driver."""
    return systemd_cgroups_path(cgroups_path) if host.driver == SYSTEMD else cgroups_path


def cgroup_dir(cgroups_path: str, host: HostCgroups) -> str:
    """The directory, below the hierarchy's root, that the container's cgroup will have:
    what the supervisor is told (an absolute path; it reads the real one from
    /proc/<pid>/cgroup once the container runs). systemd names it `<prefix>-<id>.scope`
    in the slice."""
    if host.driver != SYSTEMD:
        return cgroups_path
    _slice, prefix, cid = systemd_cgroups_path(cgroups_path).split(":")
    parent = cgroups_path.rpartition("/")[0]
    return f"{'/' + DEFAULT_SLICE if parent == DEFAULT_PARENT else parent}/{prefix}-{cid}.scope"


# The driver chosen by the config; module state because the spec builders read the host
# through host_cgroups() and the executor's start sets it once (use_driver).
_driver = CGROUPFS


def use_driver(driver: str) -> None:
    """Set at start from the config (which refused systemd where it is not PID 1)."""
    global _driver
    if driver not in CGROUP_DRIVERS:
        raise ValueError(f"cgroup driver {driver!r} is not one of {CGROUP_DRIVERS}")
    _driver = driver
    host_cgroups.cache_clear()


@functools.cache
def host_cgroups() -> HostCgroups:
    host = replace(HostCgroups.detect(), driver=_driver)
    log.info("cgroups", version=host.version, driver=host.driver,
             controllers=sorted(host.controllers), hugepage_sizes=sorted(host.hugepage_sizes),
             swap_accounting=host.swap_accounting)
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
