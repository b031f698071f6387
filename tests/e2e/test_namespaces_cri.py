"""Namespaces through the CRI socket (real gateway, puller, snapshotter, executor, runc):
the `shoal-namespace` metadata scopes pods, containers and images; without it a caller is
in k8s.io, as kubelet and crictl are; images pulled in two namespaces share their blobs and
layers, and an rmi in one leaves the other's containers running."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from support.processes import ServiceSet
from support.shoal import Cri, pod_config

pytestmark = pytest.mark.e2e

Metadata = tuple[tuple[str, str], ...]


def ns(name: str) -> Metadata:
    return (("shoal-namespace", name),)


async def expect(code: grpc.StatusCode, call: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    assert err.value.code() == code, err.value.details()
    return str(err.value.details())


def container_config(image: str, *command: str, name: str = "main") -> cri.ContainerConfig:
    return cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name),
                               image=cri.ImageSpec(image=image), command=list(command))


async def wait_state(api: Cri, cid: str, state: int, md: Metadata,
                     timeout: float = 20) -> cri.ContainerStatus:
    end = time.monotonic() + timeout
    while True:
        status = (await api.runtime.ContainerStatus(cri.ContainerStatusRequest(
            container_id=cid), metadata=md)).status
        if status.state == state or time.monotonic() > end:
            return status
        await asyncio.sleep(0.1)


async def pull(api: Cri, image: str, md: Metadata) -> str:
    return (await api.images.PullImage(cri.PullImageRequest(
        image=cri.ImageSpec(image=image)), metadata=md)).image_ref


async def pod_ids(api: Cri, md: Metadata = ()) -> list[str]:
    return [p.id for p in (await api.runtime.ListPodSandbox(
        cri.ListPodSandboxRequest(), metadata=md)).items]


async def container_ids(api: Cri, md: Metadata = ()) -> list[str]:
    return [c.id for c in (await api.runtime.ListContainers(
        cri.ListContainersRequest(), metadata=md)).containers]


async def remove_pods(api: Cri, md: Metadata) -> None:
    for pod_id in await pod_ids(api, md):
        await api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                                         metadata=md)
        await api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                           metadata=md)


async def start(api: Cri, pod_id: str, config: cri.PodSandboxConfig,
                container: cri.ContainerConfig, md: Metadata) -> str:
    """A container made in the pod and started: its id."""
    cid = (await api.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod_id, sandbox_config=config, config=container), metadata=md)
    ).container_id
    await api.runtime.StartContainer(cri.StartContainerRequest(container_id=cid), metadata=md)
    return cid


async def run_sleeper(api: Cri, images: dict[str, str], config: cri.PodSandboxConfig,
                      md: Metadata) -> tuple[str, str]:
    """A pod of `config` in the namespace of `md` with a running busybox: (pod, container)."""
    pod_id = (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config),
                                              metadata=md)).pod_sandbox_id
    return pod_id, await start(api, pod_id, config,
                               container_config(images["busybox"], "sleep", "3600"), md)


async def test_a_pod_in_a_namespace_is_seen_only_there(
        shoal: Cri, images: dict[str, str], tmp_path: Path) -> None:
    api, a, b = shoal, ns("team-a"), ns("team-b")
    await pull(api, images["busybox"], a)
    config = pod_config(tmp_path, "scoped")
    try:
        pod_id, cid = await run_sleeper(api, images, config, a)
        assert await pod_ids(api, a) == [pod_id]
        assert await container_ids(api, a) == [cid]
        for other in ((), b, ns("k8s.io")):  # no metadata is k8s.io
            assert await pod_ids(api, other) == []
            assert await container_ids(api, other) == []
            for call in (
                    api.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(
                        pod_sandbox_id=pod_id), metadata=other),
                    api.runtime.ContainerStatus(cri.ContainerStatusRequest(
                        container_id=cid), metadata=other),
                    api.runtime.ContainerStatus(cri.ContainerStatusRequest(
                        container_id=cid[:12]), metadata=other),
                    api.runtime.ExecSync(cri.ExecSyncRequest(
                        container_id=cid, cmd=["true"], timeout=5), metadata=other),
                    api.runtime.Exec(cri.ExecRequest(
                        container_id=cid, cmd=["true"], stdout=True), metadata=other),
                    api.runtime.ContainerStats(cri.ContainerStatsRequest(
                        container_id=cid), metadata=other),
                    api.runtime.CreateContainer(cri.CreateContainerRequest(
                        pod_sandbox_id=pod_id, sandbox_config=config,
                        config=container_config(images["busybox"], "true", name="x")),
                        metadata=other)):
                assert "not found" in await expect(grpc.StatusCode.NOT_FOUND, call)
            # Stop and remove of what the caller cannot see are no-ops (the CRI's rule
            # for what is gone): nothing of namespace a is touched.
            await api.runtime.StopContainer(cri.StopContainerRequest(container_id=cid),
                                            metadata=other)
            await api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                                             metadata=other)
            await api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(
                pod_sandbox_id=pod_id), metadata=other)
            stats = await api.runtime.ListContainerStats(cri.ListContainerStatsRequest(),
                                                         metadata=other)
            assert list(stats.stats) == []
        status = (await api.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(
            pod_sandbox_id=pod_id), metadata=a)).status
        assert status.state == cri.SANDBOX_READY
        assert (await wait_state(api, cid, cri.CONTAINER_RUNNING, a)).state == \
            cri.CONTAINER_RUNNING
        out = await api.runtime.ExecSync(cri.ExecSyncRequest(
            container_id=cid, cmd=["echo", "in a"], timeout=10), metadata=a)
        assert out.stdout == b"in a\n"

        # Images too: busybox and the sandbox image were pulled into team-a only.
        listed = await api.images.ListImages(cri.ListImagesRequest(), metadata=a)
        assert {t for i in listed.images for t in i.repo_tags} >= {images["busybox"],
                                                                    images["pause"]}
        assert list((await api.images.ListImages(cri.ListImagesRequest())).images) == []
        assert not (await api.images.ImageStatus(cri.ImageStatusRequest(
            image=cri.ImageSpec(image=images["busybox"])))).HasField("image")

        # The same CRI identity in k8s.io is another pod: identities are per namespace.
        await pull(api, images["busybox"], ())
        twin = (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
                ).pod_sandbox_id
        assert twin != pod_id and await pod_ids(api) == [twin]
        assert await pod_ids(api, a) == [pod_id]
    finally:
        await remove_pods(api, a)
    assert await pod_ids(api, a) == []


@pytest.mark.parametrize("bad", ["", "a b", "-lead", "trail.", "x" * 77, "k8s/io"])
async def test_a_bad_namespace_is_invalid_argument(shoal: Cri, images: dict[str, str],
                                                   tmp_path: Path, bad: str) -> None:
    md = ns(bad)
    for call in (api_call for api_call in (
            shoal.runtime.ListPodSandbox(cri.ListPodSandboxRequest(), metadata=md),
            shoal.runtime.RunPodSandbox(cri.RunPodSandboxRequest(
                config=pod_config(tmp_path, "bad")), metadata=md),
            shoal.images.ListImages(cri.ListImagesRequest(), metadata=md))):
        details = await expect(grpc.StatusCode.INVALID_ARGUMENT, call)
        assert "shoal-namespace" in details
    assert await pod_ids(shoal) == []


def content_bytes(services: ServiceSet) -> int:
    root = services.node.state_root / "puller" / "content"
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


async def test_rmi_in_one_namespace_keeps_what_another_runs(
        shoal: Cri, services: ServiceSet, images: dict[str, str], tmp_path: Path) -> None:
    api, a, b = shoal, ns("gc-a"), ns("gc-b")
    before = content_bytes(services)
    image_id = await pull(api, images["busybox"], a)
    once = content_bytes(services) - before
    assert once > 100_000  # busybox-static's layer
    assert await pull(api, images["busybox"], b) == image_id
    assert content_bytes(services) - before == once, "pulled in two namespaces, stored twice"
    keeper = pod_config(tmp_path, "keeper")
    try:
        pod_b, cid = await run_sleeper(api, images, keeper, b)
        await api.images.RemoveImage(cri.RemoveImageRequest(
            image=cri.ImageSpec(image=images["busybox"])), metadata=a)
        assert list((await api.images.ListImages(cri.ListImagesRequest(),
                                                 metadata=a)).images) == []
        # b's container runs on, reading its image's files; its blobs are all still here,
        # and its layers too: a new container of the image starts from them.
        out = await api.runtime.ExecSync(cri.ExecSyncRequest(
            container_id=cid, cmd=["sh", "-c", "cat /bin/busybox >/dev/null && echo ok"],
            timeout=10), metadata=b)
        assert (out.exit_code, out.stdout) == (0, b"ok\n")
        assert content_bytes(services) - before >= once
        second = await start(api, pod_b, keeper, container_config(
            images["busybox"], "sh", "-c", "echo again", name="again"), b)
        done = await wait_state(api, second, cri.CONTAINER_EXITED, b)
        assert (done.state, done.exit_code) == (cri.CONTAINER_EXITED, 0)
    finally:
        await remove_pods(api, b)


async def test_container_events_follow_the_callers_namespace(
        shoal: Cri, images: dict[str, str], tmp_path: Path) -> None:
    api, a = shoal, ns("events-a")
    await pull(api, images["busybox"], a)
    streams = {"events-a": api.runtime.GetContainerEvents(cri.GetEventsRequest(), metadata=a),
               "k8s.io": api.runtime.GetContainerEvents(cri.GetEventsRequest())}
    received: dict[str, list[cri.ContainerEventResponse]] = {n: [] for n in streams}

    async def collect(name: str) -> None:
        async for event in streams[name]:
            received[name].append(event)

    collectors = [asyncio.create_task(collect(n)) for n in streams]
    try:
        await asyncio.sleep(0.5)  # the streams subscribe before anything happens
        config = pod_config(tmp_path, "evented")
        pod_id, cid = await run_sleeper(api, images, config, a)
        for _ in range(50):
            if {e.container_event_type for e in received["events-a"]
                    if e.container_id == cid} >= {cri.CONTAINER_STARTED_EVENT}:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # time for a leak into k8s.io to show
        mine = [e for e in received["events-a"] if e.container_id == cid]
        assert [e.container_event_type for e in mine] == [cri.CONTAINER_CREATED_EVENT,
                                                          cri.CONTAINER_STARTED_EVENT]
        assert mine[0].pod_sandbox_status.id == pod_id
        assert received["k8s.io"] == []
    finally:
        for stream in streams.values():
            stream.cancel()
        for task in collectors:
            task.cancel()
        await asyncio.gather(*collectors, return_exceptions=True)
        await remove_pods(api, a)

    details = await expect(grpc.StatusCode.INVALID_ARGUMENT, _first(
        api.runtime.GetContainerEvents(cri.GetEventsRequest(), metadata=ns("no good"))))
    assert "shoal-namespace" in details


async def _first(stream: object) -> object:
    async for event in stream:  # type: ignore[attr-defined]
        return event
    return None
