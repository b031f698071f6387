"""The Docker gateway's settings: `[services.docker_gateway]`; the socket and namespace are
the shared `[docker]` section, which the CLI and tests read too."""

from __future__ import annotations

from shoal_common.config import ServiceConfig


class DockerGatewayConfig(ServiceConfig):
    pass
