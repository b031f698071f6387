"""`docker cp`: the archive endpoints (HEAD/GET/PUT /containers/{id}/archive)."""

from __future__ import annotations

from shoal_docker_gateway.api.routes import Routes

routes = Routes()
