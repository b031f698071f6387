"""Port forwarding as kubelet serves it.

SPDY/3.1 (`portforward.k8s.io`): for each forwarded connection the client opens an error
stream and a data stream, both with headers `port` and `requestID` (older clients send no
request id: the pair is then found from the stream ids, as kubelet does). Once both are
there we connect to localhost:<port> inside the pod and copy bytes both ways; a failure is
written as text on the error stream.

WebSocket (`v4.channel.k8s.io`, `v4.base64.channel.k8s.io` or no subprotocol, binary; the
names `v4.portforward.k8s.io`/`portforward.k8s.io` are taken as binary too): the ports come
from the CRI request (or the `port` query parameter); port i has data channel 2i and error
channel 2i+1, and the first message we send on each is the port, 2 bytes little endian.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from shoal_common.errors import ShoalError

from shoal_cri_gateway.domain.streams import Reader, Writer
from shoal_cri_gateway.streaming.remotecommand import MAX_MESSAGE, WsChannels
from shoal_cri_gateway.streaming.spdy import SpdySession, SpdyStream
from shoal_cri_gateway.streaming.upgrade import (
    STREAM_CREATION_TIMEOUT,
    ByteQueue,
    Hijacked,
    IdleWatch,
    UpgradeRefused,
    negotiate_spdy,
    negotiate_websocket,
    upgrade_spdy,
)

log = structlog.get_logger("shoal.cri.streaming")

SPDY_PROTOCOL = "portforward.k8s.io"
WEBSOCKET_BINARY = ("v4.channel.k8s.io", "", "v4.portforward.k8s.io", "portforward.k8s.io")
WEBSOCKET_BASE64 = ("v4.base64.channel.k8s.io",)
CLOSE_GRACE = 1.0  # after the pod closes, for the client's last bytes (containerd's wait)

Dial = Callable[[int], Awaitable[socket.socket]]


def forward_error(port: int, pod_id: str, why: str) -> bytes:
    return f"error forwarding port {port} to pod {pod_id}, uid : {why}".encode()


async def _dial(dial: Dial, pod_id: str, port: int,
                report: Callable[[bytes], Awaitable[None]]) -> socket.socket | None:
    """Connect to the pod's port; a failure is logged and reported to the client (on the
    port's error stream or channel), and None returned."""
    try:
        return await dial(port)
    except (ShoalError, OSError) as exc:
        why = exc.message if isinstance(exc, ShoalError) else str(exc)
        log.info("port forward failed", pod=pod_id, port=port, error=why)
        await report(forward_error(port, pod_id, why))
        return None


async def pipe(sock: socket.socket, source: Reader, sink: Writer,
               on_pod_eof: Callable[[], None] | None = None) -> None:
    """Copy client → pod and pod → client. The client's EOF half-closes the TCP connection
    and the pod's answer still flows until the pod closes; once the pod closed, the
    client gets a moment for its last bytes; a client reset (source raising) ends both."""
    loop = asyncio.get_running_loop()

    async def upstream() -> None:
        while data := await source.read():
            await loop.sock_sendall(sock, data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    async def downstream() -> None:
        while data := await loop.sock_recv(sock, 65536):
            await sink.write(data)
        if on_pod_eof is not None:
            on_pod_eof()

    up = asyncio.create_task(upstream())
    down = asyncio.create_task(downstream())
    try:
        done, _ = await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        if up in done and up.exception() is None and not down.done():
            await asyncio.wait([down])
        elif down in done and not up.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_GRACE):
                    await asyncio.wait([up])
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        sock.close()


# -- SPDY -------------------------------------------------------------------------------


@dataclass
class _Pair:
    request_id: str
    data: SpdyStream | None = None
    error: SpdyStream | None = None
    timer: asyncio.TimerHandle | None = None


class _SpdyWriter:
    def __init__(self, stream: SpdyStream) -> None:
        self.stream = stream

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)


class _StreamReader:
    """A data stream as the pipe's source: FIN is EOF, a reset an error."""

    def __init__(self, stream: SpdyStream) -> None:
        self.stream = stream

    async def read(self) -> bytes:
        data = await self.stream.read()
        if not data and self.stream.was_reset:
            raise ConnectionResetError(f"stream {self.stream.id} was reset")
        return data


def _request_id(stream: SpdyStream, kind: str) -> str:
    request_id = stream.header("requestID")
    if request_id:
        return request_id
    # Clients before request ids open error then data streams with consecutive odd ids.
    return str(stream.id if kind == "error" else stream.id - 2)


async def _forward_pair(pair: _Pair, pod_id: str, dial: Dial) -> None:
    assert pair.data is not None and pair.error is not None
    data, error = pair.data, pair.error
    try:
        try:
            port = int(data.header("port"))
            if not 0 < port < 65536:
                raise ValueError
        except ValueError:
            await error.write(f"invalid port {data.header('port')!r}".encode())
            return
        sock = await _dial(dial, pod_id, port, error.write)
        if sock is None:
            return
        await pipe(sock, _StreamReader(data), _SpdyWriter(data), on_pod_eof=data.close)
    except ConnectionError:
        pass  # the client reset the streams or left
    finally:
        data.close()
        error.close()


