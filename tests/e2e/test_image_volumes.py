"""Image volumes (KEP-4639) through the real CRI socket: a container mounts a second image,
read-only, at /data (the whole image, or only a sub path of it); sub paths that would leave
the image and images nobody pulled are refused; the view snapshot behind a mount lives as
long as its container."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from support.images import LayerBuilder, build_image, push
from support.processes import ServiceSet
from support.registry import Registry
from support.shoal import Cri, RunningShoal, pod_config, shared_node, start_shoal

pytestmark = pytest.mark.e2e

running = shared_node("image-volumes")

HELLO = "hello from the volume\n"


@pytest.fixture(scope="module")
def volume_image(registry: Registry) -> str:
    """Two layers (so overlayfs views are real overlays): files at the root and in `sub/`,
    a file, and symlinks inside, climbing out and absolute."""
    first = (LayerBuilder().file("hello.txt", HELLO).dir("sub").file("sub/inner.txt", "in\n")
             .file("plain.txt", "plain\n").symlink("inlink", "sub")
             .symlink("up", "../../../..").symlink("abs", "/etc").build())
    second = LayerBuilder().file("sub/second.txt", "two\n").build()
    push(registry.url, "volumes/data", "1", build_image([first, second]))
    return f"{registry.host}/volumes/data:1"


async def _pull(api: Cri, *refs: str) -> list[str]:
    """The pulled images' ids (what kubelet names them by in its CRI requests)."""
    return [(await api.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=ref)))
             ).image_ref for ref in refs]


def _config(images: dict[str, str], volume: str, sub_path: str = "",
            name: str = "reader") -> cri.ContainerConfig:
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=images["busybox"]),
        command=["sleep", "3600"],
        mounts=[cri.Mount(container_path="/data", image=cri.ImageSpec(image=volume),
                          image_sub_path=sub_path, readonly=True)])


async def _pod(api: Cri, tmp: Path) -> tuple[str, cri.PodSandboxConfig]:
    config = pod_config(tmp, f"vol-{uuid.uuid4().hex[:8]}")
    reply = await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
    return reply.pod_sandbox_id, config


async def _run(api: Cri, pod: tuple[str, cri.PodSandboxConfig],
               config: cri.ContainerConfig) -> str:
    cid = (await api.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod[0], sandbox_config=pod[1], config=config))).container_id
    await api.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    return cid


async def _sh(api: Cri, cid: str, script: str) -> cri.ExecSyncResponse:
    return await api.runtime.ExecSync(cri.ExecSyncRequest(
        container_id=cid, cmd=["sh", "-c", script], timeout=10))


def _views(services: ServiceSet) -> list[str]:
    """The image volumes' view snapshots in the snapshotter's records."""
    with sqlite3.connect(services.node.state_root / "snapshotter" / "metadata.db") as conn:
        return [row[0] for row in conn.execute(
            "SELECT key FROM snapshots WHERE key LIKE 'image-volume-%' AND kind = 'view'")]


def _view_mounts(services: ServiceSet) -> list[str]:
    """Views the snapshotter mounted (multi-layer overlay views) that are still mounted."""
    snapshots = str(services.node.state_root / "snapshotter" / "snapshots")
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if p.startswith(snapshots + "/") and p.endswith("/mnt")]


async def _remove_pod(api: Cri, pod_id: str) -> None:
    await api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    await api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


async def test_image_volume_is_mounted_read_only(running: RunningShoal, images: dict[str, str],
                                                 volume_image: str, tmp_path: Path) -> None:
    api = running.api
    _, volume_id = await _pull(api, images["busybox"], volume_image)
    pod = await _pod(api, tmp_path)
    config = _config(images, volume_id)  # by id, as kubelet sends it
    cid = await _run(api, pod, config)
    # A retried create (kubelet's, after a lost reply) is the same container, same view.
    again = await api.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod[0], sandbox_config=pod[1], config=config))
    assert again.container_id == cid

    out = await _sh(api, cid, "cat /data/hello.txt /data/sub/second.txt")
    assert (out.exit_code, out.stdout) == (0, (HELLO + "two\n").encode())
    for script in ("echo x > /data/new", "echo x >> /data/hello.txt", "rm /data/plain.txt"):
        out = await _sh(api, cid, script)
        assert out.exit_code != 0 and b"Read-only file system" in out.stderr, (script, out)
    out = await _sh(api, cid, "grep ' /data ' /proc/self/mounts")
    assert out.exit_code == 0 and b" ro," in out.stdout, out

    assert _views(running.services) == [f"image-volume-{cid}-0"]
    assert len(_view_mounts(running.services)) == 1  # two layers: an overlay it mounted
    await api.runtime.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=0))
    await api.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=cid))
    assert _views(running.services) == []
    assert _view_mounts(running.services) == []
    await _remove_pod(api, pod[0])


