"""CRI features through the real socket: Status advertises them per runtime handler (the
default, "", first), recursive read-only mounts, SupplementalGroupsPolicy Merge and
Strict, and ContainerStatus.user reporting the ids the process really runs with."""

from __future__ import annotations

import asyncio
import ctypes
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from support.shoal import RunningShoal, pod_config, shared_node

pytestmark = pytest.mark.e2e

running = shared_node("cri-features")
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


async def _pod(node: RunningShoal, tmp: Path, name: str) -> tuple[str, cri.PodSandboxConfig]:
    config = pod_config(tmp, name)
    pod_id = (await node.api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
              ).pod_sandbox_id
    return pod_id, config


async def _create(node: RunningShoal, pod_id: str, config: cri.PodSandboxConfig,
                  image: str, *command: str, **kw: object) -> str:
    await node.api.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
    ctr = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"),
                              image=cri.ImageSpec(image=image), command=list(command),
                              log_path="c.log", **kw)
    return (await node.api.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=ctr, sandbox_config=config))).container_id


async def _start(node: RunningShoal, cid: str,
                 state: int = cri.CONTAINER_RUNNING) -> cri.ContainerStatus:
    """Start the container; its status once in `state` (or after 20 s)."""
    await node.api.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    end = time.monotonic() + 20
    while True:
        status = (await node.api.runtime.ContainerStatus(cri.ContainerStatusRequest(
            container_id=cid))).status
        if status.state == state or time.monotonic() > end:
            return status
        await asyncio.sleep(0.1)


async def _remove(node: RunningShoal, pod_id: str) -> None:
    await node.api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    await node.api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


async def test_status_lists_handlers_with_features(running: RunningShoal) -> None:
    status = await running.api.runtime.Status(cri.StatusRequest())
    handlers = {h.name: h.features for h in status.runtime_handlers}
    assert [h.name for h in status.runtime_handlers][:2] == ["", "runc"]
    # runc 1.1.5 lists `rro` in `runc features`; user namespaces: see test_userns.py.
    assert handlers[""].recursive_read_only_mounts and handlers["runc"].recursive_read_only_mounts
    assert handlers[""] == handlers["runc"]
    assert status.features.supplemental_groups_policy


@pytest.fixture
def rro_volume(tmp_path: Path) -> Iterator[Path]:
    """A host directory with a tmpfs mounted in it (what critest's RRO specs mount)."""
    volume = tmp_path / "volume"
    (volume / "tmpfs").mkdir(parents=True)
    assert _libc.mount(b"none", bytes(volume / "tmpfs"), b"tmpfs", 0, None) == 0
    yield volume
    _libc.umount2(bytes(volume / "tmpfs"), MNT_DETACH)


async def test_recursive_read_only_mount(running: RunningShoal, images: dict[str, str],
                                         tmp_path: Path, rro_volume: Path) -> None:
    pod_id, config = await _pod(running, tmp_path, "rro")
    try:
        touch = "touch /mnt/tmpfs/x 2>&1; echo rc=$?"
        for recursive, expected in ((False, b"rc=0"), (True, b"Read-only file system")):
            cid = await _create(running, pod_id, config, images["busybox"], "sleep", "3600",
                                mounts=[cri.Mount(container_path="/mnt", host_path=str(
                                    rro_volume), readonly=True,
                                    recursive_read_only=recursive)])
            assert (await _start(running, cid)).state == cri.CONTAINER_RUNNING
            out = await running.api.runtime.ExecSync(cri.ExecSyncRequest(
                container_id=cid, cmd=["sh", "-c", touch], timeout=10))
            assert expected in out.stdout, out.stdout
            await running.api.runtime.RemoveContainer(cri.RemoveContainerRequest(
                container_id=cid))
    finally:
        await _remove(running, pod_id)


@pytest.mark.parametrize(("readonly", "propagation"), [
    (False, cri.PROPAGATION_PRIVATE),
    (True, cri.PROPAGATION_HOST_TO_CONTAINER),
    (True, cri.PROPAGATION_BIDIRECTIONAL)])
async def test_recursive_read_only_refusals(running: RunningShoal, images: dict[str, str],
                                            tmp_path: Path, readonly: bool,
                                            propagation: int) -> None:
    pod_id, config = await _pod(running, tmp_path, "rro-bad")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _create(running, pod_id, config, images["busybox"], "true", mounts=[
                cri.Mount(container_path="/mnt", host_path=str(tmp_path), readonly=readonly,
                          recursive_read_only=True, propagation=propagation)])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "recursive_read_only" in (err.value.details() or "")
    finally:
        await _remove(running, pod_id)


@pytest.mark.parametrize(("policy", "groups"), [
    (cri.Merge, [100, 1000, 1234]),  # `users` (100) lists `app` in the image's /etc/group
    (cri.Strict, [1000, 1234])])
async def test_supplemental_groups_policy(running: RunningShoal, images: dict[str, str],
                                          tmp_path: Path, policy: int,
                                          groups: list[int]) -> None:
    pod_id, config = await _pod(running, tmp_path, "groups")
    try:
        sec = cri.LinuxContainerSecurityContext(
            run_as_user=cri.Int64Value(value=1000), supplemental_groups=[1234],
            supplemental_groups_policy=policy)
        cid = await _create(running, pod_id, config, images["busybox"], "sh", "-c",
                            "id -G; sleep 3600",
                            linux=cri.LinuxContainerConfig(security_context=sec))
        created = (await running.api.runtime.ContainerStatus(cri.ContainerStatusRequest(
            container_id=cid))).status
        # Before it runs, from the OCI spec; then from the process itself.
        assert created.user.linux.uid == 1000
        assert sorted(created.user.linux.supplemental_groups) == groups
        status = await _start(running, cid)
        user = status.user.linux
        assert (user.uid, user.gid, sorted(user.supplemental_groups)) == (1000, 1000, groups)
        out = await running.api.runtime.ExecSync(cri.ExecSyncRequest(
            container_id=cid, cmd=["id", "-G"], timeout=10))
        assert sorted(int(g) for g in out.stdout.split()) == groups
        log = Path(config.log_directory) / "c.log"
        for _ in range(50):
            if log.exists() and log.read_text().strip():
                break
            await asyncio.sleep(0.1)
        assert sorted(int(g) for g in log.read_text().split(" ", 3)[3].split()) == groups
    finally:
        await _remove(running, pod_id)


async def test_container_user_of_an_exited_container(running: RunningShoal,
                                                     images: dict[str, str],
                                                     tmp_path: Path) -> None:
    """Once the process is gone, the ids are the OCI spec's (what it ran with)."""
    pod_id, config = await _pod(running, tmp_path, "user")
    try:
        cid = await _create(running, pod_id, config, images["busybox"], "true")
        status = await _start(running, cid, cri.CONTAINER_EXITED)
        assert status.state == cri.CONTAINER_EXITED
        user = status.user.linux
        assert (user.uid, user.gid, list(user.supplemental_groups)) == (0, 0, [0])
    finally:
        await _remove(running, pod_id)
