"""Reading layer blobs from the content store (the puller) as a stream a thread can consume.

The layer applier is synchronous and runs in a worker thread; blob chunks arrive over the
bus on the event loop. `Prefetcher` keeps a few `content.read` requests in flight ahead of
the reader (so the applier rarely waits a round trip), and `ThreadReader` is the file-like
object the thread reads, each refill handed to the loop with run_coroutine_threadsafe.
Memory stays bounded by `ahead` chunks.

`Ingest` is the third way in, for an unpack that follows a pull (`FetchingContent`): the
puller's ingest file of a blob still downloading, read as it grows (unpack.follow), with a
watch that ends the read when the download stops.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import fcntl
import io
import os
import stat
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Protocol

from shoal_common.bus import Bus
from shoal_common.clients import ImagesClient
from shoal_common.errors import Internal, Unavailable
from shoal_common.messages.images import (
    MAX_CONTENT_READ,
    ContentInfo,
    ContentInfoRequest,
    ContentReadRequest,
)


class ContentSource(Protocol):
    async def info(self, digest: str) -> ContentInfo: ...

    async def read(self, digest: str, offset: int, size: int) -> bytes: ...


class BusContent:
    """The puller's content store over `images.content.info` / `images.content.read`."""

    def __init__(self, bus: Bus, namespace: str) -> None:
        self.images = ImagesClient(bus, namespace=namespace)

    async def info(self, digest: str) -> ContentInfo:
        return await self.images.content_info(ContentInfoRequest(digest=digest))

    async def read(self, digest: str, offset: int, size: int) -> bytes:
        reply = await self.images.content_read(ContentReadRequest(digest=digest, offset=offset,
                                                                  size=size))
        return reply.data


class FetchingContent(BusContent):
    """BusContent that also describes blobs still being downloaded (`committed` False): the
    source of an unpack that follows a pull (see Ingest)."""

    async def info(self, digest: str) -> ContentInfo:
        return await self.images.content_info(ContentInfoRequest(digest=digest, partial=True))


class Prefetcher:
    """Hands out a blob's bytes in order, keeping up to `ahead` reads in flight."""

    def __init__(self, source: ContentSource, digest: str, total: int, *,
                 chunk: int = MAX_CONTENT_READ, ahead: int = 4) -> None:
        self.source = source
        self.digest = digest
        self.total = total
        self.chunk = chunk
        self.ahead = ahead
        self._next = 0
        self._pending: collections.deque[tuple[int, asyncio.Task[bytes]]] = collections.deque()

    def _fill(self) -> None:
        while self._next < self.total and len(self._pending) < self.ahead:
            size = min(self.chunk, self.total - self._next)
            task = asyncio.create_task(self.source.read(self.digest, self._next, size))
            self._pending.append((self._next, task))
            self._next += size

    async def next(self) -> bytes:
        """The next chunk, b"" at the end."""
        self._fill()
        if not self._pending:
            return b""
        offset, task = self._pending.popleft()
        data = await task
        expected = min(self.chunk, self.total - offset)
        if len(data) != expected:
            raise Internal(f"content {self.digest}: read at {offset} returned {len(data)} "
                           f"bytes, expected {expected}")
        self._fill()
        return data

    def close(self) -> None:
        for _, task in self._pending:
            task.cancel()
        self._pending.clear()


if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer is 3.12+


class ThreadReader(io.RawIOBase):
    """A blocking, readable stream over a Prefetcher, for use off the event loop only."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fetch: Prefetcher) -> None:
        super().__init__()
        self._loop = loop
        self._fetch = fetch
        self._buf = memoryview(b"")
        self._eof = False
        self._aborted = False
        self._current: concurrent.futures.Future[bytes] | None = None
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def abort(self) -> None:
        """Make the reading thread fail at its next read (called from the loop)."""
        self._aborted = True
        if self._current is not None:
            self._current.cancel()

    def readinto(self, b: Buffer) -> int:
        # io.RawIOBase.read passes a bytearray; io.BufferedReader, a memoryview.
        assert isinstance(b, (bytearray, memoryview))
        while not self._buf:
            if self._eof:
                return 0
            if self._aborted:
                raise Internal("layer read aborted")
            self._current = asyncio.run_coroutine_threadsafe(self._fetch.next(), self._loop)
            try:
                data = self._current.result()
            except concurrent.futures.CancelledError:
                raise Internal("layer read aborted") from None
            finally:
                self._current = None
            if not data:
                self._eof = True
                return 0
            self._buf = memoryview(data)
            self.bytes_read += len(data)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def open_local(info: ContentInfo) -> int | None:
    """A read-only descriptor of the committed blob at `info.path` when this process can
    open it and it has the expected size, else None (another machine or mount namespace, or
    gone: the caller reads over the bus). The puller commits a blob only once its digest is
    checked, and never rewrites it, so the open file is the blob for as long as it is read
    (even if it is deleted meanwhile). Only a content-store path named by the digest is
    taken (`.../blobs/sha256/<hex>`): a reply cannot point the unpack at any other file."""
    path = info.path
    algorithm, _, hex_digest = info.digest.partition(":")
    parts = PurePosixPath(path).parts
    if not path or not os.path.isabs(path) or ".." in parts or \
            parts[-3:] != ("blobs", algorithm, hex_digest):
        return None
    return _open_regular(path, size=info.size)


class LocalReader(io.RawIOBase):
    """A blob file read by a worker thread, which `abort` stops at its next read."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._file = io.FileIO(fd, "rb", closefd=False)
        self._aborted = False

    def readable(self) -> bool:
        return True

    def abort(self) -> None:
        self._aborted = True

    def readinto(self, b: Buffer) -> int:
        if self._aborted:
            raise Internal("layer read aborted")
        return self._file.readinto(b) or 0


