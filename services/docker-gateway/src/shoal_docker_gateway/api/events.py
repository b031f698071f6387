"""`docker events`: GET /events, streamed until `until` or until the client leaves."""

from __future__ import annotations

import json

from aiohttp import web

from shoal_docker_gateway.api.routes import Routes, query_json
from shoal_docker_gateway.domain import events
from shoal_docker_gateway.domain.backend import backend_of
from shoal_docker_gateway.domain.events_filters import parse_filters
from shoal_docker_gateway.errors import BadParameter

routes = Routes()


@routes.get("/events")
async def get_events(request: web.Request) -> web.StreamResponse:
    backend = backend_of(request)
    since = events.parse_time(request.query.get("since", ""), "since")
    until = events.parse_time(request.query.get("until", ""), "until")
    if since is not None and until is not None and until < since:
        raise BadParameter("since must be before until")
    filters = parse_filters(query_json(request, "filters"), events.FILTERS)
    # Headers at once: the CLI shows nothing until it has them.
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    try:
        async for message in events.stream(backend, since, until, filters):
            await response.write(json.dumps(message).encode() + b"\n")
        await response.write_eof()
    except ConnectionError:
        pass  # the client left (docker events is ended with Ctrl-C)
    return response
