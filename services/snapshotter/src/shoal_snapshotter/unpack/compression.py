"""Streaming decompression of layer blobs (gzip, zstd or plain tar)."""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO, Protocol, cast

from .errors import LayerFormatError

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer is 3.12+

try:
    # ISA-L's inflate (python-isal) reads the same gzip streams in well under half the CPU
    # time of zlib's (2.3x on the benchmark's layers; docs/benchmarks.md).
    from isal import igzip
    from isal import isal_zlib as _zlib

    _GzipFile: type[gzip.GzipFile] = igzip.GzipFile  # a gzip.GzipFile subclass
    GZIP_INFLATER = "isal"
    _GZIP_ERRORS: tuple[type[BaseException], ...] = (
        # isal's stub declares `error: Exception`; it is the exception class IsalError.
        EOFError, zlib.error, cast("type[Exception]", _zlib.error), gzip.BadGzipFile)
except ImportError:  # pragma: no cover - isal is a dependency, but zlib always works
    _GzipFile = gzip.GzipFile
    GZIP_INFLATER = "zlib"
    _GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_XZ_MAGIC = b"\xfd7zX"
_BZIP2_MAGIC = b"BZh"

_ALIASES = {
    "gzip": "gzip",
    "gz": "gzip",
    "zstd": "zstd",
    "zst": "zstd",
    "none": "none",
    "tar": "none",
    "identity": "none",
}

_BUFFER = 1 << 16


class Readable(Protocol):
    """What a layer is read from: BinaryIO, or a blocking io.RawIOBase (whose read() never
    returns None, which only non-blocking streams do)."""

    def read(self, size: int = -1, /) -> bytes | None: ...


def open_decompressed(stream: Readable, compression: str | None = None) -> BinaryIO:
    """Wrap `stream` in a reader yielding the tar bytes.

    `compression` is "gzip", "zstd", "none" (or an alias), or None to sniff the magic bytes.
    Decompression errors, including truncation, surface as LayerFormatError from read().
    The caller's stream is never closed.
    """
    source: Readable
    if compression is None:
        head = _read_upto(stream, 4)
        source = _Prefixed(head, stream)
        if head.startswith(GZIP_MAGIC):
            kind = "gzip"
        elif head == ZSTD_MAGIC:
            kind = "zstd"
        elif head == _XZ_MAGIC:
            raise LayerFormatError("unsupported layer compression: xz")
        elif head.startswith(_BZIP2_MAGIC):
            raise LayerFormatError("unsupported layer compression: bzip2")
        else:
            kind = "none"
    else:
        try:
            kind = _ALIASES[compression.lower()]
        except KeyError:
            raise LayerFormatError(f"unsupported layer compression: {compression!r}") from None
        source = stream

    if kind == "gzip":
        inner: Readable = _gzip_contents(_GzipFile(fileobj=cast(BinaryIO, source), mode="rb"))
        errors: tuple[type[BaseException], ...] = _GZIP_ERRORS
    elif kind == "zstd":
        inner, errors = _open_zstd(source)
    else:
        inner, errors = source, ()
    return cast(BinaryIO, io.BufferedReader(_Guarded(inner, errors, kind), _BUFFER))


def _gzip_contents(gz: gzip.GzipFile) -> Readable:
    """What reads `gz`'s contents with readinto, inflating into the caller's buffer.

    GzipFile has only read(), a new bytes object per call (a fresh allocation, so page
    faults, and a copy); its reader, the BufferedReader over the inflater that read() calls
    (`_buffer` in gzip and in isal alike, with the same checks: CRC, size, trailer), has
    readinto. `gz` stays referenced: closing it would close that reader.
    """
    buffer = getattr(gz, "_buffer", None)
    if not isinstance(buffer, io.BufferedReader):  # pragma: no cover - another gzip module
        return gz
    return _Contents(gz, buffer)


class _Contents:
    """A decompressed stream read through `reader`, while `owner` (whose reader it is) lives."""

    def __init__(self, owner: object, reader: io.BufferedReader) -> None:
        self._owner = owner
        self._reader = reader

    def read(self, size: int = -1, /) -> bytes:
        return self._reader.read(size)

    def readinto(self, b: Buffer, /) -> int:
        return self._reader.readinto(b)


def _readinto_of(stream: Readable) -> Callable[[Buffer], int | None] | None:
    """`stream`'s readinto, if it has one (Readable promises only read)."""
    readinto: Callable[[Buffer], int | None] | None = getattr(stream, "readinto", None)
    return readinto


