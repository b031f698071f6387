"""mount(2), umount2(2) and syncfs(2) through libc, and the mount table.

Direct syscalls rather than the `mount` command: an unpack mounts and unmounts once per
layer, and a fork+exec of util-linux per call would cost more than the call itself.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syncfs.argtypes = [ctypes.c_int]

MS_RDONLY = 1
MNT_DETACH = 2
# The kernel takes mount options in one page.
MAX_OPTIONS = 4095


def _check(ret: int, what: str, path: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def mount(source: str, target: str | Path, fstype: str, options: list[str],
          flags: int = 0) -> None:
    data = ",".join(options)
    if len(data) > MAX_OPTIONS:
        raise OSError(errno.E2BIG, f"mount options are {len(data)} bytes, more than the "
                      f"kernel's {MAX_OPTIONS} (too many layers)", str(target))
    _check(_libc.mount(source.encode(), os.fsencode(target), fstype.encode(), flags,
                       data.encode() if data else None), f"mount -t {fstype}", str(target))


def umount(target: str | Path, *, lazy: bool = False) -> None:
    _check(_libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0), "umount",
           str(target))


def syncfs(path: str | Path) -> None:
    """Flush the filesystem holding `path`: a commit must not outlive its files on a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _check(_libc.syncfs(fd), "syncfs", str(path))
    finally:
        os.close(fd)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(path: str | Path) -> list[str]:
    """Mount points at or below `path`, deepest first (the order to unmount them in)."""
    base = os.path.realpath(path)
    prefix = base.rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            target = _unescape(line.split(" ", 5)[4])
            if target == base or target.startswith(prefix):
                found.append(target)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


def unmount_all_under(path: str | Path) -> None:
    """Unmount everything at or below `path` (lazily if busy); raise if something stays."""
    for target in mounts_under(path):
        try:
            umount(target)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # already gone
                continue
            umount(target, lazy=True)
    left = mounts_under(path)
    if left:
        raise OSError(errno.EBUSY, "still mounted", left[0])
