"""SPDY/3.1 framing and the server session of the gateway's streaming server, against bytes
written out from the SPDY/3 draft's frame layouts (not produced by the code under test)."""

from __future__ import annotations

import asyncio
import struct
import zlib

import pytest
from shoal_cri_gateway.streaming import spdy_frames
from shoal_cri_gateway.streaming.spdy import SpdySession
from shoal_cri_gateway.streaming.spdy_frames import (
    DataFrame,
    FrameDecoder,
    FrameEncoder,
    GoAway,
    HeadersFrame,
    Ping,
    RstStream,
    Settings,
    SpdyError,
    SynReply,
    SynStream,
    WindowUpdate,
)


def test_dictionary_is_the_spec_one() -> None:
    # zlib names a preset dictionary by its Adler-32; SPDY/3 peers all use this one.
    assert len(spdy_frames.DICTIONARY) == 1423
    assert zlib.adler32(spdy_frames.DICTIONARY) == spdy_frames.DICTIONARY_ADLER32 == 0xE3C6A7C2
    assert spdy_frames.DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert spdy_frames.DICTIONARY.endswith(b"charset=iso-8859-1,utf-,*,enq=0.")


@pytest.mark.parametrize(("raw", "frame"), [
    # PING id 1: control bit + version 3, type 6, no flags, length 4.
    (bytes.fromhex("80030006 00000004 00000001"), Ping(1)),
    # RST_STREAM stream 3, status CANCEL (5).
    (bytes.fromhex("80030003 00000008 00000003 00000005"), RstStream(3, 5)),
    # GOAWAY last good stream 7, status OK.
    (bytes.fromhex("80030007 00000008 00000007 00000000"), GoAway(7, 0)),
    # WINDOW_UPDATE stream 1, delta 32768.
    (bytes.fromhex("80030009 00000008 00000001 00008000"), WindowUpdate(1, 32768)),
    # SETTINGS: one entry, flags 0, id 7 (initial window), value 65536.
    (bytes.fromhex("80030004 0000000c 00000001 00000007 00010000"), Settings({7: 65536})),
    # DATA on stream 5 with FIN: "hi".
    (bytes.fromhex("00000005 01000002 6869"), DataFrame(5, b"hi", fin=True)),
    (bytes.fromhex("00000005 00000000"), DataFrame(5, b"")),
])
def test_frames_known_bytes(raw: bytes, frame: spdy_frames.Frame) -> None:
    assert FrameDecoder().feed(raw) == [frame]
    assert FrameEncoder().encode(frame) == raw


def _compressed_block(pairs: list[tuple[bytes, bytes]], deflate: object) -> bytes:
    """A name/value block as the draft lays it out: 32-bit count, then 32-bit length-prefixed
    names and values, zlib-compressed with the dictionary and sync-flushed."""
    raw = struct.pack(">I", len(pairs)) + b"".join(
        struct.pack(">I", len(n)) + n + struct.pack(">I", len(v)) + v for n, v in pairs)
    return deflate.compress(raw) + deflate.flush(zlib.Z_SYNC_FLUSH)  # type: ignore[attr-defined]


def test_syn_streams_share_one_compression_context() -> None:
    deflate = zlib.compressobj(zdict=spdy_frames.DICTIONARY)
    decoder = FrameDecoder()
    frames = []
    for sid, kind in ((1, b"error"), (3, b"stdout")):
        block = _compressed_block([(b"streamtype", kind), (b"port", b"80\x0081")], deflate)
        payload = struct.pack(">IIBB", sid, 0, 0x60, 0) + block
        frames += decoder.feed(struct.pack(">HHI", 0x8003, 1, len(payload)) + payload)
    assert frames == [
        SynStream(1, {"streamtype": ["error"], "port": ["80", "81"]}, priority=3),
        SynStream(3, {"streamtype": ["stdout"], "port": ["80", "81"]}, priority=3)]
    # The second block only decodes with the first one's history.
    with pytest.raises(SpdyError):
        FrameDecoder().feed(struct.pack(">HHI", 0x8003, 1, len(payload)) + payload)


def test_encoded_header_blocks_decode_with_a_plain_zlib_stream() -> None:
    encoder = FrameEncoder()
    inflate = zlib.decompressobj(zdict=spdy_frames.DICTIONARY)
    for frame in (SynReply(1, {}), SynReply(3, {"x": ["a", "b"]}),
                  HeadersFrame(3, {"y": ["z"]}, fin=True)):
        raw = encoder.encode(frame)
        first, flags_length = struct.unpack_from(">II", raw)
        assert first >> 16 == 0x8003 and flags_length & 0xFFFFFF == len(raw) - 8
        block = inflate.decompress(raw[12:])
        assert block == spdy_frames.pack_headers(frame.headers)


def test_syn_reply_and_headers_stay_apart() -> None:
    # They share fields and encoding; the frame type still tells them apart both ways.
    encoder, decoder = FrameEncoder(), FrameDecoder()
    frames = [SynReply(1, {"a": ["b"]}), HeadersFrame(1, {"a": ["b"]}, fin=True)]
    raws = [encoder.encode(f) for f in frames]
    assert [raw[3] for raw in raws] == [2, 8]  # the type field's low byte
    assert decoder.feed(b"".join(raws)) == frames
    assert SynReply(1, {}) != HeadersFrame(1, {})


