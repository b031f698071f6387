"""Pods without a pause process, as CRI-O's `drop_infra_ctr`: the pod's IPC and UTS
namespaces are made once and pinned by bind mounts (`<pod dir>/ns/ipc`, `/ns/uts`), which
its containers join by path, as they join its named network namespace. One conmon and one
`runc create` + `start` less per pod, and no process whose death would need noticing.

A short-lived thread of the executor makes and pins them, as domain/netns.py does the
network namespace: it unshare(2)s both (a namespace change is per thread, and the thread
ends with it), sets the pod's hostname in the new UTS namespace and bind-mounts
/proc/thread-self/ns/{ipc,uts}; the mounts keep the namespaces. (util-linux `unshare
--ipc=FILE --uts=FILE -- hostname NAME` did the same in two fork+execs, ~1.5 ms of the pod
start path.)

A pause process is still needed where the namespaces must be made by a process of the pod
(shoal_common.infra.needs_pause: a shared PID namespace, a user namespace, sysctls)."""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
from pathlib import Path

from cri_api.v1 import api_pb2 as cri
from shoal_common.errors import Internal

from shoal_executor.domain import mounts
from shoal_executor.domain.netns import check, in_own_thread

KINDS = ("ipc", "uts")
CLONE_NEWIPC = 0x08000000
CLONE_NEWUTS = 0x04000000
_FLAG = {"ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS}

_libc = ctypes.CDLL(None, use_errno=True)


def path(pod_dir: Path, kind: str) -> str:
    return str(pod_dir / "ns" / kind)


def _own(config: cri.PodSandboxConfig) -> list[str]:
    """The namespaces the pod has of its own (a host-network pod has the host's UTS)."""
    opts = config.linux.security_context.namespace_options
    return [kind for kind, host in (("ipc", opts.ipc == cri.NODE),
                                    ("uts", opts.network == cri.NODE)) if not host]


async def pin(pod_dir: Path, config: cri.PodSandboxConfig, hostname: str) -> None:
    """The pod's own IPC and UTS namespaces, made and pinned (a retry after a crash makes
    them anew: a file still mounted is unmounted first)."""
    kinds = _own(config)
    if not kinds:
        return
    (pod_dir / "ns").mkdir(mode=0o711, exist_ok=True)
    for kind in kinds:
        target = path(pod_dir, kind)
        await mounts.unmount(target)
        Path(target).touch(mode=0o444)
    try:
        await asyncio.to_thread(in_own_thread, lambda: _make(
            {kind: path(pod_dir, kind) for kind in kinds}, hostname))
    except OSError as exc:
        raise Internal(f"making the pod's namespaces failed: {exc.strerror or exc}") from None


def _make(targets: dict[str, str], hostname: str) -> None:
    """In a thread that ends after it: new namespaces of `targets`' kinds, the hostname
    set in the UTS one (checked, RFC 1123, with the pod's config), each bind-mounted on
    its file."""
    flags = 0
    for kind in targets:
        flags |= _FLAG[kind]
    check(_libc.unshare(flags), "unshare")
    if "uts" in targets and hostname:
        socket.sethostname(hostname)
    for kind, target in targets.items():
        check(_libc.mount(f"/proc/thread-self/ns/{kind}".encode(), os.fsencode(target),
                          b"none", ctypes.c_ulong(mounts.MS_BIND), None),
              f"bind-mounting the {kind} namespace on {target}")


async def unpin(pod_dir: Path) -> None:
    for kind in KINDS:
        await mounts.unmount(path(pod_dir, kind))
