"""The executor's settings: `[services.executor]` (registered in pyproject.toml under the
entry-point group `shoal.config`). The OCI runtimes are the shared `[runtime]` section."""

from __future__ import annotations

import os

import msgspec
from shoal_common.config import ConfigError, ServiceConfig

# Declared here, not in the checks, so that loading the config (every Shoal process does)
# imports nothing else of the executor.
POD_CGROUP_ROOTS = ("/kubepods", "/kubepods.slice", "/shoal")
CGROUPFS, SYSTEMD = "cgroupfs", "systemd"
CGROUP_DRIVERS = (CGROUPFS, SYSTEMD)
# runc's test for `--systemd-cgroup` (libcontainer/cgroups/systemd IsRunningSystemd), as
# sd_booted(3): systemd creates this directory only when it runs as PID 1.
SYSTEMD_RUN_DIR = "/run/systemd/system"


def systemd_is_init(run_dir: str = SYSTEMD_RUN_DIR) -> bool:
    return os.path.isdir(run_dir)


def _pid1() -> str:
    try:
        with open("/proc/1/comm") as fh:
            return fh.read().strip()
    except OSError:
        return "unknown"


class ExecutorConfig(ServiceConfig):
    # Pod networking: the first config (lexical order) in the conf dir is used; empty =
    # <state_root>/executor/cni/net.d, where Shoal installs its default bridge network
    # (pod_subnet on bridge `cni_bridge`) when the directory holds no config.
    cni_conf_dir: str = ""
    cni_bin_dirs: list[str] = msgspec.field(default_factory=lambda: ["/usr/lib/cni",
                                                                   "/opt/cni/bin"])
    pod_subnet: str = "10.88.0.0/16"
    cni_bridge: str = "shoal0"
    # A pod's cgroup_parent (normalized; a systemd slice name expanded) must lie under one
    # of these: what kubelet sends with either cgroup driver, and Shoal's default /shoal.
    pod_cgroup_roots: list[str] = msgspec.field(default_factory=lambda: list(POD_CGROUP_ROOTS))
    # How runc manages containers' cgroups, and what CRI RuntimeConfig tells kubelet:
    # "cgroupfs" (paths under /sys/fs/cgroup) or "systemd" (runc --systemd-cgroup, a scope
    # per container in the pod's slice). Must match kubelet's cgroupDriver.
    cgroup_driver: str = CGROUPFS
    # CRI-O's drop_infra_ctr: a pod that does not need a pause process (no shared PID
    # namespace, user namespace or sysctls) gets none; its namespaces are pinned instead.
    drop_infra: bool = True

    def check(self, key: str) -> None:
        super().check(key)
        if self.cgroup_driver not in CGROUP_DRIVERS:
            raise ConfigError(f"config key {key}.cgroup_driver: {self.cgroup_driver!r} is not "
                              f"one of {', '.join(CGROUP_DRIVERS)}")
        if self.cgroup_driver == SYSTEMD and not systemd_is_init():
            # Refused at start: runc --systemd-cgroup would fail every container create.
            raise ConfigError(f"config key {key}.cgroup_driver: 'systemd' needs systemd "
                              f"running as PID 1 ({SYSTEMD_RUN_DIR} is missing; PID 1 is "
                              f"{_pid1()!r}); use 'cgroupfs'")
        for i, root in enumerate(self.pod_cgroup_roots):
            if not root.startswith("/") or ".." in root.split("/") or root == "/":
                raise ConfigError(f"config key {key}.pod_cgroup_roots[{i}]: {root!r} is not "
                                  "an absolute cgroup path below the root")
