"""The server side of a SPDY/3.1 session, as Kubernetes streaming clients speak it.

kubelet, crictl and kubectl (client-go over moby/spdystream) upgrade an HTTP/1.1 request
to `SPDY/3.1` and then open one SPDY stream per channel (stdin, stdout, ..., or a data and
an error stream per forwarded connection). The frames themselves are `spdy_frames.py`;
this module is the asyncio side: streams, ping, GOAWAY, idle timeout, buffering.

Flow control (3.1): every stream and the session start with a 64 KiB window that the
receiver reopens with WINDOW_UPDATE. spdystream neither sends WINDOW_UPDATE nor honours
it, so a sender that waited for windows would stall after 64 KiB with kubelet's peers:
this session announces what it consumed (a 3.1 peer relies on that) and never waits for
the peer's window; it bounds its own buffering by pausing the socket instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

import structlog

from shoal_cri_gateway.streaming.spdy_frames import (
    DEFAULT_WINDOW,
    DataFrame,
    Frame,
    FrameDecoder,
    FrameEncoder,
    GoAway,
    GoAwayStatus,
    HeadersFrame,
    Ping,
    RstStatus,
    RstStream,
    Settings,
    SpdyError,
    SynReply,
    SynStream,
    WindowUpdate,
)

log = structlog.get_logger("shoal.cri.spdy")

DATA_CHUNK = 32 * 1024  # outgoing data frames are cut to this size

class SpdyStream:
    """One stream the peer opened: read what it sends, write back, FIN, reset."""

    def __init__(self, session: SpdySession, frame: SynStream) -> None:
        self.session = session
        self.id = frame.stream_id
        self.headers = frame.headers
        self.replied = False
        self._chunks: deque[bytes] = deque()
        self._remote_done = frame.fin  # FIN (or reset): nothing more will arrive
        self._local_done = frame.unidirectional
        self.was_reset = False
        self._readable = asyncio.Event()
        self._unacked = 0
        if self._remote_done:
            self._readable.set()

    def header(self, name: str) -> str:
        values = self.headers.get(name.lower())
        return values[0] if values else ""

    def reply(self) -> None:
        """Accept the stream (SYN_REPLY): the peer sends nothing before it."""
        if not self.replied:
            self.replied = True
            self.session.send(SynReply(self.id, {}))

    def refuse(self) -> None:
        self.reset(RstStatus.REFUSED_STREAM)

    def reset(self, status: int = RstStatus.CANCEL) -> None:
        if not self.was_reset:
            self._local_done = True
            self._on_reset()
            self.session.send(RstStream(self.id, status))
            self.session.forget(self.id)

    async def read(self) -> bytes:
        """The next bytes the peer sent; b"" once it sent FIN, reset, or the session ended."""
        while not self._chunks:
            if self._remote_done:
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = self._chunks.popleft()
        self.session.consumed(self, len(chunk))
        return chunk

    async def write(self, data: bytes) -> None:
        if self._local_done:
            raise ConnectionResetError(f"SPDY stream {self.id} is closed")
        for i in range(0, len(data), DATA_CHUNK):
            self.session.send(DataFrame(self.id, data[i:i + DATA_CHUNK]))
            await self.session.drain()

    def close(self) -> None:
        """Half-close: FIN on our side (the peer may still send)."""
        if not self._local_done:
            self._local_done = True
            self.session.send(DataFrame(self.id, b"", fin=True))
            if self._remote_done:
                self.session.forget(self.id)

    # Called by the session.
    def _on_data(self, frame: DataFrame) -> None:
        if frame.data:
            self._chunks.append(frame.data)
        if frame.fin:
            self._remote_done = True
            if self._local_done:
                self.session.forget(self.id)
        self._readable.set()

    def _on_reset(self) -> None:
        self.was_reset = True
        self._remote_done = self._local_done = True
        self._readable.set()


class SpdySession(asyncio.Protocol):
    """The server side of a SPDY connection taken over after an HTTP upgrade: it accepts the
    streams the peer opens (the Kubernetes protocols never open any from the server)."""

    def __init__(self, *, idle_timeout: float, on_lost: Callable[[Exception | None], None]
                 | None = None, max_buffered: int = 1 << 20) -> None:
        self._idle_timeout = idle_timeout
        self._on_lost = on_lost
        self._max_buffered = max_buffered
        self._encoder = FrameEncoder()
        self._decoder = FrameDecoder()
        self._streams: dict[int, SpdyStream] = {}
        self._new: asyncio.Queue[SpdyStream | None] = asyncio.Queue()
        self._last_peer_stream = 0
        self._going_away = False
        self.closed = asyncio.Event()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._session_unacked = 0  # consumed, not yet announced with WINDOW_UPDATE
        self._buffered = 0
        self._reading_paused = False
        self._transport: asyncio.Transport | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._active = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        self._active = True
        try:
            for frame in self._decoder.feed(data):
                self._dispatch(frame)
        except SpdyError as exc:
            log.info("SPDY protocol error; closing", error=str(exc))
            self.send(GoAway(self._last_peer_stream, GoAwayStatus.PROTOCOL_ERROR))
            self.abort()

    def eof_received(self) -> bool:
        self._end_streams()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._can_write.set()
        self._end_streams()
        if self._idle is not None:
            self._idle.cancel()
        self.closed.set()
        if self._on_lost is not None:
            self._on_lost(exc)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- frames ----------------------------------------------------------------------------

    def _dispatch(self, frame: Frame) -> None:
        match frame:
            case DataFrame():
                stream = self._streams.get(frame.stream_id)
                if stream is None or stream._remote_done:
                    # A stream we reset or that ended: tell the peer, keep the session.
                    self.send(RstStream(frame.stream_id, RstStatus.INVALID_STREAM
                                        if stream is None else RstStatus.STREAM_ALREADY_CLOSED))
                    return
                stream._on_data(frame)
                self._buffered += len(frame.data)
                if self._buffered > self._max_buffered and not self._reading_paused:
                    self._reading_paused = True
                    if self._transport is not None:
                        self._transport.pause_reading()
            case SynStream():
                self._on_syn_stream(frame)
            case RstStream():
                stream = self._streams.pop(frame.stream_id, None)
                if stream is not None:
                    stream._on_reset()
            case Ping():
                if frame.ping_id % 2 == 1:  # the peer's (client ids are odd): echo it
                    self.send(frame)
            case GoAway():
                self._going_away = True
                self._new.put_nowait(None)
            case Settings() | SynReply() | HeadersFrame() | WindowUpdate():
                # Nothing to do: we open no streams, extra headers carry nothing Kubernetes
                # uses, and we do not wait for the peer's windows (see the module comment).
                pass

    def _on_syn_stream(self, frame: SynStream) -> None:
        sid = frame.stream_id
        if sid % 2 == 0 or sid <= self._last_peer_stream:
            self.send(RstStream(sid, RstStatus.PROTOCOL_ERROR))
            return
        self._last_peer_stream = sid
        if self._going_away:
            self.send(RstStream(sid, RstStatus.REFUSED_STREAM))
            return
        stream = SpdyStream(self, frame)
        self._streams[sid] = stream
        self._new.put_nowait(stream)

    def send(self, frame: Frame) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._active = True
            self._transport.write(self._encoder.encode(frame))

    async def drain(self) -> None:
        await self._can_write.wait()

    def consumed(self, stream: SpdyStream, n: int) -> None:
        """The application read `n` bytes: free the buffer, reopen the windows."""
        self._buffered -= n
        if self._reading_paused and self._buffered <= self._max_buffered // 4:
            self._reading_paused = False
            if self._transport is not None:
                self._transport.resume_reading()
        threshold = DEFAULT_WINDOW // 2  # we announce no other window size
        stream._unacked += n
        if stream._unacked >= threshold and not stream._remote_done:
            self.send(WindowUpdate(stream.id, stream._unacked))
            stream._unacked = 0
        self._session_unacked += n
        if self._session_unacked >= threshold:
            self.send(WindowUpdate(0, self._session_unacked))
            self._session_unacked = 0

    def forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    # -- application side ------------------------------------------------------------------

    async def accept(self) -> SpdyStream | None:
        """The next stream the peer opened; None once it went away or the connection ended."""
        if self.closed.is_set() and self._new.empty():
            return None
        return await self._new.get()

    async def close(self, linger: float = 2.0) -> None:
        """GOAWAY, then close gracefully: our side first, then wait (briefly) for the peer
        to close its side, so what we wrote last is not lost to a TCP reset."""
        self._going_away = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self.send(GoAway(self._last_peer_stream, GoAwayStatus.OK))
        if transport.can_write_eof():
            with contextlib.suppress(OSError):  # the peer may be gone already
                transport.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(linger):
                await self.closed.wait()
        transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _end_streams(self) -> None:
        for stream in list(self._streams.values()):
            stream._on_reset()
        self._streams.clear()
        self._new.put_nowait(None)

    def _arm_idle(self) -> None:
        def check() -> None:
            if self._transport is None:
                return
            if not self._active:
                log.info("SPDY connection idle; closing", idle_timeout=self._idle_timeout)
                self.abort()
                return
            self._active = False
            self._arm_idle()

        self._idle = asyncio.get_running_loop().call_later(self._idle_timeout, check)
