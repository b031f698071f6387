"""`docker exec`: exec instances (create, start hijacked, resize, inspect)."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from aiohttp import web
from shoal_common.attach import ProcessIO, Sessions

from shoal_docker_gateway.api.hijack import (
    MULTIPLEXED,
    RAW,
    Hijacked,
    Output,
    done,
    hijack,
    terminal_size,
)
from shoal_docker_gateway.api.routes import Routes, json_body, json_response
from shoal_docker_gateway.domain import events, execs
from shoal_docker_gateway.domain.backend import backend_of
from shoal_docker_gateway.domain.containers import observe
from shoal_docker_gateway.domain.containers_body import flag
from shoal_docker_gateway.domain.lookup import resolve
from shoal_docker_gateway.errors import Conflict, from_exception

routes = Routes()
log = structlog.get_logger("shoal.docker.exec")
EXEC_FAILED = 126  # dockerd's exit code for an exec that could not start


@routes.post("/containers/{id}/exec")
async def create(request: web.Request) -> web.Response:
    backend = backend_of(request)
    rec = await resolve(backend, request.match_info["id"])
    process, flags = execs.parse_config(await json_body(request))
    if (await observe(backend, rec)).status != "running":
        raise Conflict(f"Container {rec.id} is not running")
    inst = backend.execs.add(rec, process, flags)
    await events.container(backend, rec, events.exec_action("exec_create", process.cmd),
                           execID=inst.id)
    return json_response({"Id": inst.id}, status=201)


@routes.get("/exec/{id}/json")
async def inspect(request: web.Request) -> web.Response:
    return json_response(backend_of(request).execs.get(request.match_info["id"]).inspect())


@routes.post("/exec/{id}/resize")
async def resize(request: web.Request) -> web.Response:
    inst = backend_of(request).execs.get(request.match_info["id"])
    inst.resizes.put_nowait(terminal_size(request))
    return web.Response(status=201)


@routes.post("/exec/{id}/start")
async def start(request: web.Request) -> web.StreamResponse:
    backend = backend_of(request)
    inst = backend.execs.get(request.match_info["id"])
    body = await json_body(request)
    rec = await resolve(backend, inst.container_id)
    if (await observe(backend, rec)).status != "running":
        raise Conflict(f"Container {rec.id} is not running")
    execs.claim(inst)
    await events.container(backend, rec, events.exec_action("exec_start", inst.process.cmd),
                           execID=inst.id)
    sessions = Sessions(backend.clients.monitor)
    if flag(body, "Detach"):
        # Runs on with nobody attached; its end is recorded for inspect.
        inst.task = asyncio.get_running_loop().create_task(_detached(sessions, inst))
        return web.Response(status=200)
    tty = inst.process.tty
    conn = hijack(request, RAW if tty else MULTIPLEXED)
    io = ProcessIO(stdin=conn if inst.attach_stdin else None,
                   stdout=Output(conn, "stdout", tty) if inst.attach_stdout else None,
                   stderr=Output(conn, "stderr", tty) if inst.attach_stderr else None,
                   resizes=inst.resizes)
    try:
        await execs.run(sessions, inst, io)
    except (ConnectionError, asyncio.CancelledError):
        pass  # the client left: the session was removed with its process
    except Exception as exc:
        await _report(conn, inst, exc)
    finally:
        conn.close()
    raise done()


async def _report(conn: Hijacked, inst: execs.ExecInstance, exc: Exception) -> None:
    """A failure once the stream is open goes down the stream, as dockerd writes it."""
    inst.exit_code = EXEC_FAILED
    message = from_exception(exc)[1]
    log.info("exec failed", exec_id=inst.id, container=inst.container_id, error=message)
    out = Output(conn, "stderr", inst.process.tty)
    with contextlib.suppress(ConnectionError):
        await out.write(f"{message}\r\n".encode())


async def _detached(sessions: Sessions, inst: execs.ExecInstance) -> None:
    try:
        await execs.run(sessions, inst, ProcessIO(resizes=inst.resizes))
    except Exception as exc:
        inst.exit_code = EXEC_FAILED
        log.info("detached exec failed", exec_id=inst.id, error=from_exception(exc)[1])

