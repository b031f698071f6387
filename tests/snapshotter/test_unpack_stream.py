"""The unpack fast paths: tar headers parsed as tarfile parses them, the tar stream read
through one reused buffer (contents across its edges, sparse members, the diff ID of every
byte), entries created over what is there, and the worker's lazily set up logging."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import random
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from shoal_snapshotter.unpack import LayerFormatError, Whiteouts, apply_layer, logs
from shoal_snapshotter.unpack.tarstream import BUFFER, FastTarInfo, TarStream
from shoal_snapshotter.unpack.worker import apply_and_digest
from unpack_support import d, f, listing, sym, tar, tar_info, wh

# --- headers ------------------------------------------------------------------------------


def _parse(cls: type[tarfile.TarInfo], buf: bytes) -> Any:
    try:
        info = cls.frombuf(buf, "utf-8", "surrogateescape")
    except Exception as e:  # compared too: the same class and message
        return (type(e), str(e))
    fields = set(tarfile.TarInfo.__slots__) | {"_sparse_structs"}  # type: ignore[attr-defined]
    return {k: getattr(info, k, None) for k in fields}


def _with_checksum(block: bytearray, *, signed: bool = False) -> bytes:
    rest = block[:148] + block[156:]
    total = 256 + sum(b - 256 if signed and b > 127 else b for b in rest)
    block[148:156] = b"%06o\0 " % (total % 8**6)
    return bytes(block)


def _headers() -> list[bytes]:
    """512-byte blocks of headers in every format tarfile writes, and some it only reads."""
    infos: list[tuple[tarfile.TarInfo, int]] = []
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        for kind in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                     tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE):
            ti = tar_info("usr/lib/" + "x" * 90 + "/" + "long" * 20, kind, mode=0o4755,
                          uid=1000, gid=1000)
            ti.linkname = "target" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            ti.size = 12345 if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
            ti.devmajor, ti.devminor = (1, 3) if kind == tarfile.CHRTYPE else (0, 0)
            infos.append((ti, fmt))
    big = tar_info("big", tarfile.REGTYPE, mode=0o644, uid=8**8, gid=2**40, mtime=-5)
    big.size = 8**12  # base-256 numbers (GNU)
    infos.append((big, tarfile.GNU_FORMAT))
    infos.append((tar_info("dir/", tarfile.AREGTYPE, mode=0o755), tarfile.USTAR_FORMAT))  # V7
    infos.append((tar_info("ünïcode/名前", tarfile.REGTYPE, mode=0o600), tarfile.PAX_FORMAT))
    blocks = []
    for ti, fmt in infos:
        raw = ti.tobuf(fmt, "utf-8", "surrogateescape")
        blocks += [raw[i:i + 512] for i in range(0, len(raw), 512)]
    # Old GNU sparse: four structs, an extension flag and the real size in the header.
    sparse = bytearray(tar_info("sparse", tarfile.GNUTYPE_SPARSE, mode=0o644).tobuf(
        tarfile.GNU_FORMAT, "utf-8", "surrogateescape")[:512])
    sparse[386:410] = b"%011o\0%011o\0" % (0, 5)
    sparse[410:434] = b"%011o\0%011o\0" % (8192, 5)
    sparse[483:495] = b"%011o\0" % 10000
    blocks.append(_with_checksum(sparse))
    return blocks


def test_fast_header_parse_matches_tarfile() -> None:
    rnd = random.Random(14)
    cases = [b"", b"\0" * 511, bytes(512), b"x" * 512]
    for block in _headers():
        cases.append(block)
        cases.append(_with_checksum(bytearray(block), signed=True))  # old Sun/NeXT tars
        for _ in range(30):
            mutated = bytearray(block)
            for _ in range(rnd.randint(1, 3)):
                mutated[rnd.randrange(512)] = rnd.choice([0, 0x20, 0x30, 0x37, 0x39, 0x80,
                                                          0xFF, rnd.randrange(256)])
            cases.append(bytes(mutated))  # mostly a bad checksum
            cases.append(_with_checksum(mutated))  # a good one: field errors, odd values
    different = [c for c in cases
                 if _parse(tarfile.TarInfo, c) != _parse(FastTarInfo, c)]
    assert not different
    parsed = [_parse(FastTarInfo, c) for c in cases]
    assert sum(isinstance(p, dict) for p in parsed) > len(cases) // 3  # not all refused


# --- the stream ---------------------------------------------------------------------------


class _ReadOnly:
    """A source with read() alone (what Readable promises)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, size: int = -1, /) -> bytes:
        return self._data.read(min(size, 3))  # short reads too