def test_decoder_takes_bytes_in_any_pieces() -> None:
    encoder = FrameEncoder()
    stream = b"".join(encoder.encode(f) for f in (
        SynStream(1, {"streamtype": ["stdin"]}), DataFrame(1, b"x" * 70000),
        DataFrame(1, b"", fin=True), Ping(3)))
    decoder = FrameDecoder()
    frames = []
    for i in range(0, len(stream), 7):
        frames += decoder.feed(stream[i:i + 7])
    assert [type(f).__name__ for f in frames] == ["SynStream", "DataFrame", "DataFrame", "Ping"]
    assert frames[1] == DataFrame(1, b"x" * 70000)


@pytest.mark.parametrize(("raw", "message"), [
    (bytes.fromhex("80020006 00000004 00000001"), "version 2"),
    (bytes.fromhex("80030003 00000004 00000001"), "too short"),
    (bytes.fromhex("00000000 00000001 00"), "stream 0"),
    (bytes.fromhex("80030001 0000000c 00000001 00000000 0000 ffff"), "decompress"),
])
def test_malformed_frames_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(SpdyError, match=message):
        FrameDecoder().feed(raw)


def test_unknown_control_frames_are_skipped() -> None:
    raw = bytes.fromhex("8003000a 00000002 abcd") + bytes.fromhex("80030006 00000004 00000009")
    assert FrameDecoder().feed(raw) == [Ping(9)]


def test_header_bombs_are_refused() -> None:
    deflate = zlib.compressobj(zdict=spdy_frames.DICTIONARY)
    block = _compressed_block([(b"x", b"a" * (spdy_frames.MAX_HEADER_BLOCK + 10))], deflate)
    payload = struct.pack(">IIBB", 1, 0, 0, 0) + block
    with pytest.raises(SpdyError, match="larger"):
        FrameDecoder().feed(struct.pack(">HHI", 0x8003, 1, len(payload)) + payload)


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.paused = False
        self.closed = False
        self.eof = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def sent(transport: FakeTransport, decoder: FrameDecoder) -> list[spdy_frames.Frame]:
    frames = decoder.feed(bytes(transport.out))
    transport.out.clear()
    return frames


async def test_session_streams_pings_windows_and_goaway() -> None:
    session = SpdySession(idle_timeout=60, max_buffered=100_000)
    transport = FakeTransport()
    session.connection_made(transport)
    client = FrameEncoder()
    from_server = FrameDecoder()

    session.data_received(client.encode(SynStream(1, {"streamtype": ["stdin"]})))
    stream = await session.accept()
    assert stream is not None and stream.header("streamType") == "stdin"
    stream.reply()
    assert sent(transport, from_server) == [SynReply(1, {})]

    # Client pings (odd ids) are echoed; a data frame for an unknown stream is reset.
    session.data_received(client.encode(Ping(5)) + client.encode(DataFrame(9, b"?")))
    assert sent(transport, from_server) == [
        Ping(5), RstStream(9, spdy_frames.RstStatus.INVALID_STREAM)]

    # 150 kB unread: reading pauses; reading it reopens the windows and resumes reading.
    for _ in range(5):
        session.data_received(client.encode(DataFrame(1, b"d" * 30_000)))
    assert transport.paused
    got = b""
    while len(got) < 150_000:
        got += await stream.read()
    assert not transport.paused
    updates = [f for f in sent(transport, from_server) if isinstance(f, WindowUpdate)]
    assert {f.stream_id for f in updates} == {0, 1}
    assert sum(f.delta for f in updates if f.stream_id == 0) >= 150_000 - spdy_frames.DEFAULT_WINDOW

    session.data_received(client.encode(DataFrame(1, b"", fin=True)))
    assert await stream.read() == b""
    await stream.write(b"out")
    stream.close()
    assert sent(transport, from_server) == [DataFrame(1, b"out"), DataFrame(1, b"", fin=True)]

    # Streams from the server's parity or going backwards are protocol errors.
    session.data_received(client.encode(SynStream(2, {})) + client.encode(SynStream(1, {})))
    assert sent(transport, from_server) == [RstStream(2, 1), RstStream(1, 1)]

    closing = asyncio.create_task(session.close(linger=5))
    await asyncio.sleep(0)
    assert sent(transport, from_server) == [GoAway(1, 0)] and transport.eof
    session.connection_lost(None)
    await closing
    assert await session.accept() is None


async def test_session_ends_streams_on_reset_and_on_protocol_errors() -> None:
    session = SpdySession(idle_timeout=60)
    transport = FakeTransport()
    session.connection_made(transport)
    client = FrameEncoder()
    session.data_received(client.encode(SynStream(1, {})) + client.encode(SynStream(3, {})))
    first, second = await session.accept(), await session.accept()
    assert first is not None and second is not None
    session.data_received(client.encode(RstStream(1, spdy_frames.RstStatus.CANCEL)))
    assert await first.read() == b"" and first.was_reset
    with pytest.raises(ConnectionResetError):
        await first.write(b"x")
    session.data_received(bytes.fromhex("80020006 00000004 00000001"))  # SPDY/2: refused
    assert GoAway(3, spdy_frames.GoAwayStatus.PROTOCOL_ERROR) in FrameDecoder().feed(
        bytes(transport.out)) and transport.closed


async def test_idle_session_is_closed() -> None:
    session = SpdySession(idle_timeout=0.05)
    transport = FakeTransport()
    session.connection_made(transport)
    await asyncio.sleep(0.3)
    assert transport.closed
