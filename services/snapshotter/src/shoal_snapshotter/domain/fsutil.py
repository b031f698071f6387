"""Filesystem helpers for snapshot directories: copy, remove, measure."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from shoal_common.errors import Internal


async def copy_tree(src: Path, dst: Path) -> None:
    """Copy the tree `src` into the existing empty directory `dst` (the native driver).

    GNU `cp -a` rather than our own walk: it keeps modes (incl. setuid/setgid after chown),
    owners, xattrs, ns times, device nodes, fifos, sockets, symlinks, sparse files, and
    hardlinks *within* the tree, and copies data with copy_file_range/reflink where the
    filesystem can. Nothing is ever hardlinked *to* the parent (that would let a container
    write into a committed layer). Following symlinks is not a concern here: `-a` implies
    `-P` (never dereference in the source), the source is a committed snapshot no one
    writes to, and the destination is a fresh directory only this call writes into.
    """
    proc = await asyncio.create_subprocess_exec(
        "cp", "-a", "--reflink=auto", "--", f"{src}/.", str(dst),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await proc.communicate()
    except BaseException:  # cancelled: the copy must not go on writing into what we delete
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())
        raise
    if proc.returncode != 0:
        raise Internal(f"copying snapshot {src} to {dst} failed: "
                       f"{err.decode(errors='replace').strip()[-500:]}")


def remove_dir(path: Path) -> None:
    """Delete a directory tree we own. shutil.rmtree works from directory fds and never
    follows symlinks, so entries placed by layers cannot redirect it. Callers unmount
    anything below `path` first. A concurrent remover (another replica's cleanup) is fine."""

    def onerror(_fn: object, _path: str, exc_info: tuple[type[BaseException], BaseException,
                                                          object]) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=onerror)


@dataclass(frozen=True)
class Usage:
    bytes: int
    inodes: int


def disk_usage(path: Path) -> Usage:
    """Bytes allocated (st_blocks * 512) and inodes used below `path`, each inode counted once
    (hardlinks) and never crossing into other filesystems (e.g. an unpack's overlay mount)."""
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return Usage(0, 0)
    dev = top.st_dev
    seen = {(top.st_dev, top.st_ino)}
    total = top.st_blocks * 512
    todo = [os.fspath(path)] if stat.S_ISDIR(top.st_mode) else []
    while todo:
        current = todo.pop()
        try:
            with os.scandir(current) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if st.st_dev != dev:
                        continue  # a mount point: someone else's filesystem
                    ident = (st.st_dev, st.st_ino)
                    if ident in seen:
                        continue
                    seen.add(ident)
                    total += st.st_blocks * 512
                    if stat.S_ISDIR(st.st_mode):
                        todo.append(entry.path)
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed while we walked
    return Usage(total, len(seen))
