"""Named network namespaces (/var/run/netns/<name>, as iproute2 lays them out) and their
loopback, made and removed in-process.

A named namespace is a bind mount of a namespace file onto /var/run/netns/<name>, so it
outlives any process in it: that is what lets the executor restart without the pod losing
its network. `ip netns add` did this in a child process, and `ip -n <name> link set lo up`
in another: two fork+execs, 4 ms each on the pod start path. Here a short-lived thread of
our own unshare(2)s the network namespace (a namespace change is per thread, and the thread
ends with it), bind-mounts /proc/thread-self/ns/net and brings lo up with an ioctl; the
rest of the process never leaves the host's namespace. The layout is iproute2's (the
directory a shared mount point), so `ip netns`, CNI plugins and crictl see the same."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import re
import socket
import struct
import threading
from collections.abc import Callable

from shoal_common.errors import Internal, Invalid

from shoal_executor.domain import mounts

NETNS_DIR = "/var/run/netns"
# The names Shoal gives (`shoal-<sandbox id prefix>`): one component under NETNS_DIR, so
# neither a create nor a delete can reach anything but a pod's own namespace.
_NAME = re.compile(r"\Ashoal-[A-Za-z0-9_+][A-Za-z0-9_.+-]{0,63}\Z")

CLONE_NEWNET = 0x40000000
MS_SHARED = 1 << 20
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
_IFREQ = "16sH22x"  # struct ifreq: the name, then ifr_flags in the union

_libc = ctypes.CDLL(None, use_errno=True)
_dir_ready = False


def netns_path(name: str) -> str:
    if not _NAME.match(name):
        raise Invalid(f"{name[:80]!r} is not the name of a pod network namespace")
    return os.path.join(NETNS_DIR, name)


def check(result: int, what: str) -> None:
    """OSError(errno, `what`: strerror) unless a libc call returned 0."""
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _shared_dir() -> None:
    """NETNS_DIR a mount point with shared propagation, as `ip netns add` leaves it, so a
    namespace mounted there later shows in mount namespaces that were copied earlier."""
    global _dir_ready
    if _dir_ready:
        return
    os.makedirs(NETNS_DIR, mode=0o755, exist_ok=True)
    path = os.fsencode(NETNS_DIR)
    if _libc.mount(b"", path, b"none", ctypes.c_ulong(MS_SHARED | mounts.MS_REC), None) != 0:
        if ctypes.get_errno() != errno.EINVAL:  # EINVAL: not a mount point yet
            check(-1, f"making {NETNS_DIR} shared")
        check(_libc.mount(path, path, b"none",
                           ctypes.c_ulong(mounts.MS_BIND | mounts.MS_REC), None),
               f"bind-mounting {NETNS_DIR} on itself")
        check(_libc.mount(b"", path, b"none", ctypes.c_ulong(MS_SHARED | mounts.MS_REC),
                           None), f"making {NETNS_DIR} shared")
    _dir_ready = True


def _loopback_up() -> None:
    """lo up in the calling thread's network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        got = fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack(_IFREQ, b"lo", 0))
        flags = struct.unpack(_IFREQ, got)[1]
        if not flags & IFF_UP:
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | IFF_UP))


def in_own_thread(work: Callable[[], None]) -> None:
    """Run `work` in a new thread that ends after it: whatever namespace it moved into
    ends with it (a pool thread would carry it into the next job)."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="netns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def _make(path: str, owner_pid: int) -> None:
    _shared_dir()
    # The mount point, as `ip netns add` makes it; one left by a create that died before
    # its mount is used again.
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0))

    def enter_and_mount() -> None:
        if owner_pid:
            source = f"/proc/{owner_pid}/ns/net"
            with open(source, "rb") as ns:
                check(_libc.setns(ns.fileno(), CLONE_NEWNET), f"entering {source}")
        else:
            check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        check(_libc.mount(b"/proc/thread-self/ns/net", os.fsencode(path), b"none",
                           ctypes.c_ulong(mounts.MS_BIND), None), f"bind-mounting {path}")
        _loopback_up()

    try:
        in_own_thread(enter_and_mount)
    except OSError:
        if not mounts.is_mountpoint(path):
            os.unlink(path)  # nothing was made: leave no name behind
        raise


def _bring_up(path: str) -> None:
    def enter() -> None:
        with open(path, "rb") as ns:
            check(_libc.setns(ns.fileno(), CLONE_NEWNET), f"entering {path}")
        _loopback_up()

    in_own_thread(enter)


def _create(name: str, owner_pid: int) -> str:
    path = netns_path(name)
    try:
        if mounts.is_mountpoint(path):
            _bring_up(path)  # a retry: a create that died after the mount left lo down
        else:
            _make(path, owner_pid)
    except OSError as exc:
        raise Internal(f"network namespace {name}: {exc.strerror or exc}") from None
    return path


async def create(name: str, owner_pid: int = 0) -> str:
    """A new named namespace, or (`owner_pid`) the one that process is in: a pod with a
    user namespace needs its network namespace owned by it (sysfs is mounted only by a
    root that owns the network namespace), which a helper process made. Idempotent: a
    retried sandbox create keeps its namespace."""
    netns_path(name)  # a bad name fails here, before a thread is made
    return await asyncio.to_thread(_create, name, owner_pid)


def _delete(path: str) -> None:
    try:
        while mounts.is_mountpoint(path):  # as `ip netns delete`: detach, then unlink
            check(_libc.umount2(os.fsencode(path), mounts.MNT_DETACH), f"unmounting {path}")
        os.unlink(path)
    except FileNotFoundError:
        pass


async def delete(name: str) -> None:
    path = netns_path(name)
    try:
        await asyncio.to_thread(_delete, path)
    except OSError as exc:
        raise Internal(f"deleting network namespace {name}: {exc.strerror or exc}") from None
