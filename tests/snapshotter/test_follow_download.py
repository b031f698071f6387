"""Following a blob while it downloads (unpack.follow, domain.content.Ingest): the reader
waits for bytes, reads no more than the blob's size, and only opens a content store's
ingest file; the watch ends a follow whose download stopped. (What a followed blob may
become is judged by the diff ID of what it decompressed to: tests/e2e/
test_unpack_while_fetching.py.)"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from shoal_common.errors import Internal, Unavailable
from shoal_common.messages.images import ContentInfo
from shoal_snapshotter.domain import content
from shoal_snapshotter.domain.content import Ingest
from shoal_snapshotter.unpack.follow import DROP_STEP, ContentChanged, Following

DATA = os.urandom(300_000)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
HEX = DIGEST.removeprefix("sha256:")


def store(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(ingest data file, its lock, the committed blob path) of a content store."""
    (tmp_path / "ingest").mkdir()
    (tmp_path / "blobs" / "sha256").mkdir(parents=True)
    return (tmp_path / "ingest" / f"{HEX}.data", tmp_path / "ingest" / f"{HEX}.lock",
            tmp_path / "blobs" / "sha256" / HEX)


def partial(path: Path, digest: str = DIGEST) -> ContentInfo:
    return ContentInfo(digest=digest, size=len(DATA), path=str(path), committed=False)


def write_slowly(path: Path, data: bytes, pieces: int = 6, pause: float = 0.03) -> None:
    step = len(data) // pieces + 1
    with open(path, "ab") as fh:
        for i in range(0, len(data), step):
            fh.write(data[i:i + step])
            fh.flush()
            time.sleep(pause)


def read_all(reader: Following) -> bytes:
    out = bytearray()
    buf = bytearray(40_000)
    while n := reader.readinto(buf):
        out += buf[:n]
    return bytes(out)


def test_the_reader_waits_for_the_rest(tmp_path: Path) -> None:
    data_path, _, _ = store(tmp_path)
    data_path.touch()
    writer = threading.Thread(target=write_slowly, args=(data_path, DATA))
    fd = os.open(data_path, os.O_RDONLY)
    try:
        writer.start()
        reader = Following(fd, len(DATA), DIGEST)
        assert read_all(reader) == DATA
        assert reader.offset == len(DATA)
    finally:
        writer.join()
        os.close(fd)


def test_no_byte_past_the_blobs_size_is_read(tmp_path: Path) -> None:
    data_path, _, _ = store(tmp_path)
    data_path.write_bytes(DATA + b"appended later")
    fd = os.open(data_path, os.O_RDONLY)
    try:
        reader = Following(fd, len(DATA), DIGEST)
        assert read_all(reader) == DATA
        assert reader.readinto(bytearray(10)) == 0
    finally:
        os.close(fd)


def test_an_aborted_or_silent_download_ends_the_read(tmp_path: Path) -> None:
    data_path, _, _ = store(tmp_path)
    data_path.write_bytes(DATA[:1000])
    fd = os.open(data_path, os.O_RDONLY)
    try:
        reader = Following(fd, len(DATA), DIGEST, silence=0.2)
        buf = bytearray(4096)
        assert reader.readinto(buf) == 1000
        with pytest.raises(ContentChanged, match="no new data"):
            reader.readinto(buf)
        aborted = Following(fd, len(DATA), DIGEST)
        assert aborted.readinto(buf) == 1000
        threading.Timer(0.1, aborted.abort).start()
        with pytest.raises(ContentChanged, match="stopped"):
            aborted.readinto(buf)
    finally:
        os.close(fd)


@pytest.mark.parametrize("where", [
    "/etc/passwd", "relative/ingest/{hex}.data", "/x/ingest/{other}.data",
    "/x/ingest/../ingest/{hex}.data", "/x/blobs/sha256/{hex}", "/x/ingest/{hex}.lock", ""])
async def test_only_a_content_stores_ingest_file_is_followed(where: str) -> None:
    path = where.format(hex=HEX, other="0" * 64)
    with pytest.raises(Internal, match="not a content store's"):
        await Ingest.open(ContentInfo(digest=DIGEST, size=10, path=path, committed=False))


async def test_the_committed_blob_is_read_when_the_download_finished_first(
        tmp_path: Path) -> None:
    data_path, _, blob = store(tmp_path)
    blob.write_bytes(DATA)
    ingest = await Ingest.open(partial(data_path))
    try:
        await asyncio.wait_for(ingest.watch(), 2)  # complete: nothing to watch
        reader = Following(ingest.fd, len(DATA), DIGEST)
        assert read_all(reader) == DATA
    finally:
        ingest.close()


async def test_the_watch_ends_a_follow_whose_writer_is_gone(tmp_path: Path) -> None:
    data_path, lock, _ = store(tmp_path)
    data_path.write_bytes(DATA[:100])
    lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)  # as the puller's writer holds it
    ingest = await Ingest.open(partial(data_path))
    try:
        watch = asyncio.create_task(ingest.watch())
        await asyncio.sleep(1.6)
        assert not watch.done(), "a live writer may be slow"
        os.close(lock_fd)  # the writer is gone with 100 bytes of 300000
        with pytest.raises(Unavailable, match="download stopped at byte 100"):
            await asyncio.wait_for(watch, 5)
    finally:
        ingest.close()


async def test_a_puller_on_another_machine_is_not_waited_for(tmp_path: Path) -> None:
    missing = tmp_path / "elsewhere" / "ingest" / f"{HEX}.data"
    with pytest.raises(Unavailable, match="not on this machine"):
        await asyncio.wait_for(Ingest.open(partial(missing)), 1)


async def test_a_download_that_never_starts_is_given_up(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    data_path, _, _ = store(tmp_path)
    monkeypatch.setattr(content, "INGEST_APPEAR", 0.2)
    with pytest.raises(Unavailable, match="did not start"):
        await Ingest.open(partial(data_path))


def page_cache_bytes(path: Path) -> int:
    """How much of the file is in the page cache."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


def test_what_was_read_leaves_the_page_cache_behind_the_reader(tmp_path: Path) -> None:
    """The blob is not read again once applied: the follower drops its pages behind it
    (clean ones at once; here all are, the file synced first), but for the last span."""
    path = tmp_path / "blob"
    size = 20 * DROP_STEP
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.read(fd, size)  # all of it in the page cache
        assert page_cache_bytes(path) > size * 0.9
        reader = Following(fd, size, "sha256:x")
        while reader.read(1 << 20):
            pass
    finally:
        os.close(fd)
    assert page_cache_bytes(path) <= 5 * DROP_STEP
