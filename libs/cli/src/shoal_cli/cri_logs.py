"""Reading CRI container log files as `shoal run` and `shoal logs` print them: decoding the
CRI line format, and following a file that grows, rotates or is truncated."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import BinaryIO

from shoal_cli.output import write

POLL = 0.1  # seconds between ContainerStatus polls and log reads


class LogDecoder:
    """CRI log lines (`<RFC3339Nano> <stdout|stderr> <P|F>[:tags] <text>`) → output, a P
    (partial) fragment joined with what follows on its stream up to the F line."""

    def __init__(self) -> None:
        self.rest = b""
        self.partial: dict[str, bytes] = {}

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        self.rest += data
        *lines, self.rest = self.rest.split(b"\n")
        out = []
        for line in lines:
            fields = line.split(b" ", 3)
            if len(fields) < 3 or fields[1] not in (b"stdout", b"stderr"):
                continue  # not a CRI log line
            stream = fields[1].decode()
            text = fields[3] if len(fields) == 4 else b""
            if fields[2].split(b":")[0] == b"P":
                self.partial[stream] = self.partial.get(stream, b"") + text
            else:
                out.append((stream, self.partial.pop(stream, b"") + text + b"\n"))
        return out

    def flush(self) -> list[tuple[str, bytes]]:
        """Partial fragments never completed (the container ended mid-line)."""
        out = [(stream, text) for stream, text in self.partial.items() if text]
        self.partial.clear()
        return out


class LogFile:
    """Reads what is appended to a log file, reopening it when it is rotated
    (ReopenContainerLog) or truncated."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file: BinaryIO | None = None
        self.inode = 0

    def read_new(self) -> bytes:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        data = b""
        if self.file is not None and (st is None or st.st_ino != self.inode):
            data = self.file.read()  # the rest of the rotated-away file
            self.close()
        if self.file is None:
            if st is None:
                return data
            self.file = open(self.path, "rb")  # kept open while following
            self.inode = os.fstat(self.file.fileno()).st_ino
        elif st is not None and st.st_size < self.file.tell():
            self.file.seek(0)  # truncated in place
        return data + self.file.read()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def write_lines(lines: list[tuple[str, bytes]]) -> None:
    for stream, text in lines:
        write(stream, text)


async def follow(log: LogFile, finished: Callable[[], Awaitable[bool]],
                 decoder: LogDecoder) -> None:
    """Print the log as it grows until `finished()`, then what is left."""
    while True:
        done = await finished()  # checked before reading: the last read gets it all
        data = log.read_new()
        write_lines(decoder.feed(data))
        if done:
            await asyncio.sleep(0.05)  # conmon's last write may trail the exit by a hair
            write_lines(decoder.feed(log.read_new()) + decoder.flush())
            return
        if not data:
            await asyncio.sleep(POLL)
