"""The Docker Engine API on a unix socket, owner-only like the CRI socket.

Every endpoint group is a module with a `routes` table (api/system.py, api/images.py, ...);
this module adds them, turns errors into Docker's `{"message": ...}` bodies, and answers
what no module serves with 501 naming the endpoint."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import structlog
from aiohttp import web
from shoal_common.errors import FailedPrecondition

from shoal_docker_gateway import errors
from shoal_docker_gateway.api.routes import API_VERSION, JSON_TYPE, Handler, Routes
from shoal_docker_gateway.domain.backend import BACKEND, Backend

log = structlog.get_logger("shoal.docker")

SERVER_HEADER = "Shoal (linux)"


@web.middleware
async def _docker_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPNotFound:
        # No route: a Docker endpoint Shoal does not serve (or none at all).
        return _error(501, f"not implemented by Shoal: {request.method} {request.path}")
    except web.HTTPMethodNotAllowed:
        return _error(501, f"not implemented by Shoal: {request.method} {request.path}")
    except web.HTTPException:
        raise
    except Exception as exc:  # every failure answers the client; the unexpected are logged
        status, message = errors.from_exception(exc)
        if status >= 500:
            log.warning("docker API call failed", method=request.method, path=request.path,
                        status=status, error=message,
                        exc_info=not isinstance(exc, errors.DockerError))
        if status == 304:
            return web.Response(status=304)
        return _error(status, message)
    response.headers.setdefault("Api-Version", API_VERSION)
    response.headers.setdefault("Server", SERVER_HEADER)
    return response


def _error(status: int, message: str) -> web.Response:
    return web.Response(body=json.dumps({"message": message}).encode(), status=status,
                        headers={**JSON_TYPE, "Api-Version": API_VERSION,
                                 "Server": SERVER_HEADER})


def make_app(backend: Backend, groups: Sequence[Routes]) -> web.Application:
    # Docker's requests carry large bodies (build contexts, image loads): handlers read
    # their bodies as streams, so aiohttp's limit applies only to what it buffers itself.
    app = web.Application(middlewares=[_docker_errors], client_max_size=64 * 1024 * 1024)
    app[BACKEND] = backend
    for group in groups:
        app.add_routes(group.table)
    return app


class DockerServer:
    """Serves the API on `socket_path` until stopped: bound here, or (`inherited` >= 0) on
    the listening socket `shoal up` holds open at that path and passed down."""

    def __init__(self, socket_path: str, app: web.Application, inherited: int = -1) -> None:
        self.socket_path = Path(socket_path)
        self.app = app
        self.inherited = inherited
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        # access_log off: one structlog line per failure is enough; clients poll a lot.
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        if self.inherited >= 0:
            await web.SockSite(runner, inherited_listener(self.inherited,
                                                          self.socket_path)).start()
        else:
            await self._bind(runner)
        self._runner = runner
        log.info("Docker socket ready", socket=str(self.socket_path),
                 inherited=self.inherited >= 0)

    async def _bind(self, runner: web.AppRunner) -> None:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # left by a gateway that was killed
        old = os.umask(0o077)  # the socket is born owner-only; no window with wider modes
        try:
            await web.UnixSite(runner, str(path)).start()
        finally:
            os.umask(old)
        path.chmod(0o600)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.inherited >= 0:
            return  # the launcher's socket: it stays, queueing clients for the next gateway
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass


def inherited_listener(fd: int, path: Path) -> socket.socket:
    """The socket behind `fd`, checked to be a listening unix stream socket bound at
    `path` (a wrong descriptor would serve the API somewhere nobody expects)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise FailedPrecondition(f"docker.socket_fd {fd}: {exc.strerror}") from None
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if (sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening
            or sock.getsockname() != str(path)):
        sock.detach()
        raise FailedPrecondition(f"docker.socket_fd {fd} is not a unix socket listening at "
                                 f"{path}")
    sock.setblocking(False)
    return sock
