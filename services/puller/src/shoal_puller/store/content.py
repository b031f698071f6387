"""The content store: blobs by digest at <root>/blobs/sha256/<hex>.

A blob is written through an ingest file (<root>/ingest/<hex>.data) that survives a
restart and is resumed from its length; it is committed only after its size and digest
match (fsync the file, rename into blobs/, fsync the directory), so a blob that exists is
always whole. One blob is written by one writer at a time on the node: the writer holds an
flock on <root>/ingest/<hex>.lock, which serialises replicas (separate processes) and
concurrent pulls inside one replica alike; whoever gets the lock second finds the blob
committed and has nothing to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from shoal_common.errors import FailedPrecondition, Invalid, NotFound

DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
LOCK_POLL = 0.05


def hex_of(digest: str) -> str:
    match = DIGEST_RE.match(digest)
    if not match:
        raise Invalid(f"unsupported or malformed digest {digest!r} (want sha256:<64 hex>)")
    return match.group(1)


class DigestMismatch(Invalid):
    pass


_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_EVERY = 8 << 20


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range of the file to disk without waiting (sync_file_range(2); the
    os module has no binding). The commit's fsync then waits only for the tail, instead of
    the whole blob being flushed after the last byte arrived."""
    _libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)  # advisory: ignore errors


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Writer:
    """An open ingest for one blob; `offset` bytes are already there (resumed)."""

    store: ContentStore
    digest: str
    expected_size: int | None
    offset: int = 0
    committed: bool = False  # the blob already exists: nothing to write
    _fd: int = -1
    _hash: hashlib._Hash | None = None
    _written_back: int = 0  # writeback started up to here

    @property
    def data_path(self) -> Path:
        return self.store.ingest_path(self.digest)

    def _open(self) -> None:
        fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        hasher = hashlib.sha256()
        size = 0
        # Re-hash what an earlier attempt left, so the download resumes where it stopped.
        while chunk := os.read(fd, 1 << 20):
            hasher.update(chunk)
            size += len(chunk)
        if self.expected_size is not None and size > self.expected_size:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            hasher, size = hashlib.sha256(), 0
        self._fd, self._hash, self.offset, self._written_back = fd, hasher, size, size

    def write(self, chunk: bytes | bytearray) -> None:
        """Append; short writes are completed (disk writes of one chunk are brief)."""
        self.write_chunks([chunk])

    def write_chunks(self, chunks: Sequence[bytes | bytearray]) -> None:
        """Append the chunks in order with writev (no joining copy), hashing each."""
        assert self._hash is not None
        total = sum(len(c) for c in chunks)
        if self.expected_size is not None and self.offset + total > self.expected_size:
            raise DigestMismatch(f"{self.digest}: more data than the expected "
                                 f"{self.expected_size} bytes")
        views = [memoryview(c) for c in chunks if c]
        while views:
            written = os.writev(self._fd, views)
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]
        for chunk in chunks:
            self._hash.update(chunk)
        self.offset += total
        if self.offset - self._written_back >= WRITEBACK_EVERY:
            _start_writeback(self._fd, self._written_back, self.offset - self._written_back)
            self._written_back = self.offset

    def reset(self) -> None:
        """Throw the partial data away (e.g. the server sent a different blob)."""
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._hash, self.offset, self._written_back = hashlib.sha256(), 0, 0

    def commit(self) -> None:
        assert self._hash is not None
        if self.expected_size is not None and self.offset != self.expected_size:
            raise DigestMismatch(f"{self.digest}: got {self.offset} bytes, expected "
                                 f"{self.expected_size}")
        actual = f"sha256:{self._hash.hexdigest()}"
        if actual != self.digest:
            self.reset()  # corrupt: never resume from it
            raise DigestMismatch(f"{self.digest}: content has digest {actual}")
        os.fsync(self._fd)
        target = self.store.blob_path(self.digest)
        os.rename(self.data_path, target)
        _fsync_dir(target.parent)
        self.committed = True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ContentStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs_dir = root / "blobs" / "sha256"
        self.ingest_dir = root / "ingest"
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.ingest_dir.mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / hex_of(digest)

    def ingest_path(self, digest: str) -> Path:
        return self.ingest_dir / f"{hex_of(digest)}.data"

    def exists(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def size(self, digest: str) -> int:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the content store") from None

    def read(self, digest: str) -> bytes:
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the content store") from None

    async def read_range(self, digest: str, offset: int, size: int) -> tuple[bytes, int]:
        """(up to `size` bytes at `offset`, the blob's total size), read off the loop."""

        def read() -> tuple[bytes, int]:
            try:
                with open(self.blob_path(digest), "rb") as fh:
                    total = os.fstat(fh.fileno()).st_size
                    fh.seek(offset)
                    return fh.read(size), total
            except FileNotFoundError:
                raise NotFound(f"blob {digest} is not in the content store") from None

        return await asyncio.to_thread(read)

    def ingest_size(self, digest: str) -> int:
        """Bytes of a blob being written right now (by anyone on the node), for progress."""
        try:
            return self.ingest_path(digest).stat().st_size
        except FileNotFoundError:
            return self.size(digest) if self.exists(digest) else 0

    async def _lock(self, digest: str) -> int:
        fd = os.open(self.ingest_dir / f"{hex_of(digest)}.lock",
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # Polling keeps the event loop free; flock has no async form.
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                await asyncio.sleep(LOCK_POLL)

    @contextlib.asynccontextmanager
    async def locked(self, digest: str) -> AsyncIterator[None]:
        fd = await self._lock(digest)
        try:
            yield
        finally:
            os.close(fd)  # releases the flock

    @contextlib.asynccontextmanager
    async def writer(self, digest: str, expected_size: int | None) -> AsyncIterator[Writer]:
        """Exclusive writer for `digest`; `.committed` is already True if the blob exists."""
        hex_of(digest)
        async with self.locked(digest):
            w = Writer(self, digest, expected_size)
            if self.exists(digest):
                w.committed = True
                yield w
                return
            w._open()
            try:
                yield w
            finally:
                w.close()

    async def put(self, digest: str, data: bytes) -> None:
        """Store a small blob held in memory (manifests, configs)."""
        async with self.writer(digest, len(data)) as w:
            if not w.committed:
                w.reset()
                w.write(data)
                w.commit()

    async def ingest_chunk(self, digest: str, size: int, offset: int,
                           data: bytes) -> tuple[int, int]:
        """Add `data`, the blob's bytes at `offset`, to its ingest file: for blobs sent in
        chunks that any replica may receive. Bytes already held are skipped (a resent chunk
        changes nothing) and a gap is refused; once `size` bytes are held the file is
        hashed and committed, or deleted if its digest is not `digest`. Returns the bytes
        held (`size` once committed) and how many of `data` were new."""
        hex_of(digest)
        async with self.locked(digest):
            return await asyncio.to_thread(self._ingest_chunk, digest, size, offset, data)

    def _ingest_chunk(self, digest: str, size: int, offset: int,
                      data: bytes) -> tuple[int, int]:
        if self.exists(digest):
            if (have := self.size(digest)) != size:
                raise DigestMismatch(f"{digest}: said to be {size} bytes, but the stored "
                                     f"blob of that digest is {have}")
            return size, 0
        path = self.ingest_path(digest)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            held = os.fstat(fd).st_size
            if held > size:  # left by a writer told another size: not this blob's bytes
                os.ftruncate(fd, 0)
                held = 0
            if offset > held:
                raise FailedPrecondition(f"{digest}: a chunk at byte {offset}, but only "
                                         f"{held} bytes are held (send from {held})")
            if offset + len(data) > size:
                raise DigestMismatch(f"{digest}: more data than the expected {size} bytes")
            tail = memoryview(data)[held - offset:]
            new = len(tail)
            while tail:
                written = os.pwrite(fd, tail, held)
                held += written
                tail = tail[written:]
            if held == size:
                self._commit_ingest(fd, path, digest)
            return held, new
        finally:
            os.close(fd)

    def _commit_ingest(self, fd: int, path: Path, digest: str) -> None:
        hasher = hashlib.sha256()
        os.lseek(fd, 0, os.SEEK_SET)
        while chunk := os.read(fd, 1 << 20):
            hasher.update(chunk)
        if (actual := f"sha256:{hasher.hexdigest()}") != digest:
            path.unlink(missing_ok=True)  # never resumed from
            raise DigestMismatch(f"{digest}: content has digest {actual}")
        os.fsync(fd)
        target = self.blob_path(digest)
        os.rename(path, target)
        _fsync_dir(target.parent)

    @contextlib.contextmanager
    def try_locked(self, digest: str) -> Iterator[bool]:
        """Hold the blob's lock if nobody else does (yields False if someone does)."""
        fd = os.open(self.ingest_dir / f"{hex_of(digest)}.lock",
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def delete_locked(self, digest: str) -> None:
        """Delete a blob and any partial ingest; the caller holds the blob's lock."""
        self.blob_path(digest).unlink(missing_ok=True)
        self.ingest_path(digest).unlink(missing_ok=True)
        _fsync_dir(self.blobs_dir)

    def list_digests(self) -> list[str]:
        return [f"sha256:{name}" for name in os.listdir(self.blobs_dir)
                if DIGEST_RE.match(f"sha256:{name}")]

    def free_bytes(self) -> int:
        """Bytes free on the content store's filesystem, for whoever may use them."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def usage(self) -> tuple[int, int]:
        """(bytes, inodes) used by committed blobs and ingests."""
        used = inodes = 0
        for directory in (self.blobs_dir, self.ingest_dir):
            with os.scandir(directory) as entries:
                for entry in entries:
                    try:
                        used += entry.stat(follow_symlinks=False).st_blocks * 512
                    except FileNotFoundError:
                        continue
                    inodes += 1
        return used, inodes
