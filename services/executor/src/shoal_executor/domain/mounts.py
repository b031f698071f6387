"""Mounting the snapshot mounts the snapshotter hands out (data: type, source, options)."""

from __future__ import annotations

import asyncio
import os

from shoal_common.errors import Internal, Invalid
from shoal_common.messages.snapshots import Mount

ALLOWED_TYPES = {"overlay", "bind"}


async def _run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


def is_mountpoint(path: str) -> bool:
    return os.path.ismount(path)


async def mount_all(mounts: list[Mount], target: str) -> None:
    """Mount the rootfs at `target` (idempotent: an existing mount there is kept)."""
    os.makedirs(target, exist_ok=True)
    if is_mountpoint(target):
        return
    if not mounts:
        raise Invalid("no rootfs mounts given")
    for m in mounts:
        if m.type not in ALLOWED_TYPES:
            raise Invalid(f"unsupported rootfs mount type {m.type!r}")
        if m.type == "bind":
            opts = [o for o in m.options if o not in ("bind", "rbind")]
            code, out = await _run("mount", "--rbind", m.source, target)
            if code == 0 and "ro" in opts:
                code, out = await _run("mount", "-o", "remount,bind,ro", target)
        else:
            code, out = await _run("mount", "-t", m.type, "-o", ",".join(m.options),
                                   m.source, target)
        if code != 0:
            raise Internal(f"mounting the rootfs at {target}: {out}")


async def unmount(target: str) -> None:
    if not os.path.exists(target):
        return
    while is_mountpoint(target):
        code, out = await _run("umount", target)
        if code != 0:
            # Busy (a process still holds it): detach so removal can proceed.
            code, out = await _run("umount", "-l", target)
            if code != 0:
                raise Internal(f"unmounting {target}: {out}")
