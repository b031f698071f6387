"""SPDY/3.1 framing and the server session of the gateway's streaming server, against bytes
written out from the SPDY/3 draft's frame layouts (not produced by the code under test)."""

from __future__ import annotations

import asyncio
import struct
import zlib

import pytest
from shoal_cri_gateway.streaming import spdy_frames as sf
from shoal_cri_gateway.streaming.spdy import SpdySession


def test_dictionary_is_the_spec_one() -> None:
    # zlib names a preset dictionary by its Adler-32; SPDY/3 peers all use this one.
    assert len(sf.DICTIONARY) == 1423
    assert zlib.adler32(sf.DICTIONARY) == sf.DICTIONARY_ADLER32 == 0xE3C6A7C2
    assert sf.DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert sf.DICTIONARY.endswith(b"charset=iso-8859-1,utf-,*,enq=0.")


@pytest.mark.parametrize(("raw", "frame"), [
    # PING id 1: control bit + version 3, type 6, no flags, length 4.
    (bytes.fromhex("80030006 00000004 00000001"), sf.Ping(1)),
    # RST_STREAM stream 3, status CANCEL (5).
    (bytes.fromhex("80030003 00000008 00000003 00000005"), sf.RstStream(3, 5)),
    # GOAWAY last good stream 7, status OK.
    (bytes.fromhex("80030007 00000008 00000007 00000000"), sf.GoAway(7, 0)),
    # WINDOW_UPDATE stream 1, delta 32768.
    (bytes.fromhex("80030009 00000008 00000001 00008000"), sf.WindowUpdate(1, 32768)),
    # SETTINGS: one entry, flags 0, id 7 (initial window), value 65536.
    (bytes.fromhex("80030004 0000000c 00000001 00000007 00010000"), sf.Settings({7: 65536})),
    # DATA on stream 5 with FIN: "hi".
    (bytes.fromhex("00000005 01000002 6869"), sf.DataFrame(5, b"hi", fin=True)),
    (bytes.fromhex("00000005 00000000"), sf.DataFrame(5, b"")),
])
def test_frames_known_bytes(raw: bytes, frame: sf.Frame) -> None:
    assert sf.FrameDecoder().feed(raw) == [frame]
    assert sf.FrameEncoder().encode(frame) == raw


def _compressed_block(pairs: list[tuple[bytes, bytes]], deflate: object) -> bytes:
    """A name/value block as the draft lays it out: 32-bit count, then 32-bit length-prefixed
    names and values, zlib-compressed with the dictionary and sync-flushed."""
    raw = struct.pack(">I", len(pairs)) + b"".join(
        struct.pack(">I", len(n)) + n + struct.pack(">I", len(v)) + v for n, v in pairs)
    return deflate.compress(raw) + deflate.flush(zlib.Z_SYNC_FLUSH)  # type: ignore[attr-defined]


def test_syn_streams_share_one_compression_context() -> None:
    deflate = zlib.compressobj(zdict=sf.DICTIONARY)
    decoder = sf.FrameDecoder()
    frames = []
    for sid, kind in ((1, b"error"), (3, b"stdout")):
        block = _compressed_block([(b"streamtype", kind), (b"port", b"80\x0081")], deflate)
        payload = struct.pack(">IIBB", sid, 0, 0x60, 0) + block
        frames += decoder.feed(struct.pack(">HHI", 0x8003, 1, len(payload)) + payload)
    assert frames == [
        sf.SynStream(1, {"streamtype": ["error"], "port": ["80", "81"]}, priority=3),
        sf.SynStream(3, {"streamtype": ["stdout"], "port": ["80", "81"]}, priority=3)]
    # The second block only decodes with the first one's history.
    with pytest.raises(sf.SpdyError):
        sf.FrameDecoder().feed(struct.pack(">HHI", 0x8003, 1, len(payload)) + payload)


def test_encoded_header_blocks_decode_with_a_plain_zlib_stream() -> None:
    encoder = sf.FrameEncoder()
    inflate = zlib.decompressobj(zdict=sf.DICTIONARY)
    for frame in (sf.SynReply(1, {}), sf.SynReply(3, {"x": ["a", "b"]}),
                  sf.HeadersFrame(3, {"y": ["z"]}, fin=True)):
        raw = encoder.encode(frame)
        first, flags_length = struct.unpack_from(">II", raw)
        assert first >> 16 == 0x8003 and flags_length & 0xFFFFFF == len(raw) - 8
        block = inflate.decompress(raw[12:])
        assert block == sf.pack_headers(frame.headers)


def test_syn_reply_and_headers_stay_apart() -> None:
    # They share fields and encoding; the frame type still tells them apart both ways.
    encoder, decoder = sf.FrameEncoder(), sf.FrameDecoder()
    frames = [sf.SynReply(1, {"a": ["b"]}), sf.HeadersFrame(1, {"a": ["b"]}, fin=True)]
    raws = [encoder.encode(f) for f in frames]
    assert [raw[3] for raw in raws] == [2, 8]  # the type field's low byte
    assert decoder.feed(b"".join(raws)) == frames
    assert sf.SynReply(1, {}) != sf.HeadersFrame(1, {})


