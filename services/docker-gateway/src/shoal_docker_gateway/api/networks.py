"""`docker network create|ls|inspect|rm|prune|connect|disconnect` (domain/networks.py)."""

from __future__ import annotations

from aiohttp import web

from shoal_docker_gateway.api.routes import Routes, json_body, json_response, query_json
from shoal_docker_gateway.domain import networks
from shoal_docker_gateway.domain.backend import backend_of
from shoal_docker_gateway.domain.events_filters import parse_filters

routes = Routes()


@routes.get("/networks")
async def listing(request: web.Request) -> web.Response:
    filters = parse_filters(query_json(request, "filters"), networks.LIST_FILTERS)
    return json_response(await networks.listing(backend_of(request), filters))


@routes.get("/networks/{id}")
async def inspect(request: web.Request) -> web.Response:
    # `verbose` and `scope` are accepted: a local network has nothing more to show.
    return json_response(await networks.inspect(backend_of(request), request.match_info["id"]))


@routes.post("/networks/create")
async def create(request: web.Request) -> web.Response:
    rec = await networks.create(backend_of(request), await json_body(request))
    return json_response({"Id": rec.id, "Warning": ""}, status=201)


@routes.delete("/networks/{id}")
async def remove(request: web.Request) -> web.Response:
    await networks.remove(backend_of(request), request.match_info["id"])
    return web.Response(status=204)


@routes.post("/networks/prune")
async def prune(request: web.Request) -> web.Response:
    filters = parse_filters(query_json(request, "filters"), networks.PRUNE_FILTERS)
    return json_response({"NetworksDeleted": await networks.prune(backend_of(request),
                                                                  filters)})


@routes.post("/networks/{id}/connect")
async def connect(request: web.Request) -> web.Response:
    await networks.connect(backend_of(request), request.match_info["id"],
                           await json_body(request))
    return web.Response(status=200)


@routes.post("/networks/{id}/disconnect")
async def disconnect(request: web.Request) -> web.Response:
    await networks.disconnect(backend_of(request), request.match_info["id"],
                              await json_body(request))
    return web.Response(status=200)