@pytest.mark.parametrize("sub_path", ["sub", "sub/", "./inlink"])
async def test_sub_path_shows_only_that_directory(running: RunningShoal, images: dict[str, str],
                                                  volume_image: str, tmp_path: Path,
                                                  sub_path: str) -> None:
    api = running.api
    await _pull(api, images["busybox"], volume_image)
    pod = await _pod(api, tmp_path)
    cid = await _run(api, pod, _config(images, volume_image, sub_path))
    out = await _sh(api, cid, "ls /data")
    assert (out.exit_code, out.stdout.split()) == (0, [b"inner.txt", b"second.txt"])
    await _remove_pod(api, pod[0])  # removes the container, and its view with it
    assert _views(running.services) == []


@pytest.mark.parametrize(("sub_path", "why"), [
    ("../etc", "'..'"), ("/etc", "relative"), ("sub/../..", "'..'"),
    ("up", "leads out of the image"), ("up/etc", "leads out of the image"),
    ("abs", "leads out of the image"), ("plain.txt", "not a directory"),
    ("nothing", "does not exist")])
async def test_bad_sub_path_is_invalid(running: RunningShoal, images: dict[str, str],
                                       volume_image: str, tmp_path: Path, sub_path: str,
                                       why: str) -> None:
    api = running.api
    await _pull(api, images["busybox"], volume_image)
    pod = await _pod(api, tmp_path)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod[0], sandbox_config=pod[1],
            config=_config(images, volume_image, sub_path)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert why in (err.value.details() or ""), err.value.details()
    listed = await api.runtime.ListContainers(cri.ListContainersRequest(
        filter=cri.ContainerFilter(pod_sandbox_id=pod[0])))
    assert list(listed.containers) == []  # the failed create was undone, view included
    assert _views(running.services) == [] and _view_mounts(running.services) == []
    await _remove_pod(api, pod[0])


async def test_unpulled_image_is_not_found(running: RunningShoal, images: dict[str, str],
                                           registry: Registry, tmp_path: Path) -> None:
    api = running.api
    await _pull(api, images["busybox"])
    pod = await _pod(api, tmp_path)
    absent = f"{registry.host}/volumes/never-pulled:1"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod[0], sandbox_config=pod[1], config=_config(images, absent)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "never-pulled" in (err.value.details() or "")
    await _remove_pod(api, pod[0])


async def test_host_path_with_image_is_invalid(running: RunningShoal, images: dict[str, str],
                                               volume_image: str, tmp_path: Path) -> None:
    """An image mount names no host path (containerd's rule): the gateway fills it in."""
    api = running.api
    pod = await _pod(api, tmp_path)
    config = _config(images, volume_image)
    config.mounts[0].host_path = str(tmp_path)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod[0], sandbox_config=pod[1], config=config))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await _remove_pod(api, pod[0])


async def test_native_driver_view(services: ServiceSet, images: dict[str, str],
                                  volume_image: str, tmp_path: Path) -> None:
    """With the native driver a view is a copy, bound as it is (nothing mounted for it)."""
    await start_shoal(services, images,
                      env={"snapshotter": {"SHOAL_SERVICES__SNAPSHOTTER__DRIVER": "native"}})
    async with grpc.aio.insecure_channel(f"unix://{services.node.cri_socket}") as channel:
        api = Cri(channel)
        await _pull(api, images["busybox"], volume_image)
        pod = await _pod(api, tmp_path)
        cid = await _run(api, pod, _config(images, volume_image, "sub"))
        out = await _sh(api, cid, "cat /data/second.txt; touch /data/x")
        assert out.stdout == b"two\n" and b"Read-only file system" in out.stderr, out
        assert _views(services) == [f"image-volume-{cid}-0"] and _view_mounts(services) == []
        await _remove_pod(api, pod[0])
        assert _views(services) == []
