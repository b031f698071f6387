"""A container's output as Docker streams it: read from its CRI log file
(`TIME STREAM P|F TEXT` lines, P = a partial line continued by the next), framed as Docker's
multiplexed stream (8-byte header: stream 1/2, three zero bytes, big-endian length) unless
the container has a TTY, where the bytes go as they are."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from shoal_docker_gateway.domain.backend import Backend
from shoal_docker_gateway.domain.containers import POLL, observe
from shoal_docker_gateway.store.containers import ContainerRecord, Containers

STREAMS = {"stdout": 1, "stderr": 2}
READ = 64 * 1024
DRAIN_READS = 3


@dataclass
class Entry:
    time: str  # RFC 3339 with nanoseconds, as the CRI wrote it
    stream: str
    text: bytes  # with its newline unless partial


def parse_line(line: bytes) -> Entry | None:
    """One CRI log line (without its newline); None for a malformed one."""
    parts = line.split(b" ", 3)
    if len(parts) < 3 or parts[1] not in (b"stdout", b"stderr"):
        return None
    text = parts[3] if len(parts) == 4 else b""
    return Entry(parts[0].decode(errors="replace"), parts[1].decode(),
                 text if parts[2] == b"P" else text + b"\n")


def frame(stream: str, data: bytes) -> bytes:
    return struct.pack(">BxxxI", STREAMS[stream], len(data)) + data


def seconds_of(stamp: str) -> float:
    """The CRI's RFC 3339 time (nanoseconds cut to microseconds)."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    try:
        base = datetime.fromisoformat(head + "+00:00").timestamp()
    except ValueError:
        return 0.0
    return base + float(f"0.{frac[:9] or '0'}")


@dataclass
class LogQuery:
    stdout: bool = True
    stderr: bool = True
    follow: bool = False
    timestamps: bool = False
    since: float = 0.0
    until: float = 0.0
    tail: int = -1  # lines from the end; -1: all


def _select(entry: Entry, q: LogQuery) -> bool:
    if not (q.stdout if entry.stream == "stdout" else q.stderr):
        return False
    if q.since or q.until:
        t = seconds_of(entry.time)
        if (q.since and t < q.since) or (q.until and t > q.until):
            return False
    return True


def _render(entry: Entry, q: LogQuery, tty: bool) -> bytes:
    data = (entry.time.encode() + b" " + entry.text) if q.timestamps else entry.text
    return data if tty else frame(entry.stream, data)


async def _lines_from(path: Path, offset: int) -> tuple[list[bytes], int]:
    """Whole lines of the file after `offset`, and the offset after the last of them."""
    def read() -> tuple[list[bytes], int]:
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read(READ * 16)
        except FileNotFoundError:
            return [], offset
        end = data.rfind(b"\n")
        if end < 0:
            return [], offset
        return data[:end].split(b"\n"), offset + end + 1
    return await asyncio.to_thread(read)


async def _running(backend: Backend, rec: ContainerRecord) -> bool:
    fresh = await Containers(backend.records).by_id(rec.id)
    if fresh is None:
        return False
    return (await observe(backend, fresh)).status in ("running", "created")


async def stream(backend: Backend, rec: ContainerRecord, path: Path, q: LogQuery,
                 start: int = 0) -> AsyncIterator[bytes]:
    """The log's entries as Docker frames them; with `follow`, until the container stops."""
    tty = bool(rec.config.get("Tty"))
    offset = start
    lines, offset = await _lines_from(path, offset)
    entries = [e for e in map(parse_line, lines) if e is not None and _select(e, q)]
    while len(lines) >= 1 and q.tail < 0:
        for e in entries:
            yield _render(e, q, tty)
        lines, offset = await _lines_from(path, offset)
        entries = [e for e in map(parse_line, lines) if e is not None and _select(e, q)]
    if q.tail >= 0:
        while lines:  # read to the end, keep the last `tail` entries
            more, offset = await _lines_from(path, offset)
            if not more:
                break
            entries += [e for e in map(parse_line, more) if e is not None and _select(e, q)]
        for e in entries[len(entries) - q.tail:] if q.tail else []:
            yield _render(e, q, tty)
    if q.follow:
        async for chunk in _follow(backend, rec, path, q, offset):
            yield chunk


async def _follow(backend: Backend, rec: ContainerRecord, path: Path, q: LogQuery,
                  offset: int) -> AsyncIterator[bytes]:
    tty = bool(rec.config.get("Tty"))
    while True:
        lines, offset = await _lines_from(path, offset)
        for entry in map(parse_line, lines):
            if entry is not None and _select(entry, q):
                yield _render(entry, q, tty)
        if not lines:
            if not await _running(backend, rec):
                # The last words: conmon may still be writing them as the exit is known.
                for _ in range(DRAIN_READS):
                    await asyncio.sleep(POLL)
                    lines, offset = await _lines_from(path, offset)
                    for last in map(parse_line, lines):
                        if last is not None and _select(last, q):
                            yield _render(last, q, tty)
                return
            await asyncio.sleep(POLL)


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