async def serve_spdy(request: web.Request, pod_id: str, dial: Dial,
                     idle_timeout: float) -> web.StreamResponse:
    negotiated = negotiate_spdy(request, (SPDY_PROTOCOL,))
    session = upgrade_spdy(request, negotiated, idle_timeout)
    try:
        await _spdy_session(session, pod_id, dial)
    except Exception:
        log.exception("port forward stream failed")  # upgraded: nothing may escape
    finally:
        await session.close()
    return Hijacked()


async def _spdy_session(session: SpdySession, pod_id: str, dial: Dial) -> None:
    pairs: dict[str, _Pair] = {}
    running: set[asyncio.Task[None]] = set()

    def expire(pair: _Pair) -> None:
        # One stream of a pair never came: drop what did come.
        if pairs.get(pair.request_id) is pair:
            del pairs[pair.request_id]
            for stream in (pair.error, pair.data):
                if stream is not None:
                    stream.reset()
            log.info("port forward streams incomplete; dropped", request_id=pair.request_id)

    try:
        while (stream := await session.accept()) is not None:
            kind = stream.header("streamType")
            if kind not in ("data", "error"):
                log.info("unexpected port forward stream", stream_type=kind)
                stream.refuse()
                continue
            stream.reply()
            request_id = _request_id(stream, kind)
            pair = pairs.get(request_id)
            if pair is None:
                pair = pairs[request_id] = _Pair(request_id)
                pair.timer = asyncio.get_running_loop().call_later(
                    STREAM_CREATION_TIMEOUT, expire, pair)
            if getattr(pair, kind) is not None:
                stream.reset()
                continue
            setattr(pair, kind, stream)
            if pair.data is not None and pair.error is not None:
                del pairs[request_id]
                if pair.timer is not None:
                    pair.timer.cancel()
                task = asyncio.create_task(_forward_pair(pair, pod_id, dial))
                running.add(task)
                task.add_done_callback(running.discard)
    finally:
        for pair in pairs.values():
            if pair.timer is not None:
                pair.timer.cancel()
        for task in list(running):
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


# -- WebSocket ---------------------------------------------------------------------------


async def serve_websocket(request: web.Request, pod_id: str, ports: list[int], dial: Dial,
                          idle_timeout: float) -> web.StreamResponse:
    protocol = negotiate_websocket(request, WEBSOCKET_BINARY + WEBSOCKET_BASE64)
    if not ports:
        try:
            ports = [int(p) for value in request.query.getall("port", [])
                     for p in value.split(",")]
        except ValueError:
            ports = []
        if not ports or not all(0 < p < 65536 for p in ports):
            raise UpgradeRefused(web.Response(status=400, text='query parameter "port" is '
                                              "required and must hold ports 1-65535"))
    ws = web.WebSocketResponse(protocols=(protocol,) if protocol else (),
                               max_msg_size=MAX_MESSAGE)
    await ws.prepare(request)
    try:
        await _websocket_session(ws, protocol, pod_id, ports, dial, idle_timeout)
    except Exception:
        log.exception("port forward stream failed")  # upgraded: nothing may escape
    finally:
        await ws.close()
    return ws


async def _websocket_session(ws: web.WebSocketResponse, protocol: str, pod_id: str,
                             ports: list[int], dial: Dial, idle_timeout: float) -> None:
    async def idle() -> None:
        log.info("stream idle; closing", idle_timeout=idle_timeout)
        await ws.close()

    with IdleWatch(idle_timeout, idle) as watch:
        channels = WsChannels(ws, protocol in WEBSOCKET_BASE64, watch)
        inputs = [ByteQueue() for _ in ports]
        for i, port in enumerate(ports):
            prefix = struct.pack("<H", port)
            await channels.send(2 * i, prefix)
            await channels.send(2 * i + 1, prefix)

        async def forward(i: int, port: int) -> None:
            sock = await _dial(dial, pod_id, port,
                               lambda message: channels.send(2 * i + 1, message))
            if sock is None:
                return
            await pipe(sock, inputs[i], channels.writer(2 * i))

        async def receive() -> None:
            async for msg in ws:
                watch.touch()
                decoded = channels.decode(msg)
                if decoded is not None and decoded[0] % 2 == 0 and decoded[0] // 2 < len(ports):
                    inputs[decoded[0] // 2].feed(decoded[1])
            for queue in inputs:
                queue.feed_eof()

        receiver = asyncio.create_task(receive())
        forwards = [asyncio.create_task(forward(i, port)) for i, port in enumerate(ports)]
        try:
            # Done when every port's connection ended, or when the client closed.
            everything: asyncio.Future[Any] = asyncio.gather(*forwards, return_exceptions=True)
            await asyncio.wait([everything, receiver], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (*forwards, receiver):
                task.cancel()
            await asyncio.gather(*forwards, receiver, return_exceptions=True)
