"""Container create/start/stop/kill/restart/rm/wait/inspect/ps/rename."""

from __future__ import annotations

from shoal_docker_gateway.api.routes import Routes

routes = Routes()
