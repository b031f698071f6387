"""The CRI gateway's settings: `[services.cri_gateway]` (registered in pyproject.toml under
the entry-point group `shoal.config`); the CRI's own are the shared `[cri]` section, which
the CLI reads too."""

from __future__ import annotations

from shoal_common.config import ServiceConfig


class GatewayConfig(ServiceConfig):
    pass
