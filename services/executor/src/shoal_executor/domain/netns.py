"""Named network namespaces (/var/run/netns/<name>) through iproute2, and loopback up.

`ip netns add` bind-mounts a fresh namespace so it outlives any process in it; that is what
lets the executor restart without the pod losing its network."""

from __future__ import annotations

import asyncio
import os
import re

from shoal_common.errors import Internal, Invalid

NETNS_DIR = "/var/run/netns"
# The names Shoal gives (`shoal-<sandbox id prefix>`): one component under NETNS_DIR, so
# neither `ip netns add` nor `delete` can reach anything but a pod's own namespace.
_NAME = re.compile(r"\Ashoal-[A-Za-z0-9_+][A-Za-z0-9_.+-]{0,63}\Z")


def netns_path(name: str) -> str:
    if not _NAME.match(name):
        raise Invalid(f"{name[:80]!r} is not the name of a pod network namespace")
    return os.path.join(NETNS_DIR, name)


async def _ip(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "ip", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


async def create(name: str, owner_pid: int = 0) -> str:
    """A new named namespace, or (`owner_pid`) the one that process is in: a pod with a
    user namespace needs its network namespace owned by it (sysfs is mounted only by a
    root that owns the network namespace), which a helper process made."""
    path = netns_path(name)
    if os.path.exists(path):
        return path  # idempotent: a retried sandbox create keeps its namespace
    verb = ("attach", name, str(owner_pid)) if owner_pid else ("add", name)
    code, out = await _ip("netns", *verb)
    if code != 0:
        raise Internal(f"ip netns {verb[0]} {name}: {out}")
    code, out = await _ip("-n", name, "link", "set", "lo", "up")
    if code != 0:
        raise Internal(f"bringing lo up in {name}: {out}")
    return path


async def delete(name: str) -> None:
    if not os.path.exists(netns_path(name)):
        return
    code, out = await _ip("netns", "delete", name)
    if code != 0 and os.path.exists(netns_path(name)):
        raise Internal(f"ip netns delete {name}: {out}")