def _read_upto(stream: Readable, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def _open_zstd(source: Readable) -> tuple[Readable, tuple[type[BaseException], ...]]:
    try:
        import zstandard
    except ImportError:
        raise LayerFormatError(
            "zstd-compressed layer, but the 'zstandard' package is not installed"
        ) from None
    tracked = _ZstdTracked(source)
    # zstandard's stub wants IO[bytes]; stream_reader only needs a read() method.
    reader = zstandard.ZstdDecompressor().stream_reader(
        tracked, read_across_frames=True, closefd=False  # type: ignore[arg-type]
    )
    return reader, (zstandard.ZstdError,)


class _ReadRaw(io.RawIOBase):
    """A readable raw stream made by its read(); readinto, what io.BufferedReader calls,
    goes through it."""

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        raise NotImplementedError

    def readinto(self, b: Buffer) -> int:
        # io.BufferedReader passes a memoryview; direct callers, a bytearray.
        assert isinstance(b, (bytearray, memoryview))
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class _Prefixed(_ReadRaw):
    """Replays the sniffed magic bytes, then the rest of the source."""

    def __init__(self, prefix: bytes, source: Readable) -> None:
        super().__init__()
        self._prefix = prefix
        self._source = source
        self._source_readinto = _readinto_of(source)

    def readinto(self, b: Buffer) -> int:
        if self._prefix or self._source_readinto is None:
            return super().readinto(b)
        return self._source_readinto(b) or 0  # straight into the decompressor's buffer

    def read(self, size: int | None = -1) -> bytes:
        if self._prefix:
            if size is None or size < 0:
                rest = self._source.read()
                assert rest is not None  # a blocking source (see Readable)
                data, self._prefix = self._prefix + rest, b""
                return data
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        chunk = self._source.read(-1 if size is None else size)
        assert chunk is not None  # a blocking source (see Readable)
        return chunk


class _Guarded(_ReadRaw):
    """Turns decompressor exceptions into LayerFormatError; never closes the inner stream."""

    def __init__(
        self, inner: Readable, errors: tuple[type[BaseException], ...], kind: str
    ) -> None:
        super().__init__()
        self._inner = inner
        self._inner_readinto = _readinto_of(inner)
        self._errors = errors
        self._kind = kind

    def read(self, size: int | None = -1) -> bytes:
        try:
            data = self._inner.read(-1 if size is None else size)
        except self._errors as e:
            raise LayerFormatError(f"corrupt {self._kind} stream: {e}") from e
        return bytes(data or b"")

    def readinto(self, b: Buffer) -> int:
        if self._inner_readinto is None:
            return super().readinto(b)
        try:
            return self._inner_readinto(b) or 0  # no copy, no allocation
        except self._errors as e:
            raise LayerFormatError(f"corrupt {self._kind} stream: {e}") from e


class _ZstdTracked(_ReadRaw):
    """Feeds the compressed bytes through a frame walker on their way to the decompressor.

    zstandard's stream reader reports a plain EOF when the input stops inside a frame, which
    would let a truncated blob pass as a shorter layer; the walker notices instead.
    """

    def __init__(self, source: Readable) -> None:
        super().__init__()
        self._source = source
        self._frames = ZstdFrameWalker()

    def read(self, size: int | None = -1) -> bytes:
        data = self._source.read(-1 if size is None else size) or b""
        if data:
            self._frames.feed(data)
        else:
            self._frames.finish()
        return bytes(data)


_ZSTD_FRAME = 0xFD2FB528
_SKIPPABLE_MASK = 0xFFFFFFF0
_SKIPPABLE = 0x184D2A50
# Header field sizes per walker state.
_NEED = {"magic": 4, "descriptor": 1, "block": 3, "skippable": 4}


class ZstdFrameWalker:
    """Tracks zstd frame structure (RFC 8878) from headers alone, without decompressing."""

    def __init__(self) -> None:
        self._state = "magic"
        self._header = bytearray()
        self._skip = 0
        self._after_skip = "magic"
        self._checksum = False
        self.frames = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self._skip:
                take = min(self._skip, end - pos)
                self._skip -= take
                pos += take
                if not self._skip:
                    self._state = self._after_skip
                continue
            need = _NEED[self._state] - len(self._header)
            take = min(need, end - pos)
            self._header += view[pos : pos + take]
            pos += take
            if take == need:
                header = bytes(self._header)
                self._header.clear()
                self._on_header(header)

    def finish(self) -> None:
        """Raise unless the input ended exactly between frames."""
        if self._state != "magic" or self._header or self._skip:
            raise LayerFormatError("corrupt zstd stream: input ends inside a frame")
        if not self.frames:
            raise LayerFormatError("corrupt zstd stream: no frames")

    def _skip_then(self, n: int, state: str) -> None:
        if n:
            self._skip, self._after_skip = n, state
        self._state = state

    def _on_header(self, header: bytes) -> None:
        value = int.from_bytes(header, "little")
        if self._state == "magic":
            if value == _ZSTD_FRAME:
                self._state = "descriptor"
            elif value & _SKIPPABLE_MASK == _SKIPPABLE:
                self._state = "skippable"
            else:
                raise LayerFormatError("corrupt zstd stream: bad frame magic")
        elif self._state == "skippable":
            self._skip_then(value, "magic")
        elif self._state == "descriptor":
            fcs_flag, single_segment = value >> 6, (value >> 5) & 1
            if value & 0x08:
                raise LayerFormatError("corrupt zstd stream: reserved header bit set")
            self._checksum = bool(value & 0x04)
            rest = (0 if single_segment else 1) + (0, 1, 2, 4)[value & 0x03]
            rest += (single_segment, 2, 4, 8)[fcs_flag]
            self._skip_then(rest, "block")
        else:  # block header
            last, block_type, size = value & 1, (value >> 1) & 3, value >> 3
            if block_type == 3:
                raise LayerFormatError("corrupt zstd stream: reserved block type")
            payload = 1 if block_type == 1 else size
            if last:
                self.frames += 1
                self._skip_then(payload + (4 if self._checksum else 0), "magic")
            else:
                self._skip_then(payload, "block")
