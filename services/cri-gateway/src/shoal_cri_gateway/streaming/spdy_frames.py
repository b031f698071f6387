"""SPDY/3.1 framing, sans I/O: frames to bytes and back, as Kubernetes streaming clients
(kubelet, crictl, kubectl through moby/spdystream) write them. No maintained Python library
speaks SPDY, so this follows the SPDY/3 specification:

- Control frames: `1 | version(15)=3 | type(16)`, `flags(8) | length(24)`, payload.
  Data frames: `0 | stream-id(31)`, `flags(8) | length(24)`, data; flag 0x01 is FIN.
- Name/value header blocks (SYN_STREAM, SYN_REPLY, HEADERS) are 32-bit counted, 32-bit
  length-prefixed lowercase names and values (several values joined by NUL), compressed
  with zlib seeded with the SPDY/3 dictionary; one compression context per direction for
  the whole connection, each block ended with a sync flush.

The session that drives these frames over a socket is `streaming/spdy.py`.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

VERSION = 3
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
FLAG_SETTINGS_CLEAR = 0x01
MAX_LENGTH = 0xFFFFFF  # a frame's 24-bit length field
MAX_HEADER_BLOCK = 256 * 1024  # decompressed; more is refused (a zlib bomb)
DEFAULT_WINDOW = 64 * 1024  # every stream's and the session's initial window (3.1)
MASK_31 = 0x7FFFFFFF  # stream ids and window deltas: 31 bits, the top one reserved


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
class _StreamHeaders:
    """SYN_REPLY and HEADERS carry the same fields and are encoded alike: a stream id and a
    header block; `kind` says which frame it is."""

    kind: ClassVar[FrameType]
    stream_id: int
    headers: Headers
    fin: bool = False


@dataclass(frozen=True)
class SynReply(_StreamHeaders):
    kind: ClassVar[FrameType] = FrameType.SYN_REPLY


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
class HeadersFrame(_StreamHeaders):
    kind: ClassVar[FrameType] = FrameType.HEADERS


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
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(block):
            raise SpdyError("header block is truncated")
        chunk = block[pos:pos + n]
        pos += n
        return chunk

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
                return struct.pack(">II", stream_id & MASK_31,
                                   ((FLAG_FIN if fin else 0) << 24) | len(data)) + data
            case SynStream(stream_id, headers, associated_id, priority, fin, unidirectional):
                flags = (FLAG_FIN if fin else 0) | (FLAG_UNIDIRECTIONAL if unidirectional else 0)
                return self._control(FrameType.SYN_STREAM, flags, struct.pack(
                    ">IIBB", stream_id, associated_id, (priority & 7) << 5, 0)
                    + self._compress(headers))
            case _StreamHeaders(stream_id, headers, fin):
                return self._control(frame.kind, FLAG_FIN if fin else 0,
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
                stream_id = word & MASK_31
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
                return SynStream(stream_id & MASK_31, self._headers(p[10:]),
                                 assoc & MASK_31, pri >> 5, bool(flags & FLAG_FIN),
                                 bool(flags & FLAG_UNIDIRECTIONAL))
            case FrameType.SYN_REPLY | FrameType.HEADERS:
                need(4)
                (stream_id,) = struct.unpack_from(">I", p)
                cls = SynReply if kind == FrameType.SYN_REPLY else HeadersFrame
                return cls(stream_id & MASK_31, self._headers(p[4:]), bool(flags & FLAG_FIN))
            case FrameType.RST_STREAM:
                need(8)
                stream_id, status = struct.unpack_from(">II", p)
                return RstStream(stream_id & MASK_31, status)
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
                last = struct.unpack_from(">I", p)[0] & MASK_31
                status = struct.unpack_from(">I", p, 4)[0] if len(p) >= 8 else 0
                return GoAway(last, status)
            case FrameType.WINDOW_UPDATE:
                need(8)
                stream_id, delta = struct.unpack_from(">II", p)
                return WindowUpdate(stream_id & MASK_31, delta & MASK_31)
        return None  # unknown control frames are ignored, as the spec asks
