"""The executor's settings: `[services.executor]` (registered in pyproject.toml under the
entry-point group `shoal.config`). The OCI runtimes are the shared `[runtime]` section."""

from __future__ import annotations

import msgspec
from shoal_common.config import ServiceConfig


class ExecutorConfig(ServiceConfig):
    # Pod networking: the first config (lexical order) in the conf dir is used; empty =
    # <state_root>/executor/cni/net.d, where Shoal installs its default bridge network
    # (pod_subnet on bridge `cni_bridge`) when the directory holds no config.
    cni_conf_dir: str = ""
    cni_bin_dirs: list[str] = msgspec.field(default_factory=lambda: ["/usr/lib/cni",
                                                                   "/opt/cni/bin"])
    pod_subnet: str = "10.88.0.0/16"
    cni_bridge: str = "shoal0"
