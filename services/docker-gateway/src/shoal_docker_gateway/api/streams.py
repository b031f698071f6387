"""`docker logs` and `docker attach` (and the attach `docker run` makes before it starts a
container): output read from the container's CRI log file."""

from __future__ import annotations

import asyncio

from aiohttp import web

from shoal_docker_gateway.api.routes import Routes, query_bool
from shoal_docker_gateway.domain import logs, paths
from shoal_docker_gateway.domain.backend import backend_of
from shoal_docker_gateway.domain.lookup import resolve
from shoal_docker_gateway.errors import BadParameter

routes = Routes()


class _Hijacked(asyncio.Protocol):
    """The connection once hijacked: a client with nothing to send half-closes it (the
    docker CLI does, without stdin) and still reads the output, so end-of-input must not
    close it as aiohttp's own protocol would; the end is passed on to aiohttp's."""

    def __init__(self, previous: asyncio.BaseProtocol) -> None:
        self.previous = previous

    def data_received(self, data: bytes) -> None:
        pass  # stdin is not forwarded (refused at attach)

    def eof_received(self) -> bool:
        return True  # keep the write side open

    def connection_lost(self, exc: Exception | None) -> None:
        self.previous.connection_lost(exc)


RAW = "application/vnd.docker.raw-stream"


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
                                           "application/vnd.docker.multiplexed-stream"})
    await response.prepare(request)
    async for chunk in logs.stream(backend, rec, paths.log_path(backend, rec.id), q):
        await response.write(chunk)
    await response.write_eof()
    return response


@routes.post("/containers/{id}/attach")
async def attach(request: web.Request) -> web.StreamResponse:
    """Hijacked as Docker does it (101 UPGRADED, then raw bytes); output only: stdin is
    not forwarded (it answers 501 when asked for)."""
    backend = backend_of(request)
    rec = await resolve(backend, request.match_info["id"])
    if query_bool(request, "stdin") and rec.config.get("OpenStdin"):
        raise BadParameter("attaching stdin is not supported by Shoal yet (use -d, or run "
                           "without -i)")
    path = paths.log_path(backend, rec.id)
    q = logs.LogQuery(stdout=query_bool(request, "stdout"), stderr=query_bool(request, "stderr"),
                      follow=query_bool(request, "stream"))
    start = 0 if query_bool(request, "logs") or rec.state == "created" else logs.size_of(path)
    transport = request.transport
    if transport is None:
        return web.Response(status=500)
    upgrade = "upgrade" in request.headers.get("Connection", "").lower()
    head = (f"HTTP/1.1 101 UPGRADED\r\nContent-Type: {RAW}\r\nConnection: Upgrade\r\n"
            "Upgrade: tcp\r\n\r\n" if upgrade else
            f"HTTP/1.1 200 OK\r\nContent-Type: {RAW}\r\n\r\n")
    transport.set_protocol(_Hijacked(transport.get_protocol()))
    transport.write(head.encode())
    try:
        async for chunk in logs.stream(backend, rec, path, q, start):
            if transport.is_closing():
                break
            transport.write(chunk)
    finally:
        transport.close()  # the stream ends with the connection, as a hijacked one does
    raise web.HTTPOk()  # nothing more goes on this connection
