"""Content store: ingest, resume, verification, one writer per blob across processes."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from pathlib import Path

import pytest
from shoal_common.errors import Invalid, NotFound
from shoal_puller.store.content import ContentStore, DigestMismatch


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_put_read_and_layout(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    data = b"hello world"
    await store.put(digest_of(data), data)
    assert store.read(digest_of(data)) == data
    assert (tmp_path / "blobs" / "sha256" / hashlib.sha256(data).hexdigest()).is_file()
    assert store.size(digest_of(data)) == len(data)
    with pytest.raises(NotFound):
        store.read(digest_of(b"other"))
    with pytest.raises(Invalid, match="malformed digest"):
        store.blob_path("sha256:../../etc/passwd")


async def test_interrupted_ingest_resumes_from_its_offset(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096
    digest = digest_of(data)
    store = ContentStore(tmp_path)
    async with store.writer(digest, len(data)) as w:
        assert w.offset == 0
        w.write(data[:300_000])
        # no commit: as if the process died here
    restarted = ContentStore(tmp_path)
    async with restarted.writer(digest, len(data)) as w:
        assert w.offset == 300_000
        w.write(data[w.offset:])
        w.commit()
    assert restarted.read(digest) == data
    assert not list((tmp_path / "ingest").glob("*.data"))


async def test_wrong_content_is_never_committed(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    good = b"a" * 1000
    async with store.writer(digest_of(good), len(good)) as w:
        w.write(b"b" * 1000)
        with pytest.raises(DigestMismatch, match="content has digest"):
            w.commit()
    assert not store.exists(digest_of(good))
    async with store.writer(digest_of(good), len(good)) as w:
        assert w.offset == 0  # the corrupt partial was thrown away
        with pytest.raises(DigestMismatch, match="more data"):
            w.write(b"a" * 1001)
    async with store.writer(digest_of(good), len(good)) as w:
        w.reset()
        w.write(good[:10])
        with pytest.raises(DigestMismatch, match="got 10 bytes"):
            w.commit()


async def test_concurrent_writers_of_one_blob_write_once(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    data = b"x" * 100_000
    digest = digest_of(data)
    writes = []

    async def writer(name: str) -> None:
        async with store.writer(digest, len(data)) as w:
            if w.committed:
                return
            writes.append(name)
            await asyncio.sleep(0.2)  # hold the lock while "downloading"
            w.write(data)
            w.commit()

    await asyncio.gather(writer("a"), writer("b"), writer("c"))
    assert len(writes) == 1
    assert store.read(digest) == data


async def test_lock_is_shared_with_other_processes(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    data = b"cross-process"
    digest = digest_of(data)
    lock = tmp_path / "ingest" / f"{digest.removeprefix('sha256:')}.lock"
    holder = await asyncio.create_subprocess_exec(sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(0.6)\n"), stdout=asyncio.subprocess.PIPE)
    assert holder.stdout is not None and await holder.stdout.readline() == b"locked\n"
    with store.try_locked(digest) as got:
        assert not got
    started = time.monotonic()
    await store.put(digest, data)
    assert time.monotonic() - started > 0.3  # waited for the other process
    await holder.wait()
    assert store.read(digest) == data
