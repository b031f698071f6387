"""A connection hijacked as Docker does it for attach and exec: the HTTP response is just a
status line (101 UPGRADED when the client asked to upgrade, else 200), then raw bytes both
ways on the same socket until one side closes it. The docker CLI half-closes its side
when it has no stdin to send and still reads the output, so end-of-input must not close
the connection as aiohttp's own protocol would."""

from __future__ import annotations

import asyncio
from collections import deque

from aiohttp import web
from shoal_common.attach import TerminalSize

from shoal_docker_gateway.domain.logs import frame
from shoal_docker_gateway.errors import BadParameter

RAW = "application/vnd.docker.raw-stream"
MULTIPLEXED = "application/vnd.docker.multiplexed-stream"
INPUT_HIGH_WATER = 1 << 20  # buffered stdin bytes before the socket stops being read


class Hijacked(asyncio.Protocol):
    """The socket after the status line: `read` gives the client's bytes (b"" once it has
    half-closed or gone), `write` sends with the transport's flow control."""

    def __init__(self, transport: asyncio.Transport, previous: asyncio.BaseProtocol) -> None:
        self.transport = transport
        self.previous = previous
        self._input: deque[bytes] = deque()
        self._buffered = 0
        self._ended = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    # -- asyncio.Protocol ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._input.append(data)
        self._buffered += len(data)
        self._readable.set()
        if self._buffered > INPUT_HIGH_WATER:
            self.transport.pause_reading()  # the container reads slower than we are fed

    def eof_received(self) -> bool:
        self._end()
        return True  # keep the write side open

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()
        self._writable.set()
        self.previous.connection_lost(exc)

    def _end(self) -> None:
        self._ended = True
        self._readable.set()

    # -- for the session ----------------------------------------------------------------

    async def read(self) -> bytes:
        while not self._input:
            if self._ended:
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = self._input.popleft()
        self._buffered -= len(data)
        if self._buffered <= INPUT_HIGH_WATER and not self.transport.is_closing():
            self.transport.resume_reading()
        return data

    async def write(self, data: bytes) -> None:
        if self.transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        self.transport.write(data)
        await self._writable.wait()

    @property
    def closing(self) -> bool:
        return self.transport.is_closing()

    def close(self) -> None:
        self.transport.close()


class Output:
    """One of the client's output streams on a hijacked connection: framed as Docker's
    multiplexed stream unless the process has a terminal (then the bytes go as they are)."""

    def __init__(self, conn: Hijacked, stream: str, tty: bool) -> None:
        self.conn, self.stream, self.tty = conn, stream, tty

    async def write(self, data: bytes) -> None:
        await self.conn.write(data if self.tty else frame(self.stream, data))


def hijack(request: web.Request, content_type: str) -> Hijacked:
    """Answer `request` with the bare status line and take its socket over. The handler
    must then end by raising `Done` (nothing more goes on this connection)."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client closed the connection")
    upgrade = "upgrade" in request.headers.get("Connection", "").lower()
    head = (f"HTTP/1.1 101 UPGRADED\r\nContent-Type: {content_type}\r\n"
            "Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n" if upgrade else
            f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n\r\n")
    conn = Hijacked(transport, transport.get_protocol())
    transport.set_protocol(conn)
    transport.write(head.encode())
    return conn


def done() -> web.HTTPException:
    """What a hijacking handler raises at its end: aiohttp sends nothing more on a
    connection it no longer owns."""
    return web.HTTPOk()


def terminal_size(request: web.Request) -> TerminalSize:
    """`?h=ROWS&w=COLUMNS` of a resize."""
    try:
        height, width = int(request.query.get("h", "")), int(request.query.get("w", ""))
    except ValueError:
        raise BadParameter("resize needs integer h and w") from None
    if not (0 < height < 65536 and 0 < width < 65536):
        raise BadParameter(f"invalid terminal size {width}x{height}")
    return TerminalSize(width=width, height=height)
