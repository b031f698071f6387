"""Mounting the snapshot mounts the snapshotter hands out (data: type, source, options), and
the pod's /dev/shm.

mount(2) and umount2(2) are called directly (ctypes over libc; the stdlib has neither):
running util-linux `mount` cost a fork and exec per mount, a few milliseconds each on the
pod start path, three times per pod."""

from __future__ import annotations

import ctypes
import errno
import os

from shoal_common.errors import Internal, Invalid
from shoal_common.messages.snapshots import Mount

ALLOWED_TYPES = {"overlay", "bind"}

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_RELATIME = 0x200000
MNT_DETACH = 0x2
MAX_STACKED = 16  # mounts on one point unmount_below takes off before giving up

# Options that are mount flags rather than filesystem data (as mount(8) splits them).
_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
          "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME,
          "bind": MS_BIND, "rbind": MS_BIND | MS_REC}
_NO_OPS = {"rw", "suid", "dev", "exec", "defaults"}

_libc = ctypes.CDLL(None, use_errno=True)


def _split_options(options: list[str]) -> tuple[int, str]:
    flags = 0
    data = []
    for opt in options:
        if opt in _FLAGS:
            flags |= _FLAGS[opt]
        elif opt not in _NO_OPS:
            data.append(opt)
    return flags, ",".join(data)


def mount(source: str, target: str, fstype: str, options: list[str]) -> None:
    """mount(2) with mount(8)-style options; OSError naming the target on failure."""
    flags, data = _split_options(options)
    if _libc.mount(os.fsencode(source), os.fsencode(target),
                   fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} {source} on {target}: "
                      f"{os.strerror(err)}")


def _umount(target: str, flags: int = 0) -> None:
    if _libc.umount2(os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def _unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    if b"\\" not in field:
        return field
    for code in (b"\\040", b"\\011", b"\\012", b"\\134"):
        field = field.replace(code, bytes([int(code[1:], 8)]))
    return field


AT_FDCWD = -100
STATX_ATTR_MOUNT_ROOT = 0x2000
_STATX_SIZE = 256  # struct statx; stx_attributes at 8, stx_attributes_mask at 56
_statx = getattr(_libc, "statx", None)


def _mount_root(path: str) -> bool | None:
    """statx(2)'s STATX_ATTR_MOUNT_ROOT (Linux 5.8+): whether `path` (symlinks followed)
    is the root of a mount, bind mounts included; None where the kernel cannot tell."""
    if _statx is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if _statx(AT_FDCWD, os.fsencode(path), 0, 0, buf) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOENT, errno.ENOTDIR):
            return False
        return None
    attributes = int.from_bytes(buf.raw[8:16], "little")
    supported = int.from_bytes(buf.raw[56:64], "little")
    if not supported & STATX_ATTR_MOUNT_ROOT:
        return None
    return bool(attributes & STATX_ATTR_MOUNT_ROOT)


def is_mountpoint(path: str) -> bool:
    """Whether something is mounted at `path`. os.path.ismount compares device numbers, so
    it cannot see a bind mount from the same filesystem (the native driver's rootfs):
    statx says so directly, in constant time; /proc/self/mountinfo, read where statx
    cannot tell, costs a parse of every mount on the host (hundreds with many pods)."""
    known = _mount_root(path)
    if known is not None:
        return known
    wanted = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as fh:
        return any(_unescape(line.split(b" ", 5)[4]) == wanted for line in fh)


def mounted_below(path: str) -> bool:
    """Whether anything is mounted at `path` or below it."""
    wanted = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as fh:
        points = [_unescape(line.split(b" ", 5)[4]) for line in fh]
    return any(p == wanted or p.startswith(wanted + b"/") for p in points)


def _points_below(prefix: bytes) -> list[bytes]:
    with open("/proc/self/mountinfo", "rb") as fh:
        points = [_unescape(line.split(b" ", 5)[4]) for line in fh]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def unmount_below(path: str) -> None:
    """Detach every mount strictly below `path`, deepest first (stacked ones too): what a
    crash or a container's idmapped volumes left in a bundle before its tree is removed."""
    prefix = os.fsencode(os.path.realpath(path)) + b"/"
    for _ in range(MAX_STACKED):
        points = _points_below(prefix)
        if not points:
            return
        for point in points:
            try:
                _umount(os.fsdecode(point), MNT_DETACH)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # not mounted any more: a stacked twin went
                    raise Internal(f"unmounting {os.fsdecode(point)}: {exc.strerror}") from None


def mount_tmpfs(target: str, options: list[str]) -> None:
    try:
        mount("tmpfs", target, "tmpfs", options)
    except OSError as exc:
        raise Internal(str(exc.strerror)) from None


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
    try:
        for m in mounts:
            if m.type == "bind":
                opts = [o for o in m.options if o not in ("bind", "rbind", "ro")]
                mount(m.source, target, "", ["rbind", *opts])
                if "ro" in m.options:  # a bind mount takes ro only on a remount
                    flags, _ = _split_options(["ro", *opts])
                    if _libc.mount(None, os.fsencode(target), None,
                                   ctypes.c_ulong(MS_REMOUNT | MS_BIND | flags), None) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"remount {target} read-only: {os.strerror(err)}")
            else:
                mount(m.type, target, m.type, list(m.options))
    except OSError as exc:
        raise Internal(f"mounting the rootfs at {target}: {exc.strerror}") from None


async def unmount(target: str) -> None:
    if not os.path.exists(target):
        return
    while is_mountpoint(target):
        try:
            _umount(target)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # not a mount point after all (raced)
                return
            # Busy (a process still holds it): detach so removal can proceed.
            try:
                _umount(target, MNT_DETACH)
            except OSError as again:
                raise Internal(f"unmounting {target}: {again.strerror}") from None
