"""Attach, logs, exec, top, stats, cp (archive)."""

from __future__ import annotations

from shoal_docker_gateway.api.routes import Routes

routes = Routes()
