"""`docker volume create|ls|inspect|rm|prune` (driver `local`)."""

from __future__ import annotations

from aiohttp import web

from shoal_docker_gateway.api.routes import (
    Routes,
    json_body,
    json_response,
    query_bool,
    query_json,
)
from shoal_docker_gateway.domain import volumes
from shoal_docker_gateway.domain.backend import backend_of
from shoal_docker_gateway.domain.events_filters import parse_filters
from shoal_docker_gateway.errors import BadParameter

routes = Routes()


@routes.post("/volumes/create")
async def create(request: web.Request) -> web.Response:
    backend = backend_of(request)
    body = await json_body(request)
    name = body.get("Name") or volumes.anonymous_name()
    driver = body.get("Driver") or "local"
    if driver != "local":
        raise BadParameter(f"volume driver {driver!r} is not supported: only \"local\"")
    rec = await volumes.create(backend, volumes.check_name(name),
                               labels=volumes.str_map(body.get("Labels"), "Labels"),
                               options=volumes.str_map(body.get("DriverOpts"), "DriverOpts"))
    return json_response(volumes.doc(backend, rec), status=201)


@routes.get("/volumes")
async def listing(request: web.Request) -> web.Response:
    backend = backend_of(request)
    filters = parse_filters(query_json(request, "filters"), volumes.LIST_FILTERS)
    found = await volumes.listing(backend, filters)
    return json_response({"Volumes": [volumes.doc(backend, r) for r in found],
                          "Warnings": []})


@routes.get("/volumes/{name}")
async def inspect(request: web.Request) -> web.Response:
    backend = backend_of(request)
    return json_response(volumes.doc(backend, await volumes.get(backend,
                                                                request.match_info["name"])))


@routes.delete("/volumes/{name}")
async def remove(request: web.Request) -> web.Response:
    await volumes.remove(backend_of(request), request.match_info["name"],
                         force=query_bool(request, "force"))
    return web.Response(status=204)


@routes.post("/volumes/prune")
async def prune(request: web.Request) -> web.Response:
    filters = parse_filters(query_json(request, "filters"), volumes.PRUNE_FILTERS)
    result = await volumes.prune(backend_of(request), filters)
    return json_response({"VolumesDeleted": result.deleted,
                          "SpaceReclaimed": result.reclaimed})
