"""A minimal SPDY/3.1 client for tests, written from the SPDY/3 draft and the Kubernetes
streaming conventions, independent of the gateway's own implementation: it upgrades a
request as client-go does, opens streams with odd ids, waits for each SYN_REPLY, and
reads frames like moby/spdystream (no flow control of its own)."""

from __future__ import annotations

import asyncio
import struct
import zlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# The SPDY/3 name/value dictionary: these words, each preceded by its 32-bit length...
_WORDS = [
    "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset",
    "accept-encoding", "accept-language", "accept-ranges", "age", "allow", "authorization",
    "cache-control", "connection", "content-base", "content-encoding", "content-language",
    "content-length", "content-location", "content-md5", "content-range", "content-type",
    "date", "etag", "expect", "expires", "from", "host", "if-match", "if-modified-since",
    "if-none-match", "if-range", "if-unmodified-since", "last-modified", "location",
    "max-forwards", "pragma", "proxy-authenticate", "proxy-authorization", "range",
    "referer", "retry-after", "server", "te", "trailer", "transfer-encoding", "upgrade",
    "user-agent", "vary", "via", "warning", "www-authenticate", "method", "get", "status",
    "200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin",
]
# ...then this text as is.
_TAIL = ("100101201202205206300302303304305306307402405406407408409410411412413414415416417"
         "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently"
         "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server "
         "Error501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug "
         "Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,"
         "image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
         "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset="
         "iso-8859-1,utf-,*,enq=0.")
SPDY_DICT = b"".join(len(w).to_bytes(4, "big") + w.encode() for w in _WORDS) + _TAIL.encode()

SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = (
    1, 2, 3, 4, 6, 7, 8, 9)
FIN = 1