@pytest.mark.parametrize("source", [io.BytesIO, _ReadOnly])
def test_tar_stream_reads_seeks_and_copies_across_its_buffer(tmp_path: Path,
                                                              source: Any) -> None:
    data = bytes(range(256)) * 4
    stream = TarStream(source(data), size=7)
    assert stream.read(3) == data[:3]
    assert stream.read(20) == data[3:23]
    assert stream.tell() == 23
    assert stream.seek(40) == 40
    with pytest.raises(tarfile.StreamError):
        stream.seek(39)
    with open(tmp_path / "out", "wb") as out:
        assert stream.copy_to(out.fileno(), 100) == 100
    assert (tmp_path / "out").read_bytes() == data[40:140]
    assert stream.read(0) == b""
    assert stream.read(1) == data[140:141]
    with open(tmp_path / "rest", "wb") as out:
        assert stream.copy_to(out.fileno(), 5000) == len(data) - 141  # short: the end
    assert stream.read(10) == b""
    assert stream.seek(5000) == len(data)
    stream.drain()
    assert stream.tell() == len(data)


def test_tar_stream_drain_reads_to_the_end() -> None:
    source = io.BytesIO(b"x" * 10000)
    stream = TarStream(source, size=64)
    stream.read(100)
    stream.drain()
    assert (stream.tell(), source.read()) == (10000, b"")


def _sparse_member() -> bytes:
    """An old GNU sparse file: 'hello' at 0, 'world' at 8192, 10000 bytes in all."""
    header = bytearray(tar_info("sparse", tarfile.GNUTYPE_SPARSE, mode=0o640).tobuf(
        tarfile.GNU_FORMAT, "utf-8", "surrogateescape")[:512])
    header[124:136] = b"%011o\0" % 10  # stored bytes
    header[386:410] = b"%011o\0%011o\0" % (0, 5)
    header[410:434] = b"%011o\0%011o\0" % (8192, 5)
    header[483:495] = b"%011o\0" % 10000
    return _with_checksum(header) + b"helloworld".ljust(512, b"\0")


