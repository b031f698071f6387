"""How the CRI client commands print: docker-like tables and times, crictl's inspect JSON,
and container output passed through byte for byte."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from cri_api.v1 import api_pb2 as cri
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

SHORT = 13  # characters of an id shown in tables
CONTAINER_STATES = {cri.CONTAINER_CREATED: "Created", cri.CONTAINER_RUNNING: "Running",
                    cri.CONTAINER_EXITED: "Exited", cri.CONTAINER_UNKNOWN: "Unknown"}
POD_STATES = {cri.SANDBOX_READY: "Ready", cri.SANDBOX_NOTREADY: "NotReady"}


def ago(ns: int, now: float | None = None) -> str:
    """Docker's "x ago" wording for a timestamp in nanoseconds."""
    seconds = max((now if now is not None else time.time()) - ns / 1e9, 0)
    if seconds < 1:
        return "Less than a second ago"
    if seconds < 60:
        n = int(seconds)
        return f"{n} second{'s' if n != 1 else ''} ago"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute ago"
    if minutes < 60:
        return f"{minutes} minutes ago"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour ago"
    if hours < 48:
        return f"{hours} hours ago"
    days = hours // 24
    if days < 14:
        return f"{days} days ago"
    if days < 60:
        return f"{days // 7} weeks ago"
    if days < 730:
        return f"{days // 30} months ago"
    return f"{days // 365} years ago"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("   ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True))
              .rstrip())


Item = TypeVar("Item", cri.Container, cri.PodSandbox)


def print_listing(items: Sequence[Item], quiet: bool, headers: Sequence[str],
                  row: Callable[[Item, float], Sequence[str]]) -> None:
    """`ps`/`pods`: newest first, as a table or (-q) the ids alone; `row` gets the item
    and the time now, so every row's "x ago" counts from the same moment."""
    items = sorted(items, key=lambda item: item.created_at, reverse=True)
    if quiet:
        for item in items:
            print(item.id)
        return
    now = time.time()
    print_table(headers, [row(item, now) for item in items])


def write(stream: str, data: bytes) -> None:
    """Container output as is, to our stdout or stderr as the container wrote it."""
    out = sys.stderr if stream == "stderr" else sys.stdout
    out.buffer.write(data)
    out.buffer.flush()


def with_info(response: Message, info: dict[str, str]) -> dict[str, object]:
    """crictl's shape: {"status": ..., "info": ...}, each info value parsed as JSON."""
    parsed: dict[str, object] = {}
    for key, value in info.items():
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    # Zero values too (state SANDBOX_READY, exitCode 0 are the proto defaults).
    return {"status": MessageToDict(response, always_print_fields_with_no_presence=True),
            "info": parsed}
