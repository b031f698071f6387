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
"""

from __future__ import annotations

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
                return n
            if time.monotonic() - since > self.silence:
                raise ContentChanged(f"{self.digest}: no new data for {self.silence:.0f} s "
                                     f"at byte {self.offset} of {self.size}")
            time.sleep(wait)
            wait = min(wait * 2, _LAST_WAIT)
