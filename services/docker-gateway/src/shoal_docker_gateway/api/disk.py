"""`docker system df` and `docker container prune` (GET /system/df, POST /containers/prune).
`docker system prune` is the CLI calling each group's prune in turn: containers (here),
networks, volumes with --volumes, images, and the build cache."""

from __future__ import annotations

from aiohttp import web

from shoal_docker_gateway.api.routes import Routes, json_response, query_json
from shoal_docker_gateway.domain import disk
from shoal_docker_gateway.domain.backend import backend_of
from shoal_docker_gateway.domain.events_filters import parse_filters

routes = Routes()


@routes.get("/system/df")
async def usage(request: web.Request) -> web.Response:
    return json_response(await disk.usage(backend_of(request)))


@routes.post("/containers/prune")
async def prune_containers(request: web.Request) -> web.Response:
    filters = parse_filters(query_json(request, "filters"), disk.CONTAINER_PRUNE_FILTERS)
    return json_response(await disk.prune_containers(backend_of(request), filters))