# Following a download: how long a layer may wait for its download to start (the pull
# fetches a bounded number at a time, largest first), and for new bytes while the puller's
# writer is alive; without a writer, silence ends it at once.
INGEST_APPEAR = 120.0
INGEST_SILENCE = 60.0
_WATCH_EVERY = 0.25


def _ingest_names(info: ContentInfo) -> tuple[PurePosixPath, PurePosixPath, PurePosixPath]:
    """(ingest data, its writer's lock, the committed blob) for a partial ContentInfo, whose
    path must be a content store's `.../ingest/<hex>.data` (as open_local checks blobs)."""
    algorithm, _, hex_digest = info.digest.partition(":")
    path = PurePosixPath(info.path)
    if algorithm != "sha256" or not info.path or not path.is_absolute() or \
            ".." in path.parts or path.parts[-2:] != ("ingest", f"{hex_digest}.data"):
        raise Internal(f"content {info.digest}: the ingest path {info.path!r} is not a "
                       "content store's")
    store = path.parent.parent
    return path, path.parent / f"{hex_digest}.lock", store / "blobs" / algorithm / hex_digest


class Ingest:
    """A layer blob being downloaded on this machine, open for reading as it grows (or the
    committed blob, if the download finished first): `fd`, and `watch` for its writer."""

    def __init__(self, fd: int, lock: PurePosixPath, size: int, digest: str) -> None:
        self.fd = fd
        self.lock = lock
        self.size = size
        self.digest = digest

    @classmethod
    async def open(cls, info: ContentInfo) -> Ingest:
        """Wait for the download's file to appear (or the blob to be committed)."""
        data, lock, blob = _ingest_names(info)
        if not os.path.isdir(data.parent):
            # The puller is on another machine (or mount namespace): nothing to follow.
            raise Unavailable(f"content {info.digest}: the puller's ingest directory is not "
                              "on this machine")
        deadline = asyncio.get_running_loop().time() + INGEST_APPEAR
        while True:
            for path in (data, blob):
                fd = _open_regular(str(path))
                if fd is not None:
                    return cls(fd, lock, info.size, info.digest)
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable(f"content {info.digest}: its download did not start in "
                                  f"{INGEST_APPEAR:.0f} s")
            await asyncio.sleep(0.02)

    def close(self) -> None:
        os.close(self.fd)

    def _writer_alive(self) -> bool:
        try:
            fd = os.open(self.lock, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # the puller's writer holds it
        except OSError:
            return False
        finally:
            os.close(fd)  # also drops our shared lock at once
        return False

    async def watch(self) -> None:
        """Return once every byte is there; raise Unavailable when the download stopped: no
        writer and no new byte for a while, or no new byte for INGEST_SILENCE."""
        loop = asyncio.get_running_loop()
        held, since = -1, loop.time()
        while True:
            size = os.fstat(self.fd).st_size
            if size >= self.size:
                return
            now = loop.time()
            if size != held:
                held, since = size, now
            elif now - since > INGEST_SILENCE or (
                    now - since > 1.0 and not self._writer_alive()):
                raise Unavailable(f"content {self.digest}: its download stopped at byte "
                                  f"{size} of {self.size}")
            await asyncio.sleep(_WATCH_EVERY)


def _open_regular(path: str, *, size: int | None = None) -> int | None:
    """A read-only descriptor of the regular file at `path` (not through a symlink), of
    `size` bytes if given; else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and (size is None or st.st_size == size):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None