class UpgradeFailed(Exception):
    def __init__(self, status: int, headers: dict[str, list[str]], body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.headers = headers
        self.body = body


@dataclass
class ClientStream:
    conn: SpdyClient
    id: int
    replied: asyncio.Event = field(default_factory=asyncio.Event)
    inbox: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    reset_status: int = 0
    fin_received: bool = False

    async def send(self, data: bytes, fin: bool = False) -> None:
        self.conn.write(struct.pack(">II", self.id, (FIN if fin else 0) << 24 | len(data)) + data)
        await self.conn.writer.drain()

    async def close(self) -> None:
        await self.send(b"", fin=True)

    async def reset(self, status: int = 5) -> None:
        self.conn.control(RST_STREAM, 0, struct.pack(">II", self.id, status))
        await self.conn.writer.drain()

    async def recv(self) -> bytes:
        """Next data; b"" at FIN, reset or end of connection."""
        data = await self.inbox.get()
        if not data:
            self.inbox.put_nowait(b"")
        return data

    async def read_all(self, timeout: float = 20) -> bytes:
        out = b""
        async with asyncio.timeout(timeout):
            while chunk := await self.recv():
                out += chunk
        return out

    async def read_until(self, marker: bytes, timeout: float = 20) -> bytes:
        out = b""
        async with asyncio.timeout(timeout):
            while marker not in out:
                chunk = await self.recv()
                assert chunk, f"stream ended before {marker!r}; got {out!r}"
                out += chunk
        return out


class SpdyClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 protocol: str) -> None:
        self.reader = reader
        self.writer = writer
        self.protocol = protocol  # what the server negotiated ("" = none)
        self._deflate = zlib.compressobj(zdict=SPDY_DICT)
        self._inflate = zlib.decompressobj(zdict=SPDY_DICT)
        self._next_id = 1
        self.streams: dict[int, ClientStream] = {}
        self.goaway: tuple[int, int] | None = None
        self.window_updates: list[tuple[int, int]] = []
        self.pongs: asyncio.Queue[int] = asyncio.Queue()
        self.closed = asyncio.Event()
        self._task = asyncio.create_task(self._read_frames())

    @classmethod
    async def connect(cls, url: str, protocols: list[str]) -> SpdyClient:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        lines = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}",
                 "Connection: Upgrade", "Upgrade: SPDY/3.1", "Content-Length: 0"]
        lines += [f"X-Stream-Protocol-Version: {p}" for p in protocols]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        status_line, *header_lines = head.strip().split("\r\n")
        status = int(status_line.split()[1])
        headers: dict[str, list[str]] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        if status != 101:
            length = int(headers.get("content-length", ["0"])[0])
            body = await reader.readexactly(length) if length else b""
            writer.close()
            raise UpgradeFailed(status, headers, body)
        assert headers["upgrade"] == ["SPDY/3.1"], headers
        return cls(reader, writer, headers.get("x-stream-protocol-version", [""])[0])

    # -- writing -----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def control(self, kind: int, flags: int, payload: bytes) -> None:
        self.write(struct.pack(">HHI", 0x8003, kind, flags << 24 | len(payload)) + payload)

    def _header_block(self, headers: dict[str, str]) -> bytes:
        raw = struct.pack(">I", len(headers))
        for name, value in headers.items():
            raw += struct.pack(">I", len(name)) + name.lower().encode()
            raw += struct.pack(">I", len(value)) + value.encode()
        return self._deflate.compress(raw) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    async def open_stream(self, headers: dict[str, str], timeout: float = 10) -> ClientStream:
        stream = ClientStream(self, self._next_id)
        self._next_id += 2
        self.streams[stream.id] = stream
        self.control(SYN_STREAM, 0, struct.pack(">IIBB", stream.id, 0, 0, 0)
                     + self._header_block(headers))
        await self.writer.drain()
        async with asyncio.timeout(timeout):
            await stream.replied.wait()
        if stream.reset_status:
            raise ConnectionResetError(f"stream refused ({stream.reset_status})")
        return stream

    async def open_streams(self, *kinds: str) -> list[ClientStream]:
        """A stream of each streamType, opened one after another in this order."""
        return [await self.open_stream({"streamType": kind}) for kind in kinds]

    @property
    def last_stream_id(self) -> int:
        return self._next_id - 2

    async def ping(self, ping_id: int = 1, timeout: float = 5) -> None:
        self.control(PING, 0, struct.pack(">I", ping_id))
        await self.writer.drain()
        async with asyncio.timeout(timeout):
            assert await self.pongs.get() == ping_id

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
        self._task.cancel()

    # -- reading -----------------------------------------------------------------------

    def _headers(self, compressed: bytes) -> dict[str, list[str]]:
        raw = self._inflate.decompress(compressed)
        (count,) = struct.unpack_from(">I", raw)
        pos, out = 4, {}
        for _ in range(count):
            (n,) = struct.unpack_from(">I", raw, pos)
            name = raw[pos + 4:pos + 4 + n].decode()
            pos += 4 + n
            (n,) = struct.unpack_from(">I", raw, pos)
            out[name] = raw[pos + 4:pos + 4 + n].decode().split("\0")
            pos += 4 + n
        return out

    def _end(self, stream: ClientStream) -> None:
        stream.replied.set()
        stream.inbox.put_nowait(b"")

    async def _read_frames(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(8)
                first, second = struct.unpack(">II", head)
                flags, length = second >> 24, second & 0xFFFFFF
                payload = await self.reader.readexactly(length)
                if not first & 0x80000000:
                    stream = self.streams.get(first)
                    if stream is not None:
                        if payload:
                            stream.inbox.put_nowait(payload)
                        if flags & FIN:
                            stream.fin_received = True
                            self._end(stream)
                    continue
                assert (first >> 16) & 0x7FFF == 3, "server must speak SPDY version 3"
                kind = first & 0xFFFF
                if kind in (SYN_REPLY, HEADERS):
                    (sid,) = struct.unpack_from(">I", payload)
                    self._headers(payload[4:])  # keeps the shared zlib context in step
                    if kind == SYN_REPLY and sid in self.streams:
                        self.streams[sid].replied.set()
                elif kind == RST_STREAM:
                    sid, status = struct.unpack(">II", payload)
                    if sid in self.streams:
                        self.streams[sid].reset_status = status
                        self._end(self.streams[sid])
                elif kind == PING:
                    self.pongs.put_nowait(struct.unpack(">I", payload)[0])
                elif kind == GOAWAY:
                    self.goaway = struct.unpack(">II", payload)
                elif kind == WINDOW_UPDATE:
                    sid, delta = struct.unpack(">II", payload)
                    self.window_updates.append((sid, delta))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for stream in self.streams.values():
                self._end(stream)
            self.closed.set()
