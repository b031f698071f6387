"""Helpers for the executor's tests."""

from __future__ import annotations

from pathlib import Path


def write_mountinfo(tmp: Path, *mounts: tuple[str, str, str]) -> str:
    """A /proc/self/mountinfo under `tmp` with these (mount point, fs type, options)."""
    lines = [f"{30 + i} 23 0:{30 + i} / {point} rw,relatime - {fstype} {fstype} {opts}"
             for i, (point, fstype, opts) in enumerate(mounts)]
    path = tmp / "mountinfo"
    path.write_text("\n".join(lines) + "\n")
    return str(path)
