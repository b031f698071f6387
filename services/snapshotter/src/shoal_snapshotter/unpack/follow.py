"""Reading a layer blob that is still being downloaded: its ingest file, as it grows.

The puller appends to the ingest file and renames it into the content store once the digest
matches; an open descriptor keeps reading the same file across that rename. `Following`
reads at most `size` bytes, waiting at the end of what is there so far. It does not hash
them: the puller checks the blob's digest as it downloads, and what the unpack commits is
checked where it matters, the diff ID of the tar it applied (so bytes of a download that
started over, or that a registry changed, never become a layer unless they are that exact
tar; hashing the compressed bytes here too cost ~3% of a cold pull's CPU). Whether the
download is still alive is the caller's watch (it aborts the reader, or kills the worker
process reading it); the reader itself only gives up after a long silence.

What it has read it drops from the page cache behind it (the blob is not read again once
its layer is applied): the pages are reused, still warm, by the files the unpack writes,
where a page new to this VM costs ~11 us of system time to fault in (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer is 3.12+

# Waits at the end of the data grow from the first to the last, so a fast download is
# followed closely and a stalled one costs few wake-ups.
_FIRST_WAIT = 0.002
_LAST_WAIT = 0.05
SILENCE = 300.0  # no new byte for this long: give up whatever the caller's watch says
# Every this many bytes read, the range read since a few steps ago is advised away: the
# first advice starts the writeback of pages still dirty, a later one drops them once clean.
DROP_STEP = 8 << 20
_DROP_SPAN = 4 * DROP_STEP


class ContentChanged(Exception):
    """What was read of a blob being downloaded is not the blob (or never came)."""


class Following(io.RawIOBase):
    def __init__(self, fd: int, size: int, digest: str, *, silence: float = SILENCE) -> None:
        super().__init__()
        self._fd = fd
        self.size = size
        self.digest = digest
        self.silence = silence
        self.offset = 0
        self._aborted = False
        self._dropped_at = 0  # offset at the last advice

    def readable(self) -> bool:
        return True

    def abort(self) -> None:
        """Make the reading thread fail at its next read or wait (from another thread)."""
        self._aborted = True

    def readinto(self, b: Buffer) -> int:
        view = memoryview(b).cast("B")
        want = min(len(view), self.size - self.offset)
        if want <= 0:
            return 0
        wait, since = _FIRST_WAIT, time.monotonic()
        while True:
            if self._aborted:
                raise ContentChanged(f"{self.digest}: reading the download was stopped")
            n = os.preadv(self._fd, [view[:want]], self.offset)
            if n:
                self.offset += n
                if self.offset - self._dropped_at >= DROP_STEP or self.offset == self.size:
                    self._drop_behind()
                return n
            if time.monotonic() - since > self.silence:
                raise ContentChanged(f"{self.digest}: no new data for {self.silence:.0f} s "
                                     f"at byte {self.offset} of {self.size}")
            time.sleep(wait)
            wait = min(wait * 2, _LAST_WAIT)

    def _drop_behind(self) -> None:
        start = max(0, self.offset - _DROP_SPAN)
        with contextlib.suppress(OSError):  # advice: a file system may not take it
            os.posix_fadvise(self._fd, start, self.offset - start, os.POSIX_FADV_DONTNEED)
        self._dropped_at = self.offset
