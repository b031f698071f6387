"""The Docker gateway (`docker.*`): on the bus it serves only health and ping."""

from __future__ import annotations

from shoal_common.clients.base import ServiceClient


class DockerClient(ServiceClient):
    service = "docker"
