"""The streaming server: an aiohttp server on `cri.stream_addr` serving the URLs the Exec,
Attach and PortForward RPCs hand out (`/exec/<token>`, `/attach/<token>`,
`/portforward/<token>`), each upgraded to SPDY/3.1 or WebSocket."""

from __future__ import annotations

import functools
import ipaddress
import socket
from typing import Any

import structlog
from aiohttp import web
from cri_api.v1 import api_pb2 as cri
from shoal_common.config import parse_addr
from shoal_common.errors import ShoalError

from shoal_cri_gateway.domain.streams import ProcessIO, StreamRuntime
from shoal_cri_gateway.streaming import portforward, remotecommand
from shoal_cri_gateway.streaming.remotecommand import (
    Options,
    Status,
    exit_failure,
    internal_error,
    success,
)
from shoal_cri_gateway.streaming.tokens import TokenCache
from shoal_cri_gateway.streaming.upgrade import UpgradeRefused, is_spdy, is_websocket

log = structlog.get_logger("shoal.cri.streaming")

CriRequest = cri.ExecRequest | cri.AttachRequest | cri.PortForwardRequest


class StreamServer:
    def __init__(self, addr: str, runtime: StreamRuntime, idle_timeout: float) -> None:
        self.addr = addr
        self.runtime = runtime
        self.idle_timeout = idle_timeout
        self.tokens: TokenCache[Any] = TokenCache()
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        for kind, handler in (("exec", self._exec), ("attach", self._attach),
                              ("portforward", self._portforward)):
            # kubelet and crictl POST; GET is what a WebSocket upgrade uses.
            app.router.add_route("GET", f"/{kind}/{{token}}", handler)
            app.router.add_route("POST", f"/{kind}/{{token}}", handler)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        host, port = parse_addr(self.addr)
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        self.base_url = f"http://{_url_host(host)}:{bound[1]}"
        log.info("streaming server ready", url=self.base_url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def url(self, kind: str, request: CriRequest, ns: str) -> str:
        """A single-use URL for a request validated in the Shoal namespace `ns` (the
        session acts there); it expires unused after a minute."""
        return f"{self.base_url}/{kind}/{self.tokens.insert(kind, (request, ns))}"

    # -- handlers -----------------------------------------------------------------------

    async def _serve(self, request: web.Request, kind: str) -> tuple[Any, str, bool] | None:
        """(the cached CRI request, its namespace, whether it is a WebSocket), or None for a
        token that is not (or no longer) valid."""
        cached = self.tokens.consume(kind, request.match_info["token"])
        if cached is None:
            return None
        req, ns = cached
        if is_websocket(request):
            return req, ns, True
        if is_spdy(request):
            return req, ns, False
        raise UpgradeRefused(web.Response(status=400, text="unable to upgrade: missing "
                                          "upgrade headers in request"))

    async def _remotecommand(self, request: web.Request, kind: str) -> web.StreamResponse:
        try:
            served = await self._serve(request, kind)
            if served is None:
                raise web.HTTPNotFound()
            req, ns, websocket = served
            opts = Options(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, tty=req.tty)
            run = functools.partial(self._run_exec if kind == "exec" else self._run_attach, ns,
                                    req)
            log.info("stream opened", kind=kind, container=req.container_id,
                     transport="websocket" if websocket else "spdy", tty=req.tty)
            serve = remotecommand.serve_websocket if websocket else remotecommand.serve_spdy
            return await serve(request, opts, run, self.idle_timeout)
        except UpgradeRefused as exc:
            return exc.response

    async def _exec(self, request: web.Request) -> web.StreamResponse:
        return await self._remotecommand(request, "exec")

    async def _attach(self, request: web.Request) -> web.StreamResponse:
        return await self._remotecommand(request, "attach")

    async def _run_exec(self, ns: str, req: cri.ExecRequest, io: ProcessIO) -> Status:
        cmd = list(req.cmd)
        try:
            code = await self.runtime.exec(ns, req.container_id, cmd, req.tty, io)
        except ShoalError as exc:
            return internal_error(f"error executing command in container: {exc.message}")
        log.info("exec finished", container=req.container_id, exit_code=code)
        return success() if code == 0 else exit_failure(code, cmd)

    async def _run_attach(self, ns: str, req: cri.AttachRequest, io: ProcessIO) -> Status:
        try:
            await self.runtime.attach(ns, req.container_id, io)
        except ShoalError as exc:
            return internal_error(f"error attaching to container: {exc.message}")
        return success()

    async def _portforward(self, request: web.Request) -> web.StreamResponse:
        try:
            served = await self._serve(request, "portforward")
            if served is None:
                raise web.HTTPNotFound()
            req, ns, websocket = served
            pod_id = req.pod_sandbox_id

            async def dial(port: int) -> socket.socket:
                return await self.runtime.dial(ns, pod_id, port)

            log.info("port forward opened", pod=pod_id,
                     transport="websocket" if websocket else "spdy")
            if websocket:
                return await portforward.serve_websocket(request, pod_id, list(req.port), dial,
                                                         self.idle_timeout)
            return await portforward.serve_spdy(request, pod_id, dial, self.idle_timeout)
        except UpgradeRefused as exc:
            return exc.response


def _url_host(host: str) -> str:
    """The host to put in URLs: a wildcard bind is reached on loopback (kubelet, which
    proxies the streams, runs on this node)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.is_unspecified:
        return "127.0.0.1" if ip.version == 4 else "[::1]"
    return f"[{host}]" if ip.version == 6 else host
