"""`docker top` and `docker stats`."""

from __future__ import annotations

from shoal_docker_gateway.api.routes import Routes

routes = Routes()
