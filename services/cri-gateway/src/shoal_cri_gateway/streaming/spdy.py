"""SPDY/3.1 framing and a server-side session, as Kubernetes streaming clients speak it.

kubelet, crictl and kubectl (client-go over moby/spdystream) upgrade an HTTP/1.1 request
to `SPDY/3.1` and then open one SPDY stream per channel (stdin, stdout, ..., or a data and
an error stream per forwarded connection). No maintained Python library speaks SPDY, so
the framing is here, from the SPDY/3 specification:

- Control frames: `1 | version(15)=3 | type(16)`, `flags(8) | length(24)`, payload.
  Data frames: `0 | stream-id(31)`, `flags(8) | length(24)`, data; flag 0x01 is FIN.
- Name/value header blocks (SYN_STREAM, SYN_REPLY, HEADERS) are 32-bit counted, 32-bit
  length-prefixed lowercase names and values (several values joined by NUL), compressed
  with zlib seeded with the SPDY/3 dictionary; one compression context per direction for
  the whole connection, each block ended with a sync flush.
- Flow control (3.1): every stream and the session start with a 64 KiB window that the
  receiver reopens with WINDOW_UPDATE. spdystream neither sends WINDOW_UPDATE nor honours
  it, so a sender that waited for windows would stall after 64 KiB with kubelet's peers:
  this session announces what it consumed (a 3.1 peer relies on that) and never waits for
  the peer's window; it bounds its own buffering by pausing the socket instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import structlog

log = structlog.get_logger("shoal.cri.spdy")

VERSION = 3
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
FLAG_SETTINGS_CLEAR = 0x01
MAX_LENGTH = 0xFFFFFF  # a frame's 24-bit length field
MAX_HEADER_BLOCK = 256 * 1024  # decompressed; more is refused (a zlib bomb)
DEFAULT_WINDOW = 64 * 1024
DATA_CHUNK = 32 * 1024  # outgoing data frames are cut to this size


class FrameType(IntEnum):
    SYN_STREAM = 1
    SYN_REPLY = 2
    RST_STREAM = 3
    SETTINGS = 4
    PING = 6
    GOAWAY = 7
    HEADERS = 8
    WINDOW_UPDATE = 9


class RstStatus(IntEnum):
    PROTOCOL_ERROR = 1
    INVALID_STREAM = 2
    REFUSED_STREAM = 3
    UNSUPPORTED_VERSION = 4
    CANCEL = 5
    INTERNAL_ERROR = 6
    FLOW_CONTROL_ERROR = 7
    STREAM_IN_USE = 8
    STREAM_ALREADY_CLOSED = 9
    FRAME_TOO_LARGE = 11


class GoAwayStatus(IntEnum):
    OK = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


# The SPDY/3 header compression dictionary (spec section 2.6.10.1): common header names and
# values, each with a 32-bit length prefix, then a run of status codes, dates, media types.
_DICT_WORDS = (
    *"""options head post put delete trace accept accept-charset accept-encoding
    accept-language accept-ranges age allow authorization cache-control connection
    content-base content-encoding content-language content-length content-location
    content-md5 content-range content-type date etag expect expires from host if-match
    if-modified-since if-none-match if-range if-unmodified-since last-modified location
    max-forwards pragma proxy-authenticate proxy-authorization range referer retry-after
    server te trailer transfer-encoding upgrade user-agent vary via warning
    www-authenticate method get status""".split(),
    "200 OK",
    *"version HTTP/1.1 url public set-cookie keep-alive origin".split(),
)
_DICT_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502"
    "504505203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad "
    "Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not "
    "Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec "
    "00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,"
    "image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,"
    "publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.")


def _dictionary() -> bytes:
    return b"".join(struct.pack(">I", len(w)) + w.encode() for w in _DICT_WORDS) + \
        _DICT_TAIL.encode()


DICTIONARY = _dictionary()
DICTIONARY_ADLER32 = 0xE3C6A7C2  # the spec's dictionary id, checked by the tests


class SpdyError(Exception):
    """A violation of the protocol by the peer: the session is ended with GOAWAY."""


# -- frames ---------------------------------------------------------------------------------

Headers = dict[str, list[str]]


@dataclass(frozen=True)
class DataFrame:
    stream_id: int
    data: bytes
    fin: bool = False


@dataclass(frozen=True)
class SynStream:
    stream_id: int
    headers: Headers
    associated_id: int = 0
    priority: int = 0
    fin: bool = False
    unidirectional: bool = False


@dataclass(frozen=True)
class SynReply:
    stream_id: int
    headers: Headers
    fin: bool = False


@dataclass(frozen=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True)
class Settings:
    values: dict[int, int]  # id -> value
    clear: bool = False


@dataclass(frozen=True)
class Ping:
    ping_id: int


@dataclass(frozen=True)
class GoAway:
    last_good_stream_id: int
    status: int = GoAwayStatus.OK


@dataclass(frozen=True)
class HeadersFrame:
    stream_id: int
    headers: Headers
    fin: bool = False


@dataclass(frozen=True)
class WindowUpdate:
    stream_id: int  # 0 = the session's window (3.1)
    delta: int


Frame = (DataFrame | SynStream | SynReply | RstStream | Settings | Ping | GoAway
         | HeadersFrame | WindowUpdate)


def pack_headers(headers: Headers) -> bytes:
    out = [struct.pack(">I", len(headers))]
    for name, values in headers.items():
        raw_name, raw_value = name.lower().encode(), b"\0".join(v.encode() for v in values)
        out += [struct.pack(">I", len(raw_name)), raw_name,
                struct.pack(">I", len(raw_value)), raw_value]
    return b"".join(out)


def unpack_headers(block: bytes) -> Headers:
    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(block):
            raise SpdyError("header block is truncated")
        chunk = block[pos:pos + n]
        pos += n
        return chunk

    pos = 0
    (count,) = struct.unpack(">I", take(4))
    headers: Headers = {}
    for _ in range(count):
        (n,) = struct.unpack(">I", take(4))
        name = take(n).decode("latin-1").lower()
        (n,) = struct.unpack(">I", take(4))
        value = take(n).decode("latin-1")
        if not name or name in headers:
            raise SpdyError(f"header block has an empty or repeated name {name!r}")
        headers[name] = value.split("\0")
    if pos != len(block):
        raise SpdyError("header block has trailing bytes")
    return headers


class FrameEncoder:
    """Frames to bytes; owns this direction's header compression context, so frames must
    be written in the order they are encoded."""

    def __init__(self) -> None:
        self._zlib = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8,
                                      zlib.Z_DEFAULT_STRATEGY, zdict=DICTIONARY)

    def _compress(self, headers: Headers) -> bytes:
        block = pack_headers(headers)
        return self._zlib.compress(block) + self._zlib.flush(zlib.Z_SYNC_FLUSH)

    @staticmethod
    def _control(kind: FrameType, flags: int, payload: bytes) -> bytes:
        if len(payload) > MAX_LENGTH:
            raise ValueError(f"{kind.name} payload of {len(payload)} bytes is too large")
        return struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload

    def encode(self, frame: Frame) -> bytes:
        match frame:
            case DataFrame(stream_id, data, fin):
                if len(data) > MAX_LENGTH:
                    raise ValueError(f"data frame of {len(data)} bytes is too large")
                return struct.pack(">II", stream_id & 0x7FFFFFFF,
                                   ((FLAG_FIN if fin else 0) << 24) | len(data)) + data
            case SynStream(stream_id, headers, associated_id, priority, fin, unidirectional):
                flags = (FLAG_FIN if fin else 0) | (FLAG_UNIDIRECTIONAL if unidirectional else 0)
                return self._control(FrameType.SYN_STREAM, flags, struct.pack(
                    ">IIBB", stream_id, associated_id, (priority & 7) << 5, 0)
                    + self._compress(headers))
            case SynReply(stream_id, headers, fin):
                return self._control(FrameType.SYN_REPLY, FLAG_FIN if fin else 0,
                                     struct.pack(">I", stream_id) + self._compress(headers))
            case HeadersFrame(stream_id, headers, fin):
                return self._control(FrameType.HEADERS, FLAG_FIN if fin else 0,
                                     struct.pack(">I", stream_id) + self._compress(headers))
            case RstStream(stream_id, status):
                return self._control(FrameType.RST_STREAM, 0,
                                     struct.pack(">II", stream_id, status))
            case Settings(values, clear):
                body = struct.pack(">I", len(values)) + b"".join(
                    struct.pack(">II", key & 0xFFFFFF, value) for key, value in values.items())
                return self._control(FrameType.SETTINGS, FLAG_SETTINGS_CLEAR if clear else 0,
                                     body)
            case Ping(ping_id):
                return self._control(FrameType.PING, 0, struct.pack(">I", ping_id))
            case GoAway(last_good, status):
                return self._control(FrameType.GOAWAY, 0, struct.pack(">II", last_good, status))
            case WindowUpdate(stream_id, delta):
                return self._control(FrameType.WINDOW_UPDATE, 0,
                                     struct.pack(">II", stream_id, delta))
        raise TypeError(f"not a SPDY frame: {frame!r}")


class FrameDecoder:
    """Bytes to frames, incrementally; owns the peer's header decompression context."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._zlib = zlib.decompressobj(zdict=DICTIONARY)

    def _headers(self, compressed: bytes) -> Headers:
        try:
            block = self._zlib.decompress(compressed, MAX_HEADER_BLOCK)
        except zlib.error as exc:
            raise SpdyError(f"header block does not decompress: {exc}") from None
        if self._zlib.unconsumed_tail:
            raise SpdyError(f"header block is larger than {MAX_HEADER_BLOCK} bytes")
        return unpack_headers(block)

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= 8:
            word, flags_length = struct.unpack_from(">II", self._buf)
            length = flags_length & MAX_LENGTH
            if len(self._buf) < 8 + length:
                break
            payload = bytes(self._buf[8:8 + length])
            del self._buf[:8 + length]
            flags = flags_length >> 24
            if word & 0x80000000:
                frame = self._control(word >> 16 & 0x7FFF, word & 0xFFFF, flags, payload)
                if frame is not None:
                    frames.append(frame)
            else:
                stream_id = word & 0x7FFFFFFF
                if stream_id == 0:
                    raise SpdyError("data frame on stream 0")
                frames.append(DataFrame(stream_id, payload, bool(flags & FLAG_FIN)))
        return frames

    def _control(self, version: int, kind: int, flags: int, p: bytes) -> Frame | None:
        if version != VERSION:
            raise SpdyError(f"SPDY version {version} is not supported (only {VERSION})")

        def need(n: int) -> None:
            if len(p) < n:
                raise SpdyError(f"control frame type {kind} is too short ({len(p)} bytes)")

        match kind:
            case FrameType.SYN_STREAM:
                need(10)
                stream_id, assoc, pri = struct.unpack_from(">IIB", p)
                return SynStream(stream_id & 0x7FFFFFFF, self._headers(p[10:]),
                                 assoc & 0x7FFFFFFF, pri >> 5, bool(flags & FLAG_FIN),
                                 bool(flags & FLAG_UNIDIRECTIONAL))
            case FrameType.SYN_REPLY | FrameType.HEADERS:
                need(4)
                (stream_id,) = struct.unpack_from(">I", p)
                cls = SynReply if kind == FrameType.SYN_REPLY else HeadersFrame
                return cls(stream_id & 0x7FFFFFFF, self._headers(p[4:]), bool(flags & FLAG_FIN))
            case FrameType.RST_STREAM:
                need(8)
                stream_id, status = struct.unpack_from(">II", p)
                return RstStream(stream_id & 0x7FFFFFFF, status)
            case FrameType.SETTINGS:
                need(4)
                (count,) = struct.unpack_from(">I", p)
                need(4 + 8 * count)
                values = {}
                for i in range(count):
                    key, value = struct.unpack_from(">II", p, 4 + 8 * i)
                    values[key & 0xFFFFFF] = value
                return Settings(values, bool(flags & FLAG_SETTINGS_CLEAR))
            case FrameType.PING:
                need(4)
                return Ping(struct.unpack_from(">I", p)[0])
            case FrameType.GOAWAY:
                need(4)  # SPDY/2 peers send no status
                last = struct.unpack_from(">I", p)[0] & 0x7FFFFFFF
                status = struct.unpack_from(">I", p, 4)[0] if len(p) >= 8 else 0
                return GoAway(last, status)
            case FrameType.WINDOW_UPDATE:
                need(8)
                stream_id, delta = struct.unpack_from(">II", p)
                return WindowUpdate(stream_id & 0x7FFFFFFF, delta & 0x7FFFFFFF)
        return None  # unknown control frames are ignored, as the spec asks


# -- session --------------------------------------------------------------------------------


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
