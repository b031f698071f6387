"""Per-chain unpack locks shared by every snapshotter process of a node.

flock(2) on `locks/<sha256(chain id)>.lock`: held while a chain is unpacked, released by the
kernel when the holder dies (so a crashed unpack never blocks anyone, and "lock free" means
"nobody is working on it"). flock locks belong to open file descriptions, so two tasks of
one process exclude each other too. Waiting polls with LOCK_NB: a blocking flock would tie
up a thread per waiter. Lock files are never deleted: unlinking a lock file someone waits on
would let a third party lock a new file of the same name; they are empty (one inode each).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path


class ChainLocks:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, chain_id: str) -> Path:
        # Hashed: chain ids are caller-supplied text, file names must stay plain.
        return self.directory / f"{hashlib.sha256(chain_id.encode()).hexdigest()}.lock"

    def try_acquire(self, chain_id: str) -> int | None:
        """The locked fd, or None when someone else holds the lock."""
        fd = os.open(self.path(chain_id), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def release(fd: int) -> None:
        os.close(fd)  # closing the last fd of the description drops the flock

    @contextlib.asynccontextmanager
    async def hold(self, chain_id: str) -> AsyncIterator[bool]:
        """Hold the chain's lock; yields whether we had to wait for someone else."""
        waited = False
        delay = 0.02
        while (fd := self.try_acquire(chain_id)) is None:
            waited = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
        try:
            yield waited
        finally:
            self.release(fd)
