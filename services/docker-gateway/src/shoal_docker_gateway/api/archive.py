"""`docker cp`: the archive endpoints (HEAD/GET/PUT /containers/{id}/archive), over
domain/archive.py, whose file work runs in worker threads."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from shoal_docker_gateway.api.routes import Routes, query_bool
from shoal_docker_gateway.domain import archive as domain
from shoal_docker_gateway.domain.backend import backend_of
from shoal_docker_gateway.domain.lookup import resolve
from shoal_docker_gateway.errors import from_exception

routes = Routes()
log = structlog.get_logger("shoal.docker")

_QUEUED = 4  # chunks (domain.CHUNK each) waiting for a slow client


class _Stopped(Exception):
    """The client went away: the producer thread stops at its next chunk."""


async def _pump(produce: Callable[[Callable[[bytes], None]], None],
                write: Callable[[bytes], Awaitable[None]]) -> None:
    """Runs `produce(emit)` in a thread and writes what it emits, a few chunks ahead at
    most; an error in the thread is raised here."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=_QUEUED)
    stop = threading.Event()

    def emit(chunk: bytes) -> None:
        if stop.is_set():
            raise _Stopped
        asyncio.run_coroutine_threadsafe(queue.put(chunk), loop).result()

    def run() -> None:
        end: BaseException | None = None
        try:
            produce(emit)
        except BaseException as exc:  # handed to the event loop's side
            end = exc
        if not stop.is_set():
            asyncio.run_coroutine_threadsafe(queue.put(end), loop).result()

    worker = loop.run_in_executor(None, run)
    try:
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            await write(item)
    finally:
        stop.set()
        while not worker.done():  # a put the thread is blocked in must finish
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
            await asyncio.wait({worker}, timeout=0.05)


@routes.get("/containers/{id}/archive")  # HEAD too: the path's stat only
async def archive(request: web.Request) -> web.StreamResponse:
    backend = backend_of(request)
    ref = request.match_info["id"]
    cp = domain.parse_path(request.query.get("path", ""))
    path = await domain.rootfs(backend, await resolve(backend, ref))
    if request.method == "HEAD":
        found = await asyncio.to_thread(domain.stat_path, path, cp, ref)
        return web.Response(headers={domain.STAT_HEADER: found.header()})
    source = await asyncio.to_thread(domain.Source, path, cp, ref)
    try:
        response = web.StreamResponse(headers={"Content-Type": "application/x-tar",
                                               domain.STAT_HEADER: source.stat.header()})
        await response.prepare(request)
        try:
            await _pump(source.write, response.write)
        except Exception as exc:
            # Past the headers an error can only cut the archive short: the connection is
            # dropped before the chunked body's end, so the client sees a broken transfer.
            if not isinstance(exc, ConnectionResetError):
                log.warning("docker cp from a container failed mid-archive", container=ref,
                            path=cp.text, error=from_exception(exc)[1])
            if request.transport is not None:
                request.transport.abort()
            return response
    finally:
        await asyncio.to_thread(source.close)
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response


@routes.put("/containers/{id}/archive")
async def extract(request: web.Request) -> web.Response:
    backend = backend_of(request)
    ref = request.match_info["id"]
    cp = domain.parse_path(request.query.get("path", ""))
    opts_no_overwrite = query_bool(request, "noOverwriteDirNonDir")
    copy_ids = query_bool(request, "copyUIDGID")
    rec = await resolve(backend, ref)
    if rec.host_config.get("ReadonlyRootfs"):
        raise domain.Forbidden("container rootfs is marked read-only")
    path = await domain.rootfs(backend, rec)
    owner = None
    user = str(rec.config.get("Shoal", {}).get("User", "") or "")
    if copy_ids and user:
        owner = await asyncio.to_thread(domain.user_ids, path, user)
    loop = asyncio.get_running_loop()

    def read(size: int) -> bytes:
        return asyncio.run_coroutine_threadsafe(request.content.read(size), loop).result()

    body = io.BufferedReader(domain.BodyReader(read), domain.CHUNK)
    await asyncio.to_thread(domain.extract, path, cp, ref, body,
                            domain.ExtractOptions(opts_no_overwrite, owner))
    return web.Response(status=200)