def test_decoder_takes_bytes_in_any_pieces() -> None:
    encoder = sf.FrameEncoder()
    stream = b"".join(encoder.encode(f) for f in (
        sf.SynStream(1, {"streamtype": ["stdin"]}), sf.DataFrame(1, b"x" * 70000),
        sf.DataFrame(1, b"", fin=True), sf.Ping(3)))
    decoder = sf.FrameDecoder()
    frames = []
    for i in range(0, len(stream), 7):
        frames += decoder.feed(stream[i:i + 7])
    assert [type(f).__name__ for f in frames] == ["SynStream", "DataFrame", "DataFrame", "Ping"]
    assert frames[1] == sf.DataFrame(1, b"x" * 70000)


@pytest.mark.parametrize(("raw", "message"), [
    (bytes.fromhex("80020006 00000004 00000001"), "version 2"),
    (bytes.fromhex("80030003 00000004 00000001"), "too short"),
    (bytes.fromhex("00000000 00000001 00"), "stream 0"),
    (bytes.fromhex("80030001 0000000c 00000001 00000000 0000 ffff"), "decompress"),
])
def test_malformed_frames_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(sf.SpdyError, match=message):
        sf.FrameDecoder().feed(raw)


def test_unknown_control_frames_are_skipped() -> None:
    raw = bytes.fromhex("8003000a 00000002 abcd") + bytes.fromhex("80030006 00000004 00000009")
    assert sf.FrameDecoder().feed(raw) == [sf.Ping(9)]


def test_header_bombs_are_refused() -> None:
    deflate = zlib.compressobj(zdict=sf.DICTIONARY)
    block = _compressed_block([(b"x", b"a" * (sf.MAX_HEADER_BLOCK + 10))], deflate)
    payload = struct.pack(">IIBB", 1, 0, 0, 0) + block
    with pytest.raises(sf.SpdyError, match="larger"):
        sf.FrameDecoder().feed(struct.pack(">HHI", 0x8003, 1, len(payload)) + payload)


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


def sent(transport: FakeTransport, decoder: sf.FrameDecoder) -> list[sf.Frame]:
    frames = decoder.feed(bytes(transport.out))
    transport.out.clear()
    return frames


async def test_session_streams_pings_windows_and_goaway() -> None:
    session = SpdySession(idle_timeout=60, max_buffered=100_000)
    transport = FakeTransport()
    session.connection_made(transport)
    client = sf.FrameEncoder()
    from_server = sf.FrameDecoder()

    session.data_received(client.encode(sf.SynStream(1, {"streamtype": ["stdin"]})))
    stream = await session.accept()
    assert stream is not None and stream.header("streamType") == "stdin"
    stream.reply()
    assert sent(transport, from_server) == [sf.SynReply(1, {})]

    # Client pings (odd ids) are echoed; a data frame for an unknown stream is reset.
    session.data_received(client.encode(sf.Ping(5)) + client.encode(sf.DataFrame(9, b"?")))
    assert sent(transport, from_server) == [
        sf.Ping(5), sf.RstStream(9, sf.RstStatus.INVALID_STREAM)]

    # 150 kB unread: reading pauses; reading it reopens the windows and resumes reading.
    for _ in range(5):
        session.data_received(client.encode(sf.DataFrame(1, b"d" * 30_000)))
    assert transport.paused
    got = b""
    while len(got) < 150_000:
        got += await stream.read()
    assert not transport.paused
    updates = [f for f in sent(transport, from_server) if isinstance(f, sf.WindowUpdate)]
    assert {f.stream_id for f in updates} == {0, 1}
    assert sum(f.delta for f in updates if f.stream_id == 0) >= 150_000 - sf.DEFAULT_WINDOW

    session.data_received(client.encode(sf.DataFrame(1, b"", fin=True)))
    assert await stream.read() == b""
    await stream.write(b"out")
    stream.close()
    assert sent(transport, from_server) == [sf.DataFrame(1, b"out"), sf.DataFrame(1, b"", fin=True)]

    # Streams from the server's parity or going backwards are protocol errors.
    session.data_received(client.encode(sf.SynStream(2, {})) + client.encode(sf.SynStream(1, {})))
    assert sent(transport, from_server) == [sf.RstStream(2, 1), sf.RstStream(1, 1)]

    closing = asyncio.create_task(session.close(linger=5))
    await asyncio.sleep(0)
    assert sent(transport, from_server) == [sf.GoAway(1, 0)] and transport.eof
    session.connection_lost(None)
    await closing
    assert await session.accept() is None


async def test_session_ends_streams_on_reset_and_on_protocol_errors() -> None:
    session = SpdySession(idle_timeout=60)
    transport = FakeTransport()
    session.connection_made(transport)
    client = sf.FrameEncoder()
    session.data_received(client.encode(sf.SynStream(1, {})) + client.encode(sf.SynStream(3, {})))
    first, second = await session.accept(), await session.accept()
    assert first is not None and second is not None
    session.data_received(client.encode(sf.RstStream(1, sf.RstStatus.CANCEL)))
    assert await first.read() == b"" and first.was_reset
    with pytest.raises(ConnectionResetError):
        await first.write(b"x")
    session.data_received(bytes.fromhex("80020006 00000004 00000001"))  # SPDY/2: refused
    assert sf.GoAway(3, sf.GoAwayStatus.PROTOCOL_ERROR) in sf.FrameDecoder().feed(
        bytes(transport.out)) and transport.closed


async def test_idle_session_is_closed() -> None:
    session = SpdySession(idle_timeout=0.05)
    transport = FakeTransport()
    session.connection_made(transport)
    await asyncio.sleep(0.3)
    assert transport.closed
