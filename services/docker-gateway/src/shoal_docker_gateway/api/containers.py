"""Container create/start/stop/kill/restart/wait/rm/rename, `ps` and `inspect`."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
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
from shoal_docker_gateway.domain import events
from shoal_docker_gateway.domain.backend import Backend, backend_of
from shoal_docker_gateway.domain.containers_body import check_name
from shoal_docker_gateway.domain.lookup import resolve
from shoal_docker_gateway.errors import BadParameter, Conflict, NotModified
from shoal_docker_gateway.store.containers import ContainerRecord, Containers

routes = Routes()


@routes.post("/containers/create")
async def create(request: web.Request) -> web.Response:
    backend = backend_of(request)
    rec = await ops.create(backend, request.query.get("name", ""), await json_body(request))
    await events.container(backend, rec, "create")
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
    if not await _stop(backend, rec, _timeout(request)):
        raise NotModified("not running")
    return web.Response(status=204)


async def _stop(backend: Backend, rec: ContainerRecord, timeout: int) -> bool:
    """Docker's events of a stop: kill (the stop signal), die, stop."""
    backend.seen.expect(rec.id, "die")
    await events.container(backend, rec, "kill", signal=str(signal.SIGTERM))
    stopped = await ops.stop(backend, rec, timeout)
    if stopped:
        await backend.seen.wait(rec.id, "die")
        await events.container(backend, rec, "stop")
    return stopped


def _timeout(request: web.Request) -> int:
    t = query_int(request, "t", 10)
    if not -1 <= t <= 3600:
        raise BadParameter(f"invalid value for t: {t}")
    return 10 if t < 0 else t


@routes.post("/containers/{id}/restart")
async def restart(request: web.Request) -> web.Response:
    backend = backend_of(request)
    rec = await resolve(backend, request.match_info["id"])
    await _stop(backend, rec, _timeout(request))
    backend.seen.expect(rec.id, "start")
    await ops.start(backend, await resolve(backend, rec.id))
    await backend.seen.wait(rec.id, "start")
    await events.container(backend, rec, "restart")
    return web.Response(status=204)


@routes.post("/containers/{id}/kill")
async def kill(request: web.Request) -> web.Response:
    backend = backend_of(request)
    rec = await resolve(backend, request.match_info["id"])
    signum = ops.parse_signal(request.query.get("signal", ""))
    if (await ops.observe(backend, rec)).status == "running":  # else 409, and no event
        await events.container(backend, rec, "kill", signal=str(signum))
    await ops.kill(backend, rec, signum)
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
    await events.container(backend, rec, "update")
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
    name = check_name(request.query.get("name", ""))
    try:
        await Containers(backend.records).rename(rec.id, name)
    except sqlite3.IntegrityError:
        raise Conflict(f'Conflict. The container name "/{name}" is already in use') from None
    await events.emit(backend, "container", "rename", rec.id, events.container_attrs(
        rec, name=name, oldName=f"/{rec.name}"))
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
