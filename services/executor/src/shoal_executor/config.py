"""The executor's settings: `[services.executor]` (registered in pyproject.toml under the
entry-point group `shoal.config`). The OCI runtimes are the shared `[runtime]` section."""

from __future__ import annotations

import msgspec
from shoal_common.config import ConfigError, ServiceConfig

# Declared here, not in the checks, so that loading the config (every Shoal process does)
# imports nothing else of the executor.
POD_CGROUP_ROOTS = ("/kubepods", "/kubepods.slice", "/shoal")


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

    def check(self, key: str) -> None:
        super().check(key)
        for i, root in enumerate(self.pod_cgroup_roots):
            if not root.startswith("/") or ".." in root.split("/") or root == "/":
                raise ConfigError(f"config key {key}.pod_cgroup_roots[{i}]: {root!r} is not "
                                  "an absolute cgroup path below the root")
