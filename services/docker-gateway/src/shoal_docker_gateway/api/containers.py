"""Container create/start/stop/kill/restart/wait/rm/rename, `ps` and `inspect`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from shoal_docker_gateway.api.routes import (
    Routes,
    json_body,
    json_response,
    query_bool,
    query_int,
    query_json,
)
from shoal_docker_gateway.domain import containers as ops
from shoal_docker_gateway.domain import containers_view as view
from shoal_docker_gateway.domain.backend import backend_of
from shoal_docker_gateway.domain.lookup import resolve
from shoal_docker_gateway.errors import BadParameter, NotModified
from shoal_docker_gateway.store.containers import Containers

routes = Routes()


@routes.post("/containers/create")
async def create(request: web.Request) -> web.Response:
    backend = backend_of(request)
    rec = await ops.create(backend, request.query.get("name", ""), await json_body(request))
    return json_response({"Id": rec.id, "Warnings": []}, status=201)


@routes.post("/containers/{id}/start")
async def start(request: web.Request) -> web.Response:
    backend = backend_of(request)
    rec = await resolve(backend, request.match_info["id"])
    if not await ops.start(backend, rec):
        raise NotModified("already started")
    return web.Response(status=204)


@routes.post("/containers/{id}/stop")
async def stop(request: web.Request) -> web.Response:
    backend = backend_of(request)
    rec = await resolve(backend, request.match_info["id"])
    if not await ops.stop(backend, rec, _timeout(request)):
        raise NotModified("not running")
    return web.Response(status=204)


def _timeout(request: web.Request) -> int:
    t = query_int(request, "t", 10)
    if not -1 <= t <= 3600:
        raise BadParameter(f"invalid value for t: {t}")
    return 10 if t < 0 else t


@routes.post("/containers/{id}/restart")
async def restart(request: web.Request) -> web.Response:
    backend = backend_of(request)
    rec = await resolve(backend, request.match_info["id"])
    await ops.restart(backend, rec, _timeout(request))
    return web.Response(status=204)


@routes.post("/containers/{id}/kill")
async def kill(request: web.Request) -> web.Response:
    backend = backend_of(request)
    rec = await resolve(backend, request.match_info["id"])
    await ops.kill(backend, rec, ops.parse_signal(request.query.get("signal", "")))
    return web.Response(status=204)


@routes.post("/containers/{id}/wait")
async def wait(request: web.Request) -> web.StreamResponse:
    backend = backend_of(request)
    rec = await resolve(backend, request.match_info["id"])
    condition = request.query.get("condition") or "not-running"
    if condition not in ("not-running", "next-exit", "removed"):
        raise BadParameter(f"invalid condition: {condition[:64]!r}")
    # Headers at once (the CLI waits for them before it starts the container), the exit
    # status when it comes.
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    seen = await ops.wait_exit(backend, rec)
    if condition == "removed":
        store = Containers(backend.records)
        while await store.by_id(rec.id) is not None:  # noqa: ASYNC110 (another task removes)
            await asyncio.sleep(ops.POLL)
    try:
        await response.write(json.dumps({"StatusCode": seen.exit_code,
                                         "Error": None}).encode())
        await response.write_eof()
    except ConnectionError:
        pass  # the client stopped waiting (docker run --rm does, once it saw the end)
    return response


@routes.post("/containers/{id}/update")
async def update(request: web.Request) -> web.Response:
    backend = backend_of(request)
    rec = await resolve(backend, request.match_info["id"])
    await ops.update(backend, rec, await json_body(request))
    return json_response({"Warnings": []})


@routes.delete("/containers/{id}")
async def remove(request: web.Request) -> web.Response:
    backend = backend_of(request)
    rec = await resolve(backend, request.match_info["id"])
    await ops.remove(backend, rec, force=query_bool(request, "force"),
                     volumes=query_bool(request, "v"))
    return web.Response(status=204)


@routes.post("/containers/{id}/rename")
async def rename(request: web.Request) -> web.Response:
    backend = backend_of(request)
    rec = await resolve(backend, request.match_info["id"])
    await ops.rename(backend, rec, request.query.get("name", ""))
    return web.Response(status=204)


@routes.get("/containers/json")
async def listing(request: web.Request) -> web.Response:
    backend = backend_of(request)
    filters = query_json(request, "filters") or {}
    if not isinstance(filters, dict):
        raise BadParameter("invalid filters: expected an object")
    rows = await view.listing(backend, all_=query_bool(request, "all"), filters=filters)
    limit = query_int(request, "limit", -1)
    return json_response(rows[:limit] if limit > 0 else rows)


@routes.get("/containers/{id}/json")
async def inspect(request: web.Request) -> web.Response:
    backend = backend_of(request)
    rec = await resolve(backend, request.match_info["id"])
    body: dict[str, Any] = await view.inspect(backend, rec)
    return json_response(body)
