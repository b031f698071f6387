"""Getting from an HTTP request to a stream connection: subprotocol negotiation as
Kubernetes does it, the SPDY/3.1 upgrade, and small byte-channel helpers shared by the
remote-command and port-forward handlers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from shoal_cri_gateway.streaming.spdy import SpdySession

PROTOCOL_HEADER = "X-Stream-Protocol-Version"
ACCEPTED_PROTOCOLS_HEADER = "X-Accepted-Stream-Protocol-Versions"
SPDY_UPGRADE = "SPDY/3.1"
STREAM_CREATION_TIMEOUT = 30.0  # kubelet's: for the client to open its streams


class UpgradeRefused(Exception):
    """The request cannot be upgraded; `response` says why to the client."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.text)
        self.response = response


def is_websocket(request: web.Request) -> bool:
    connection = request.headers.get(hdrs.CONNECTION, "").lower()
    return "upgrade" in connection and request.headers.get(hdrs.UPGRADE, "").lower() == \
        "websocket"


def is_spdy(request: web.Request) -> bool:
    connection = request.headers.get(hdrs.CONNECTION, "").lower()
    return "upgrade" in connection and request.headers.get(hdrs.UPGRADE, "").lower() == \
        SPDY_UPGRADE.lower()


def negotiate_spdy(request: web.Request, supported: tuple[str, ...]) -> str:
    """The client's most preferred protocol we speak ("" when it asked for none: clients
    older than protocol negotiation); refused with 403 and our list otherwise."""
    offered = [p.strip() for value in request.headers.getall(PROTOCOL_HEADER, [])
               for p in value.split(",") if p.strip()]
    if not offered:
        return ""
    for protocol in offered:
        if protocol in supported:
            return protocol
    response = web.Response(status=403, text=f"unable to upgrade: unable to negotiate "
                            f"protocol: client supports {offered}, server accepts "
                            f"{list(supported)}")
    for protocol in supported:
        response.headers.add(ACCEPTED_PROTOCOLS_HEADER, protocol)
    raise UpgradeRefused(response)


def negotiate_websocket(request: web.Request, supported: tuple[str, ...]) -> str:
    """The client's most preferred WebSocket subprotocol we speak ("" when it named none
    and "" is in `supported`), or 400 as kube's wsstream answers."""
    offered = [p.strip() for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, [])
               for p in value.split(",") if p.strip()] or [""]
    for protocol in offered:
        if protocol in supported:
            return protocol
    raise UpgradeRefused(web.Response(
        status=400, text=f"requested protocol(s) are not supported: {offered}; supports "
        f"{[p for p in supported if p]}"))


class Hijacked(web.StreamResponse):
    """What a handler returns once it took the connection over: aiohttp writes nothing."""

    def __init__(self) -> None:
        super().__init__(status=101)

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def upgrade_spdy(request: web.Request, protocol: str, idle_timeout: float) -> SpdySession:
    """Answer 101 and move the connection from aiohttp's HTTP protocol to a SPDY session.

    aiohttp upgrades only to WebSocket, so the socket is taken over with asyncio's own
    `Transport.set_protocol`; aiohttp still hears when the connection ends (its
    connection_lost), so it forgets the connection as usual."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client went away before the upgrade")
    assert isinstance(transport, asyncio.Transport)
    lines = ["HTTP/1.1 101 Switching Protocols", "Connection: Upgrade",
             f"Upgrade: {SPDY_UPGRADE}"]
    if protocol:
        lines.append(f"{PROTOCOL_HEADER}: {protocol}")
    original = request.protocol
    session = SpdySession(idle_timeout=idle_timeout, on_lost=original.connection_lost)
    transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    transport.set_protocol(session)
    session.connection_made(transport)
    return session


class ByteQueue:
    """A reader fed by a receiving loop (WebSocket channels): read() returns b"" at EOF."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._eof = False

    def feed(self, data: bytes) -> None:
        if not self._eof and data:
            self._queue.put_nowait(data)

    def feed_eof(self) -> None:
        if not self._eof:
            self._eof = True
            self._queue.put_nowait(b"")

    async def read(self) -> bytes:
        data = await self._queue.get()
        if not data:
            self._queue.put_nowait(b"")  # EOF stays EOF for later reads
        return data


class IdleWatch:
    """Calls `on_idle` once nothing was marked active for `timeout` seconds."""

    def __init__(self, timeout: float, on_idle: Callable[[], Awaitable[None]]) -> None:
        self.timeout = timeout
        self._on_idle = on_idle
        self._last = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def touch(self) -> None:
        self._last = time.monotonic()

    async def _run(self) -> None:
        while True:
            left = self._last + self.timeout - time.monotonic()
            if left <= 0:
                await self._on_idle()
                return
            await asyncio.sleep(left)

    def __enter__(self) -> IdleWatch:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


async def first_done(main: Awaitable[None], *stoppers: Awaitable[object]) -> bool:
    """Run `main` until it ends (True) or any of `stoppers` does first (False: `main` is
    cancelled, e.g. when the client went away)."""
    task = asyncio.ensure_future(main)
    others = [asyncio.ensure_future(s) for s in stoppers]
    try:
        await asyncio.wait([task, *others], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        for other in others:
            other.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    # Whatever it raises while being cancelled, the client is gone: nobody to tell.
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return False
