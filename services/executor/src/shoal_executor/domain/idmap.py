"""Idmapped mounts (mount_setattr(2) with MOUNT_ATTR_IDMAP) and the user namespaces they
are made with.

runc 1.1 cannot make idmapped mounts (1.2 can), so the executor makes them itself before
the runtime runs, and hands it plain paths: any OCI runtime that can join a user namespace
then runs a pod in one. An idmapped mount shows a file owned by id k on disk as owned by
host id map(k), which the pod's user namespace shows as k again: image files owned by 0
are owned by the pod's root. overlayfs cannot be idmapped itself, but takes idmapped
lower layers (Linux 5.19).

The kernel takes the mapping from a user namespace, so one is made by a short-lived helper,
util-linux `unshare --user` (a fork of this multi-threaded process could deadlock), whose
maps the executor writes from outside, as root may."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
from collections.abc import AsyncIterator

from shoal_common.errors import Internal

from shoal_executor.domain.checks.userns import IdMap

# The same numbers on every architecture (syscalls added since Linux 5.1 share them).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_IDMAP = 0x100000
MOUNT_ATTRS = {"ro": 0x1, "nosuid": 0x2, "nodev": 0x4, "noexec": 0x8}
HELPER_TIMEOUT = 5.0

_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _idmapped_tree(source: str, userns_fd: int, recursive: bool, attrs: int) -> int:
    """A detached copy of the mount at `source`, idmapped: its fd."""
    rec = AT_RECURSIVE if recursive else 0
    fd = _check(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source),
                              OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | rec),
                f"open_tree {source}")
    try:
        attr = _MountAttr(MOUNT_ATTR_IDMAP | attrs, 0, 0, userns_fd)
        _check(_libc.syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH | rec,
                             ctypes.byref(attr), ctypes.sizeof(attr)),
               f"idmapping {source}")
    except OSError:
        os.close(fd)
        raise
    return fd


def mount_attrs(options: list[str]) -> int:
    """The mount attributes of mount(8) flags (those an idmapped copy can take)."""
    return sum(bit for name, bit in MOUNT_ATTRS.items() if name in options)


def idmapped_mount(source: str, target: str, userns_fd: int, *, recursive: bool = True,
                   attrs: int = 0) -> None:
    """Mount `source` (and, `recursive`, the mounts below it) idmapped at `target`, which
    must exist (a directory, or a file for a file), with `attrs` (MOUNT_ATTR_*) set."""
    fd = _idmapped_tree(source, userns_fd, recursive, attrs)
    try:
        _check(_libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, os.fsencode(target),
                             MOVE_MOUNT_F_EMPTY_PATH), f"attaching {source} at {target}")
    finally:
        os.close(fd)


def idmap_problem(path: str, userns_fd: int) -> str | None:
    """None when the filesystem of `path` can be idmapped, else why not (the copy made to
    find out is dropped with its fd, never attached)."""
    try:
        os.close(_idmapped_tree(path, userns_fd, recursive=False, attrs=0))
    except OSError as exc:
        return f"idmapped mounts of {path}: {exc.strerror}"
    return None


def _write_maps(pid: int, idmap: IdMap) -> None:
    for name, line in zip(("uid_map", "gid_map"), idmap.proc_lines(), strict=True):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, line.encode())  # one write: the kernel takes a map only whole
        finally:
            os.close(fd)


class UsernsHelper:
    """A process in a new user namespace (and network namespace, `net`) with `idmap`
    written, alive inside the `async with`: its /proc/<pid>/ns files are the namespaces."""

    def __init__(self, idmap: IdMap, net: bool = False) -> None:
        self.idmap = idmap
        self.net = net
        self.pid = 0
        self._proc: asyncio.subprocess.Process | None = None

    def ns(self, kind: str) -> str:
        return f"/proc/{self.pid}/ns/{kind}"

    async def __aenter__(self) -> UsernsHelper:
        # `unshare` execs sh only after unshare(2): the line sh writes says it is done.
        self._proc = await asyncio.create_subprocess_exec(
            "unshare", "--user", *(["--net"] if self.net else []), "--",
            "sh", "-c", "echo; read _", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        self.pid = self._proc.pid
        try:
            async with asyncio.timeout(HELPER_TIMEOUT):
                ready = await self._proc.stdout.readline()  # type: ignore[union-attr]
            if not ready:
                raise Internal("unshare --user failed (no user namespace made)")
            _write_maps(self.pid, self.idmap)
        except (OSError, TimeoutError) as exc:
            await self._end()
            raise Internal(f"making a user namespace: {exc}") from None
        except BaseException:
            await self._end()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._end()

    async def _end(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()  # sh's `read` ends: it exits
        try:
            async with asyncio.timeout(HELPER_TIMEOUT):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def userns_fd(idmap: IdMap) -> AsyncIterator[int]:
    """An fd of a user namespace with `idmap`, for idmapping mounts."""
    async with UsernsHelper(idmap) as helper:
        fd = os.open(helper.ns("user"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)
