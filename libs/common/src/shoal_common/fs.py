"""Files and directories that hold configuration, environment, credentials or metadata:
owner-only from their first byte (created with the mode, never chmod'ed after writing)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import overload

PRIVATE_DIR = 0o700
# Where a runtime helper (conmon, runc) or a container's user must pass through by name.
TRAVERSE_DIR = 0o711
PRIVATE_FILE = 0o600


def private_dir(path: Path, mode: int = PRIVATE_DIR) -> Path:
    """Make `path` (and missing parents, owner-only) and tighten it to `mode`."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != mode:
        os.chmod(path, mode)  # an existing directory from an older version: a dir, no data
    return path


def write_private(path: Path, data: str | bytes) -> None:
    """Replace `path` atomically with `data`, owner-only from the first byte."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, PRIVATE_FILE)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


class Under:
    """A read-only attribute naming a path below another attribute of the same object
    (`db = Under("state_dir", "tasks.db")`): a layout as a table of names, not a property
    each."""

    def __init__(self, base: str, *parts: str) -> None:
        self.base = base
        self.parts = parts

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Under: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> Path: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> Under | Path:
        if obj is None:
            return self
        return Path(getattr(obj, self.base)).joinpath(*self.parts)

    def __set__(self, obj: object, value: object) -> None:
        raise AttributeError(f"a path below {self.base} is not set but derived")
