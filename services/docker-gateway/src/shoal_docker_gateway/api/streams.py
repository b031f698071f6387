"""`docker logs`, `docker attach` (and the attach `docker run` makes before it starts a
container) and terminal resizes: output from the container's CRI log file, or, when stdin
is attached, the container's own streams through its conmon."""

from __future__ import annotations

import structlog
from aiohttp import web
from shoal_common.attach import ProcessIO, Sessions
from shoal_common.messages.streams import ResizeRequest

from shoal_docker_gateway.api.hijack import (
    MULTIPLEXED,
    RAW,
    Output,
    done,
    hijack,
    terminal_size,
)
from shoal_docker_gateway.api.routes import Routes, query_bool
from shoal_docker_gateway.domain import events, logs, paths
from shoal_docker_gateway.domain.backend import Backend, backend_of
from shoal_docker_gateway.domain.containers import observe
from shoal_docker_gateway.domain.lookup import resolve
from shoal_docker_gateway.errors import BadParameter, Conflict, from_exception
from shoal_docker_gateway.store.containers import ContainerRecord

routes = Routes()
log = structlog.get_logger("shoal.docker.attach")


def _seconds(request: web.Request, name: str) -> float:
    value = request.query.get(name, "")
    if not value:
        return 0.0
    try:
        return float(value)
    except ValueError:
        raise BadParameter(f"invalid value for {name}: {value[:64]!r}") from None


@routes.get("/containers/{id}/logs")
async def container_logs(request: web.Request) -> web.StreamResponse:
    backend = backend_of(request)
    rec = await resolve(backend, request.match_info["id"])
    tail = request.query.get("tail", "all")
    if tail != "all" and not tail.isdigit():
        raise BadParameter(f"invalid value for tail: {tail[:64]!r}")
    q = logs.LogQuery(stdout=query_bool(request, "stdout"), stderr=query_bool(request, "stderr"),
                      follow=query_bool(request, "follow"),
                      timestamps=query_bool(request, "timestamps"),
                      since=_seconds(request, "since"), until=_seconds(request, "until"),
                      tail=-1 if tail == "all" else int(tail))
    if not (q.stdout or q.stderr):
        raise BadParameter("You must choose at least one stream")
    response = web.StreamResponse(headers={"Content-Type": RAW if rec.config.get("Tty") else
                                           MULTIPLEXED})
    await response.prepare(request)
    async for chunk in logs.stream(backend, rec, paths.log_path(backend, rec.id), q):
        await response.write(chunk)
    await response.write_eof()
    return response


@routes.post("/containers/{id}/attach")
async def attach(request: web.Request) -> web.StreamResponse:
    """Hijacked as Docker does it (101 UPGRADED, then raw bytes). With stdin, the client is
    joined to the container's own streams through its conmon (so it must not have exited);
    output only, it follows the container's log, which also gives `logs=1` its history."""
    backend = backend_of(request)
    rec = await resolve(backend, request.match_info["id"])
    tty = bool(rec.config.get("Tty"))
    await events.container(backend, rec, "attach")
    if query_bool(request, "stdin") and rec.config.get("OpenStdin"):
        return await _attach_live(request, backend, rec, tty)
    path = paths.log_path(backend, rec.id)
    q = logs.LogQuery(stdout=query_bool(request, "stdout"), stderr=query_bool(request, "stderr"),
                      follow=query_bool(request, "stream"))
    start = 0 if query_bool(request, "logs") or rec.state == "created" else logs.size_of(path)
    conn = hijack(request, RAW)
    try:
        async for chunk in logs.stream(backend, rec, path, q, start):
            if conn.closing:
                break
            await conn.write(chunk)
    except ConnectionError:
        pass  # the client left
    finally:
        conn.close()  # the stream ends with the connection, as a hijacked one does
    raise done()


async def _attach_live(request: web.Request, backend: Backend, rec: ContainerRecord,
                       tty: bool) -> web.StreamResponse:
    if (await observe(backend, rec)).status not in ("created", "running"):
        raise Conflict("You cannot attach to a stopped container, start it first")
    conn = hijack(request, RAW if tty else MULTIPLEXED)
    io = ProcessIO(stdin=conn,
                   stdout=Output(conn, "stdout", tty) if query_bool(request, "stdout") else None,
                   stderr=Output(conn, "stderr", tty) if query_bool(request, "stderr") else None)
    try:
        await Sessions(backend.clients.monitor).attach(rec.cri_id, io, outlive_stdin=True)
    except ConnectionError:
        pass
    except Exception as exc:
        log.info("attach failed", container=rec.id, error=from_exception(exc)[1])
    finally:
        conn.close()
    raise done()


@routes.post("/containers/{id}/resize")
async def resize(request: web.Request) -> web.Response:
    backend = backend_of(request)
    rec = await resolve(backend, request.match_info["id"])
    size = terminal_size(request)
    if (await observe(backend, rec)).status != "running":
        raise Conflict(f"Container {rec.id} is not running")
    await backend.clients.monitor.resize(ResizeRequest(id=rec.cri_id, height=size.height,
                                                       width=size.width))
    return web.Response(status=200)
