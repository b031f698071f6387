"""Applying a layer while hashing its tar stream, in this thread or in a child process.

`apply_and_digest` decompresses a blob (gzip, zstd or plain tar, sniffed), hands the tar to
`apply_layer` and hashes it on the way: the diff ID of exactly what was applied.

Run as `python -m shoal_snapshotter.unpack.worker ROOT WHITEOUTS PARENT_PID`, it does that
with the blob read from stdin, and writes the pickled outcome to stdout: ("ok", (ApplyResult,
diff ID, tar bytes)) or ("error", exception). A process of its own because applying a layer
is mostly Python (tar headers, one call per entry): threads of one interpreter take turns on
the GIL, processes apply layers side by side. The child dies with its parent
(PR_SET_PDEATHSIG), so nothing writes into a snapshot after the snapshotter is gone.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import pickle
import signal
import sys
from typing import TYPE_CHECKING, cast

from . import logs
from .apply import ApplyResult, Whiteouts, apply_layer
from .compression import Readable, open_decompressed
from .follow import Following

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer is 3.12+

_PR_SET_PDEATHSIG = 1
_STDIN_BUFFER = 1 << 20


class _Digesting(io.RawIOBase):
    """Passes the uncompressed tar stream through sha256: the diff ID of what was applied."""

    def __init__(self, inner: io.BufferedIOBase) -> None:
        super().__init__()
        self._inner = inner
        self.sha = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Buffer) -> int:
        n = self._inner.readinto(b)  # straight into the caller's buffer: no extra copy
        if n:
            self.sha.update(memoryview(b)[:n])
            self.count += n
        return n


def apply_and_digest(blob: Readable, root: str | os.PathLike[str],
                     whiteouts: Whiteouts) -> tuple[ApplyResult, str, int]:
    """Apply the (compressed) layer `blob` onto `root`; (result, diff ID, tar bytes)."""
    # apply_layer reads its input to the end (so gzip checks its trailer), so the hash
    # covers every byte of the tar stream.
    digesting = _Digesting(cast(io.BufferedIOBase, open_decompressed(blob, None)))
    result = apply_layer(digesting, root, whiteouts=whiteouts, allow_devices=True,
                         compression="none")
    return result, "sha256:" + digesting.sha.hexdigest(), digesting.count


def _die_with(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)


def _log_to_stderr() -> None:
    import structlog  # only when something is logged (unpack.logs): 0.1 s to import

    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", key="ts"),
                    structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    structlog.contextvars.bind_contextvars(service="snapshotter", component="unpack-worker")


def main(argv: list[str]) -> int:
    """ROOT WHITEOUTS PARENT_PID [SIZE DIGEST]: with SIZE and DIGEST, stdin is a blob still
    being downloaded (unpack.follow)."""
    root, whiteouts, parent, *following = argv
    _die_with(int(parent))
    # The outcome gets a private copy of stdout; anything else printed goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    logs.before_first_warning(_log_to_stderr)
    outcome: tuple[str, object]
    try:
        if following:
            size, digest = following
            blob = Following(0, int(size), digest)
            outcome = ("ok", apply_and_digest(blob, root, Whiteouts(whiteouts)))
        else:
            stdin = os.fdopen(0, "rb", buffering=_STDIN_BUFFER)
            outcome = ("ok", apply_and_digest(stdin, root, Whiteouts(whiteouts)))
    except Exception as exc:  # handed to the parent, which judges it
        outcome = ("error", exc)
    try:
        data = pickle.dumps(outcome)
    except Exception:  # an exception that does not pickle: keep its text
        err = outcome[1]
        data = pickle.dumps(("error", RuntimeError(f"{type(err).__name__}: {err}")))
    out.write(data)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
