"""`docker exec`: exec instances (create, start hijacked, resize, inspect)."""

from __future__ import annotations

from shoal_docker_gateway.api.routes import Routes

routes = Routes()
