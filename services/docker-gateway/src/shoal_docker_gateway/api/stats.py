"""`docker top` and `docker stats`."""

from __future__ import annotations

import json

from aiohttp import web

from shoal_docker_gateway.api.routes import JSON_TYPE, Routes, json_response, query_bool
from shoal_docker_gateway.domain import stats
from shoal_docker_gateway.domain.backend import backend_of
from shoal_docker_gateway.domain.lookup import resolve

routes = Routes()


@routes.get("/containers/{id}/top")
async def top(request: web.Request) -> web.Response:
    backend = backend_of(request)
    rec = await resolve(backend, request.match_info["id"])
    return json_response(await stats.top(backend, rec, request.query.get("ps_args", "")))


@routes.get("/containers/{id}/stats")
async def container_stats(request: web.Request) -> web.StreamResponse:
    """stream=false: one object (two readings a second apart; one-shot: one reading);
    stream=true (the default): one object a second, a line each, until the client leaves
    or the container stops. one-shot counts only without stream, as in Docker."""
    backend = backend_of(request)
    rec = await resolve(backend, request.match_info["id"])
    stream = query_bool(request, "stream", True)
    one_shot = query_bool(request, "one-shot")
    target = await stats.target(backend, rec)  # 409 before any header is sent
    if not stream:
        return json_response(await stats.once(target, rec, one_shot))
    response = web.StreamResponse(headers=JSON_TYPE)
    await response.prepare(request)
    try:
        async for doc in stats.follow(target, rec):
            await response.write(json.dumps(doc).encode() + b"\n")
        await response.write_eof()
    except ConnectionError:  # the client went away: the end of a stream
        pass
    return response
