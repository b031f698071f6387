"""Remote command (exec, attach) as kubelet serves it to client-go.

SPDY/3.1: protocols `v4.channel.k8s.io`, `v3`, `v2` and `channel.k8s.io` (kube's
X-Stream-Protocol-Version negotiation, the client's preference first). The client opens one
stream per channel, named by its `streamType` header: error, stdin, stdout, stderr and
(v3+, with a TTY) resize. We reply to each, run the process, FIN the output streams and
report on the error stream: v4 writes a metav1.Status as JSON (the exit code of a failed
command is a cause of reason ExitCode); older protocols write only a failure's message.

WebSocket: subprotocols `v5.channel.k8s.io`, `v4.channel.k8s.io`, `channel.k8s.io` and their
base64 variants. Every message starts with its channel: 0 stdin, 1 stdout, 2 stderr,
3 error, 4 resize (base64 protocols: the channel as an ASCII digit, then base64 text).
v5 adds channel 255 from the client: `[255, n]` closes its channel n (stdin's EOF).
Resize payloads are a stream of JSON `{"Width": w, "Height": h}` on either transport.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import WSMsgType, web

from shoal_cri_gateway.domain.streams import ProcessIO, TerminalSize
from shoal_cri_gateway.streaming.spdy import SpdySession, SpdyStream
from shoal_cri_gateway.streaming.upgrade import (
    STREAM_CREATION_TIMEOUT,
    ByteQueue,
    Hijacked,
    IdleWatch,
    first_done,
    negotiate_spdy,
    negotiate_websocket,
    upgrade_spdy,
)

log = structlog.get_logger("shoal.cri.streaming")

V1 = "channel.k8s.io"
V2 = "v2.channel.k8s.io"
V3 = "v3.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V5 = "v5.channel.k8s.io"
V1_BASE64 = "base64.channel.k8s.io"
V4_BASE64 = "v4.base64.channel.k8s.io"
SPDY_PROTOCOLS = (V4, V3, V2, V1)
WEBSOCKET_PROTOCOLS = (V5, V4, V4_BASE64, V1, V1_BASE64)
JSON_STATUS = frozenset({V4, V5, V4_BASE64})  # protocols reporting a metav1.Status

STDIN, STDOUT, STDERR, ERROR, RESIZE = "stdin", "stdout", "stderr", "error", "resize"
CHANNELS = {STDIN: 0, STDOUT: 1, STDERR: 2, ERROR: 3, RESIZE: 4}
CLOSE_CHANNEL = 255  # v5: the client closes one of its channels
MAX_MESSAGE = 16 << 20


@dataclass(frozen=True)
class Options:
    """Which streams the CRI request asked for (kubelet serves what the RPC recorded)."""

    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool


Status = dict[str, Any]  # a metav1.Status as JSON
Run = Callable[[ProcessIO], Awaitable[Status]]


def success() -> Status:
    return {"metadata": {}, "status": "Success"}


def exit_failure(code: int, cmd: list[str]) -> Status:
    """What kubelet reports for a command that exited non-zero; clients read the code from
    the cause of reason ExitCode."""
    return {"metadata": {}, "status": "Failure",
            "message": f"command terminated with non-zero exit code: error executing command "
                       f"[{' '.join(cmd)}], exit code {code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


def internal_error(message: str) -> Status:
    return {"metadata": {}, "status": "Failure", "message": f"Internal error occurred: {message}",
            "reason": "InternalError", "details": {"causes": [{"message": message}]},
            "code": 500}


def status_bytes(status: Status, protocol: str) -> bytes:
    if protocol in JSON_STATUS:
        return json.dumps(status, separators=(",", ":")).encode()
    # Before v4 the error stream carries only a failure's text; success is silence.
    return b"" if status.get("status") == "Success" else str(status.get("message", "")).encode()


class ResizeDecoder:
    """A stream of JSON terminal sizes, split across frames anyhow, into a queue."""

    def __init__(self, queue: asyncio.Queue[TerminalSize]) -> None:
        self.queue = queue
        self._buf = ""
        self._decoder = json.JSONDecoder()
        self.broken = False

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        self._buf += data.decode("utf-8", "replace")
        while self._buf.strip():
            text = self._buf.lstrip()
            try:
                value, end = self._decoder.raw_decode(text)
            except json.JSONDecodeError:
                if len(text) > 4096:  # not JSON that is still arriving: give up, as kubelet
                    self.broken = True
                return
            self._buf = text[end:]
            try:
                size = TerminalSize(width=int(value["Width"]), height=int(value["Height"]))
            except (KeyError, TypeError, ValueError):
                log.info("ignoring a malformed resize message", message=str(value)[:200])
                continue
            if size.width > 0 and size.height > 0:
                self.queue.put_nowait(size)


class _SpdyWriter:
    def __init__(self, stream: SpdyStream) -> None:
        self.stream = stream

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)


async def _spdy_streams(session: SpdySession, protocol: str,
                        expected: int) -> dict[str, SpdyStream] | None:
    """Wait (bounded) until the client opened the streams we expect, replying to each."""
    allowed = {ERROR, STDIN, STDOUT, STDERR} | ({RESIZE} if protocol in (V3, V4) else set())
    streams: dict[str, SpdyStream] = {}
    try:
        async with asyncio.timeout(STREAM_CREATION_TIMEOUT):
            while len(streams) < expected:
                stream = await session.accept()
                if stream is None:
                    return None
                kind = stream.header("streamType")
                if kind not in allowed or kind in streams:
                    log.info("unexpected stream; closing", stream_type=kind)
                    return None
                stream.reply()
                streams[kind] = stream
    except TimeoutError:
        log.info("client did not create its streams in time", expected=expected,
                 got=sorted(streams))
        return None
    return streams


async def serve_spdy(request: web.Request, opts: Options, run: Run,
                     idle_timeout: float) -> web.StreamResponse:
    negotiated = negotiate_spdy(request, SPDY_PROTOCOLS)
    protocol = negotiated or V1  # a client that negotiates nothing speaks the first version
    session = upgrade_spdy(request, negotiated, idle_timeout)
    try:
        await _spdy_session(session, protocol, opts, run)
    except Exception:
        # The connection is ours now: aiohttp must not answer on it, so nothing escapes.
        log.exception("remote command stream failed")
    finally:
        await session.close()
    return Hijacked()


async def _spdy_session(session: SpdySession, protocol: str, opts: Options, run: Run) -> None:
    expected = 1 + opts.stdin + opts.stdout + opts.stderr + (opts.tty and protocol in (V3, V4))
    streams = await _spdy_streams(session, protocol, expected)
    if streams is None or ERROR not in streams:
        return
    io = ProcessIO(stdin=streams.get(STDIN),
                   stdout=_SpdyWriter(streams[STDOUT]) if STDOUT in streams else None,
                   stderr=_SpdyWriter(streams[STDERR]) if STDERR in streams else None)
    resize = streams.get(RESIZE)
    resizer = asyncio.create_task(_feed_resizes(resize, io)) if resize else None
    outcome: list[Status] = []

    async def execute() -> None:
        outcome.append(await run(io))

    try:
        finished = await first_done(execute(), session.closed.wait())
    finally:
        if resizer is not None:
            resizer.cancel()
    if not finished:
        return  # the client left
    for kind in (STDOUT, STDERR):
        if kind in streams:
            streams[kind].close()
    error = streams[ERROR]
    body = status_bytes(outcome[0], protocol)
    with contextlib.suppress(ConnectionError):
        if body:
            await error.write(body)
        error.close()


async def _feed_resizes(stream: SpdyStream, io: ProcessIO) -> None:
    decoder = ResizeDecoder(io.resizes)
    while data := await stream.read():
        decoder.feed(data)


class WsChannels:
    """Channel framing over one WebSocket, binary or base64 text."""

    def __init__(self, ws: web.WebSocketResponse, text: bool, watch: IdleWatch) -> None:
        self.ws = ws
        self.text = text
        self.watch = watch

    async def send(self, channel: int, data: bytes) -> None:
        self.watch.touch()
        if self.text:
            await self.ws.send_str(chr(ord("0") + channel) + base64.b64encode(data).decode())
        else:
            await self.ws.send_bytes(bytes([channel]) + data)

    def decode(self, msg: Any) -> tuple[int, bytes] | None:
        if msg.type == WSMsgType.BINARY and not self.text and msg.data:
            return msg.data[0], msg.data[1:]
        if msg.type == WSMsgType.TEXT and self.text and msg.data:
            try:
                return ord(msg.data[0]) - ord("0"), base64.b64decode(msg.data[1:])
            except (binascii.Error, ValueError):
                return None
        return None

    def writer(self, channel: int) -> WsWriter:
        return WsWriter(self, channel)


class WsWriter:
    def __init__(self, channels: WsChannels, channel: int) -> None:
        self.channels = channels
        self.channel = channel

    async def write(self, data: bytes) -> None:
        if self.channels.ws.closed:
            raise ConnectionResetError("the WebSocket is closed")
        await self.channels.send(self.channel, data)


async def serve_websocket(request: web.Request, opts: Options, run: Run,
                          idle_timeout: float) -> web.StreamResponse:
    protocol = negotiate_websocket(request, WEBSOCKET_PROTOCOLS)
    ws = web.WebSocketResponse(protocols=(protocol,), max_msg_size=MAX_MESSAGE)
    await ws.prepare(request)
    try:
        await _websocket_session(ws, protocol, opts, run, idle_timeout)
    except Exception:
        log.exception("remote command stream failed")  # upgraded: nothing may escape
    finally:
        await ws.close()
    return ws


async def _websocket_session(ws: web.WebSocketResponse, protocol: str, opts: Options, run: Run,
                             idle_timeout: float) -> None:
    async def idle() -> None:
        log.info("stream idle; closing", idle_timeout=idle_timeout)
        await ws.close()

    with IdleWatch(idle_timeout, idle) as watch:
        channels = WsChannels(ws, protocol in (V1_BASE64, V4_BASE64), watch)
        # An empty message on the first channel the client reads tells it we are ready.
        await channels.send(CHANNELS[STDOUT] if opts.stdout else CHANNELS[STDERR]
                            if opts.stderr else CHANNELS[ERROR], b"")
        stdin = ByteQueue() if opts.stdin else None
        io = ProcessIO(stdin=stdin,
                       stdout=channels.writer(CHANNELS[STDOUT]) if opts.stdout else None,
                       stderr=channels.writer(CHANNELS[STDERR]) if opts.stderr else None)
        resizes = ResizeDecoder(io.resizes)

        async def receive() -> None:
            async for msg in ws:
                watch.touch()
                decoded = channels.decode(msg)
                if decoded is None:
                    continue
                channel, data = decoded
                if channel == CHANNELS[STDIN] and stdin is not None:
                    stdin.feed(data)
                elif channel == CHANNELS[RESIZE]:
                    resizes.feed(data)
                elif (channel == CLOSE_CHANNEL and protocol == V5 and data[:1] ==
                      bytes([CHANNELS[STDIN]]) and stdin is not None):
                    stdin.feed_eof()
            if stdin is not None:
                stdin.feed_eof()

        outcome: list[Status] = []

        async def execute() -> None:
            outcome.append(await run(io))

        receiver = asyncio.create_task(receive())
        try:
            finished = await first_done(execute(), asyncio.shield(receiver))
        finally:
            receiver.cancel()
        if finished and not ws.closed:
            body = status_bytes(outcome[0], protocol)
            with contextlib.suppress(ConnectionError):
                if body:
                    await channels.send(CHANNELS[ERROR], body)
