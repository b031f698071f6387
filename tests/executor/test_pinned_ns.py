"""A pod's IPC and UTS namespaces made and pinned in-process (unshare in a thread of its
own, the hostname set in the new UTS namespace, bind mounts on <pod dir>/ns/*), checked
from outside with util-linux nsenter, as runc joins them by path."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2 as cri
from shoal_executor.domain import mounts, pinned

pytestmark = pytest.mark.usefixtures("root")


@pytest.fixture
def pod_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    for kind in pinned.KINDS:
        target = pinned.path(tmp_path, kind)
        while os.path.exists(target) and mounts.is_mountpoint(target):
            subprocess.run(["umount", "-l", target], check=False)


def config(*, host_ipc: bool = False, host_network: bool = False) -> cri.PodSandboxConfig:
    c = cri.PodSandboxConfig()
    opts = c.linux.security_context.namespace_options
    opts.ipc = cri.NODE if host_ipc else cri.POD
    opts.network = cri.NODE if host_network else cri.POD
    return c


def nsenter(pod_dir: Path, *argv: str) -> str:
    return subprocess.run(["nsenter", f"--uts={pinned.path(pod_dir, 'uts')}",
                           f"--ipc={pinned.path(pod_dir, 'ipc')}", *argv],
                          capture_output=True, text=True, check=True).stdout.strip()


def own(kind: str) -> int:
    return os.stat(f"/proc/self/ns/{kind}").st_ino


async def test_pin_makes_both_namespaces_with_the_hostname(pod_dir: Path) -> None:
    host, before = socket.gethostname(), {k: own(k) for k in pinned.KINDS}
    await pinned.pin(pod_dir, config(), "pod-a")
    for kind in pinned.KINDS:
        target = pinned.path(pod_dir, kind)
        assert mounts.is_mountpoint(target)
        assert os.stat(target).st_ino not in (before[kind], 0)  # a namespace of its own
    assert nsenter(pod_dir, "hostname") == "pod-a"
    # The executor (every thread of it) stayed in the host's namespaces.
    assert socket.gethostname() == host
    assert {k: own(k) for k in pinned.KINDS} == before
    # An IPC object made in the pod's namespace is not the host's.
    key = nsenter(pod_dir, "ipcmk", "-Q").split()[-1]
    assert key in nsenter(pod_dir, "ipcs", "-q")
    assert key not in subprocess.run(["ipcs", "-q"], capture_output=True, text=True,
                                     check=True).stdout


async def test_a_retry_makes_them_anew(pod_dir: Path) -> None:
    await pinned.pin(pod_dir, config(), "pod-b")
    key = nsenter(pod_dir, "ipcmk", "-Q").split()[-1]
    await pinned.pin(pod_dir, config(), "pod-b")  # a create killed after the mounts
    # (Namespace inode numbers are reused: what the old one held tells them apart.)
    assert key not in nsenter(pod_dir, "ipcs", "-q")
    target = pinned.path(pod_dir, "uts")
    assert mounts.is_mountpoint(target) and nsenter(pod_dir, "hostname") == "pod-b"
    await pinned.unpin(pod_dir)
    assert not any(mounts.is_mountpoint(pinned.path(pod_dir, k)) for k in pinned.KINDS)


async def test_host_namespaces_are_not_pinned(pod_dir: Path) -> None:
    await pinned.pin(pod_dir, config(host_ipc=True), "pod-c")
    assert not os.path.exists(pinned.path(pod_dir, "ipc"))
    assert mounts.is_mountpoint(pinned.path(pod_dir, "uts"))
    await pinned.pin(pod_dir / "x", config(host_ipc=True, host_network=True), "")
    assert not (pod_dir / "x").exists()
