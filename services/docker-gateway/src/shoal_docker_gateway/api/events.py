"""`docker events`: GET /events, streamed until `until` or until the client leaves."""

from __future__ import annotations

import asyncio
import contextlib
import json

from aiohttp import web

from shoal_docker_gateway.api.routes import JSON_TYPE, Routes, query_json
from shoal_docker_gateway.domain import events
from shoal_docker_gateway.domain.backend import backend_of
from shoal_docker_gateway.domain.events_filters import Filters, parse_filters
from shoal_docker_gateway.errors import BadParameter

routes = Routes()
GONE_POLL = 1.0  # seconds between looks at whether a quiet follower is still there


@routes.get("/events")
async def get_events(request: web.Request) -> web.StreamResponse:
    since = events.parse_time(request.query.get("since", ""), "since")
    until = events.parse_time(request.query.get("until", ""), "until")
    if since is not None and until is not None and until < since:
        raise BadParameter("since must be before until")
    filters = parse_filters(query_json(request, "filters"), events.FILTERS)
    # Headers at once: the CLI shows nothing until it has them.
    response = web.StreamResponse(headers=JSON_TYPE)
    await response.prepare(request)
    sending = asyncio.create_task(_send(request, response, since, until, filters))
    gone = asyncio.create_task(_client_gone(request))
    try:
        await asyncio.wait({sending, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sending, gone):
            task.cancel()
        # Ending the stream ends its consumer; an error of the bus ends the response.
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending
    return response


async def _send(request: web.Request, response: web.StreamResponse, since: float | None,
                until: float | None, filters: Filters) -> None:
    async for message in events.stream(backend_of(request), since, until, filters):
        await response.write(json.dumps(message).encode() + b"\n")
    await response.write_eof()


async def _client_gone(request: web.Request) -> None:
    """Returns once the client has left (docker events is ended with Ctrl-C): a follower
    whose filter matches nothing is otherwise never written to, so never found gone."""
    while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110 (no event tells it)
        await asyncio.sleep(GONE_POLL)
