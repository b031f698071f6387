"""The supervisor's settings: `[services.supervisor]` (registered in pyproject.toml under
the entry-point group `shoal.config`). The OCI runtimes it may run are `[runtime]`."""

from __future__ import annotations

from shoal_common.config import ServiceConfig


class SupervisorConfig(ServiceConfig):
    # The per-container monitor binary (Debian's conmon).
    conmon_path: str = "conmon"