def test_contents_across_buffer_edges_sparse_members_and_the_diff_id(tmp_path: Path) -> None:
    rnd = random.Random(3)
    sizes = [0, 1, 511, 512, 513, BUFFER - 1, BUFFER, BUFFER + 1, 3 * BUFFER + 17]
    files = {f"d/f{n}": rnd.randbytes(n) for n in sizes}
    head = tar(d("d"), *(f(name, data) for name, data in files.items()))
    tail = tar(f("after", b"after the sparse one"))
    # The sparse member between two archives' entries (the first's end blocks cut off),
    # and an end padded with zero records, as tar pads: the diff ID covers those too.
    raw = head[:_end(head)] + _sparse_member() + tail + bytes(20 * 512)
    # Two gzip members: a reader must go on past the first one's trailer.
    blob = gzip.compress(raw[:len(raw) // 2]) + gzip.compress(raw[len(raw) // 2:])
    root = tmp_path / "root"
    root.mkdir()
    result, diff_id, count = apply_and_digest(io.BytesIO(blob), root, Whiteouts.OVERLAY)
    assert (diff_id, count) == ("sha256:" + hashlib.sha256(raw).hexdigest(), len(raw))
    for name, data in files.items():
        assert (root / name).read_bytes() == data
    assert (root / "sparse").read_bytes() == (b"hello".ljust(8192, b"\0") + b"world").ljust(
        10000, b"\0")
    assert (root / "after").read_bytes() == b"after the sparse one"
    assert result.bytes_written == sum(sizes) + 10000 + len(b"after the sparse one")


def _end(archive: bytes) -> int:
    """Where an archive's end-of-archive zero blocks start."""
    end = len(archive)
    while end >= 512 and archive[end - 512:end] == bytes(512):
        end -= 512
    return end


@pytest.mark.parametrize("where", ["a-content", "b-last-byte", "b-header"])
def test_truncated_contents_are_a_format_error(tmp_path: Path, where: str) -> None:
    raw = tar(f("a", b"x" * 5000), f("b", b"y" * 2000))
    a, b = tarfile.open(fileobj=io.BytesIO(raw)).getmembers()
    cut = {"a-content": a.offset_data + 3000, "b-last-byte": b.offset_data + 1999,
           "b-header": b.offset + 100}[where]
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(LayerFormatError):
        apply_layer(io.BytesIO(raw[:cut]), root, whiteouts=Whiteouts.NATIVE)


# --- entries over what is there -----------------------------------------------------------


def test_entries_replace_symlinks_files_and_whiteouts_without_following(
        tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    before = listing(outside)
    apply_layer(io.BytesIO(tar(
        sym("file-over-link", str(outside / "passwd")), sym("dir-over-link", str(outside / "sub")),
        sym("link-over-link", "old"), sym("file-over-dangling", str(outside / "new")),
        f("link-over-file", b"old"), f("file-over-file", b"old"), d("file-over-dir"),
        f("file-over-dir/inner"))), root, whiteouts=Whiteouts.NATIVE)
    apply_layer(io.BytesIO(tar(
        f("file-over-link", b"new"), d("dir-over-link", mode=0o700), f("dir-over-link/x", b"x"),
        sym("link-over-link", "new"), f("file-over-dangling", b"new"),
        sym("link-over-file", "target"), f("file-over-file", b"new"),
        f("file-over-dir", b"new"))), root, whiteouts=Whiteouts.NATIVE)
    assert listing(outside) == before
    assert not (outside / "new").exists()
    for name in ("file-over-link", "file-over-dangling", "file-over-file", "file-over-dir"):
        assert (root / name).read_bytes() == b"new"
        assert not (root / name).is_symlink()
    assert (root / "dir-over-link").is_dir() and not (root / "dir-over-link").is_symlink()
    assert os.listdir(root / "dir-over-link") == ["x"]
    assert os.readlink(root / "link-over-link") == "new"
    assert os.readlink(root / "link-over-file") == "target"


def test_overlay_entries_replace_their_own_whiteouts(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    apply_layer(io.BytesIO(tar(wh(".wh.f"), wh(".wh.s"), wh(".wh.d"), f("f", b"back"),
                               sym("s", "t"), d("d"))), root, whiteouts=Whiteouts.OVERLAY)
    assert (root / "f").read_bytes() == b"back"
    assert os.readlink(root / "s") == "t"
    assert os.getxattr(root / "d", "trusted.overlay.opaque") == b"y"  # still hides below


# --- logging --------------------------------------------------------------------------------


def test_warnings_run_the_setup_once_first(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(logs, "_before_first", [])
    logs.before_first_warning(lambda: calls.append("setup"))
    logs.warning("first")
    logs.warning("second")
    assert calls == ["setup"]


def test_worker_logs_its_warnings_as_json_on_stderr(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    blob = gzip.compress(tar(f("x", b"x", xattrs={"trusted.overlay.redirect": "/etc"})))
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "shoal_snapshotter.unpack.worker", str(root), "overlay",
         str(os.getpid())], input=blob, capture_output=True, check=True)
    kind, (result, _, _) = pickle.loads(proc.stdout)
    assert (kind, result.entries) == ("ok", 1)
    lines = [json.loads(line) for line in proc.stderr.decode().splitlines()]
    assert [(x["event"], x["level"], x["xattr"]) for x in lines] == [
        ("layer xattr ignored", "warning", "trusted.overlay.redirect")]
