"""A compromised peer on the bus, for tests of a service's edge: raw requests (any bytes,
no typed client), and what must stay untouched outside Shoal's roots."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import msgspec
import nats
from shoal_common import headers
from shoal_common.messages import ErrorBody

REPLY_TIMEOUT = 30.0
# Not MessagePack, or not a map: no request type decodes them.
GARBAGE = [b"", b"\xc1", b"\xff" * 1000, msgspec.msgpack.encode([1, 2, 3]),
           msgspec.msgpack.encode("a string"), msgspec.msgpack.encode(2**64 - 1)]
# The wrong type whatever a field should be.
WRONG_TYPES: list[Any] = [{"nested": [1, 2]}, None, [b"\x00"]]
# Numbers no bounded field takes.
HUGE_NUMBERS: list[Any] = [-1, 2**63 - 1, 2**64 - 1, -(2**63), 1e308, float("inf"),
                           float("nan")]


async def ask(nc: nats.NATS, subject: str, body: bytes,
              timeout: float = REPLY_TIMEOUT) -> tuple[str, str]:
    """(status, error message) of one request, or ("no reply", ...) if none came."""
    try:
        msg = await nc.request(subject, body, timeout=timeout,
                               headers={headers.TRACE_ID: uuid.uuid4().hex})
    except (TimeoutError, nats.errors.TimeoutError):
        return "no reply", f"nothing within {timeout}s"
    status = (msg.headers or {}).get(headers.STATUS, "")
    if status == "ok":
        return status, ""
    return status, msgspec.msgpack.decode(msg.data, type=ErrorBody).message


def snapshot_of(path: Path) -> dict[str, tuple[int, int, float, bytes]]:
    """Every entry below `path`: mode, size, mtime and (files) content."""
    out = {}
    for entry in [path, *sorted(path.rglob("*"))]:
        st = entry.lstat()
        data = entry.read_bytes() if entry.is_file() and not entry.is_symlink() else b""
        out[str(entry)] = (st.st_mode, st.st_size, st.st_mtime, data)
    return out
