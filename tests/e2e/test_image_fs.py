"""ImageFsInfo through the real CRI socket: one image filesystem by default; with
`services.cri_gateway.container_fs_path` (KEP-4191, a split image filesystem) the writable
layers are reported apart, as container_filesystems."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from shoal_common.config import ConfigError, load_config
from support.processes import ServiceSet
from support.shoal import Cri, images_fixture, pod_config, start_shoal  # noqa: F401

pytestmark = pytest.mark.e2e

ENV = "SHOAL_SERVICES__CRI_GATEWAY__CONTAINER_FS_PATH"
WRITTEN = 16 << 20  # what the container writes into its writable layer


@contextlib.asynccontextmanager
async def _node(services: ServiceSet, images: dict[str, str],
                container_fs: str | None) -> AsyncIterator[Cri]:
    env = {"cri-gateway": {ENV: container_fs}} if container_fs is not None else None
    await start_shoal(services, images, env=env)
    async with grpc.aio.insecure_channel(f"unix://{services.node.cri_socket}") as channel:
        yield Cri(channel)


async def _writer(api: Cri, images: dict[str, str], tmp: Path) -> str:
    """A pod whose container wrote WRITTEN bytes into its writable layer."""
    await api.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=images["busybox"])))
    config = pod_config(tmp, f"fs-{uuid.uuid4().hex[:8]}")
    pod_id = (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
              ).pod_sandbox_id
    cid = (await api.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod_id, sandbox_config=config, config=cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="writer"),
            image=cri.ImageSpec(image=images["busybox"]), command=["sleep", "3600"]))
    )).container_id
    await api.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    out = await api.runtime.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=[
        "sh", "-c", f"head -c {WRITTEN} /dev/urandom > /blob && sync"], timeout=20))
    assert out.exit_code == 0, out
    return pod_id


async def _remove(api: Cri, pod_id: str) -> None:
    await api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    await api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


async def test_one_image_filesystem_by_default(services: ServiceSet, images: dict[str, str],
                                               tmp_path: Path) -> None:
    async with _node(services, images, None) as api:
        pod_id = await _writer(api, images, tmp_path)
        info = await api.images.ImageFsInfo(cri.ImageFsInfoRequest())
        assert list(info.container_filesystems) == []
        [fs] = info.image_filesystems
        assert fs.fs_id.mountpoint == str(services.node.state_root / "snapshotter")
        # The writable layers are counted with the images: they share the filesystem.
        assert fs.used_bytes.value >= WRITTEN and fs.inodes_used.value > 0
        assert fs.timestamp > 0
        await _remove(api, pod_id)


async def test_split_container_filesystem(services: ServiceSet, images: dict[str, str],
                                          tmp_path: Path) -> None:
    container_fs = tmp_path / "containerfs"
    container_fs.mkdir()
    async with _node(services, images, str(container_fs)) as api:
        empty = await api.images.ImageFsInfo(cri.ImageFsInfoRequest())
        [ctr_fs] = empty.container_filesystems
        assert (ctr_fs.fs_id.mountpoint, ctr_fs.used_bytes.value) == (str(container_fs), 0)

        pod_id = await _writer(api, images, tmp_path)
        info = await api.images.ImageFsInfo(cri.ImageFsInfoRequest())
        [image_fs] = info.image_filesystems
        [ctr_fs] = info.container_filesystems
        assert image_fs.fs_id.mountpoint == str(services.node.state_root / "snapshotter")
        assert ctr_fs.fs_id.mountpoint == str(container_fs)
        # The writable layers (the container's blob, the pause container's few files) are
        # the container filesystem's; the image filesystem keeps the read-only layers.
        assert WRITTEN <= ctr_fs.used_bytes.value < WRITTEN + (1 << 20)
        assert ctr_fs.inodes_used.value > 0
        assert 0 < image_fs.used_bytes.value < WRITTEN
        assert image_fs.timestamp > 0 and ctr_fs.timestamp > 0

        await _remove(api, pod_id)
        after = await api.images.ImageFsInfo(cri.ImageFsInfoRequest())
        assert after.container_filesystems[0].used_bytes.value == 0


async def test_missing_container_filesystem(services: ServiceSet, images: dict[str, str],
                                            tmp_path: Path) -> None:
    async with _node(services, images, str(tmp_path / "absent")) as api:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.images.ImageFsInfo(cri.ImageFsInfoRequest())
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "container_fs_path" in (err.value.details() or "")


def test_relative_container_fs_path_is_refused() -> None:
    key = "services.cri_gateway.container_fs_path"
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(env={"SHOAL_CONFIG": "/dev/null"}, flags={key: "var/lib"})
