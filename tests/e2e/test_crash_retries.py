"""kubelet's retries across slow steps and crashes: a RunPodSandbox or CreateContainer
repeated after a deadline or a killed gateway returns the object the first attempt made
(or finishes it), never ALREADY_EXISTS for its own ghost, and nothing is left over."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from support.processes import ServiceSet
from support.shoal import cri_client, host_names, leftovers, remove_all_pods, start_shoal

pytestmark = pytest.mark.e2e
T = TypeVar("T")


def pod_config(tmp: Path, name: str) -> cri.PodSandboxConfig:
    logs = tmp / f"logs-{name}"
    logs.mkdir(exist_ok=True)
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex, namespace="default"),
        hostname=name, log_directory=str(logs), labels={"a": "1", "b": "2", "c": "3"})


def container(image: str) -> cri.ContainerConfig:
    return cri.ContainerConfig(metadata=cri.ContainerMetadata(name="main"),
                               image=cri.ImageSpec(image=image), command=["sleep", "600"],
                               labels={"x": "1", "y": "2"})


async def kubelet_retry(call: Callable[[], Awaitable[T]], budget: float = 60) -> T:
    """What kubelet does: UNAVAILABLE and DEADLINE_EXCEEDED are tried again."""
    end = time.monotonic() + budget
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.DEADLINE_EXCEEDED) or time.monotonic() > end:
                raise
        await asyncio.sleep(0.3)


async def test_a_create_past_the_clients_deadline_is_joined_by_the_retry(
        services: ServiceSet, images: dict[str, str], tmp_path: Path) -> None:
    before = host_names()
    await start_shoal(services, images, env={"executor": {
        "SHOAL_FAULTS": "executor.sandbox.started=delay:3,executor.container.created=delay:3"}})
    async with cri_client(services) as api:
        await api.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(
            image=images["busybox"])))
        config = pod_config(tmp_path, "slow")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=1)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # kubelet builds a new request: its maps may come in another order.
        retry = cri.PodSandboxConfig()
        retry.CopyFrom(config)
        retry.labels.clear()
        retry.labels.update({"c": "3", "b": "2", "a": "1"})
        pod_id = (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=retry))
                  ).pod_sandbox_id
        assert (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
                ).pod_sandbox_id == pod_id
        pods = (await api.runtime.ListPodSandbox(cri.ListPodSandboxRequest())).items
        assert [(p.id, p.state) for p in pods] == [(pod_id, cri.SANDBOX_READY)]

        request = cri.CreateContainerRequest(pod_sandbox_id=pod_id, sandbox_config=config,
                                             config=container(images["busybox"]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.runtime.CreateContainer(request, timeout=1)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        cid = (await api.runtime.CreateContainer(request)).container_id
        assert (await api.runtime.CreateContainer(request)).container_id == cid
        listed = (await api.runtime.ListContainers(cri.ListContainersRequest())).containers
        assert [c.id for c in listed] == [cid]
        await api.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
        await remove_all_pods(api)
    assert leftovers(services, services.subnet_prefix, before) == []


@pytest.mark.parametrize("step", ["cri.sandbox.created", "cri.container.created"])
async def test_a_gateway_killed_mid_create_loses_nothing(
        services: ServiceSet, images: dict[str, str], tmp_path: Path, step: str) -> None:
    """The gateway is SIGKILLed after the executor made the object, before its record says
    so; the restarted gateway undoes or finishes it, and kubelet's retry succeeds."""
    before = host_names()
    env = {"SHOAL_FAULTS": f"{step}=kill", "SHOAL_FAULTS_DIR": str(tmp_path)}
    procs = await start_shoal(services, images, env={"cri-gateway": env})
    config = pod_config(tmp_path, "crashy")
    async with cri_client(services) as api:
        await api.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(
            image=images["busybox"])))

        async def run_pod() -> str:
            return (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
                    ).pod_sandbox_id

        async def create() -> str:
            return (await api.runtime.CreateContainer(cri.CreateContainerRequest(
                pod_sandbox_id=pod_id, sandbox_config=config,
                config=container(images["busybox"])))).container_id

        restarted = asyncio.create_task(restart_when_dead(services, procs["cri-gateway"], env))
        pod_id = await kubelet_retry(run_pod)
        cid = await kubelet_retry(create)
        await restarted
        pods = (await api.runtime.ListPodSandbox(cri.ListPodSandboxRequest())).items
        assert [p.id for p in pods] == [pod_id]
        listed = (await api.runtime.ListContainers(cri.ListContainersRequest())).containers
        assert [c.id for c in listed] == [cid]
        await api.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
        status = (await api.runtime.ContainerStatus(cri.ContainerStatusRequest(
            container_id=cid))).status
        assert status.state == cri.CONTAINER_RUNNING
        await remove_all_pods(api)
    assert leftovers(services, services.subnet_prefix, before) == []


async def restart_when_dead(services: ServiceSet, gateway: object, env: dict[str, str]) -> None:
    await asyncio.to_thread(gateway.proc.wait)  # type: ignore[attr-defined]
    sp = services.start("cri-gateway", extra=services.extra, env=env)
    await asyncio.to_thread(services.wait_serving, sp)


async def test_create_container_retried_while_its_image_still_unpacks(
        services: ServiceSet, images: dict[str, str], tmp_path: Path) -> None:
    """kubelet gives CreateContainer 2 minutes; PullImage returns before the layers are
    unpacked. A create that times out while the unpack goes on leaves it running, and the
    retry joins it and succeeds (the unpack here is slowed by a fault point)."""
    await start_shoal(services, images, env={"snapshotter": {
        "SHOAL_FAULTS": "snapshotter.unpack.apply=delay:3"}})
    async with cri_client(services) as api:
        config = pod_config(tmp_path, "unpacking")
        pod_id = (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
                  ).pod_sandbox_id
        await api.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(
            image=images["busybox"])))
        request = cri.CreateContainerRequest(pod_sandbox_id=pod_id, sandbox_config=config,
                                             config=container(images["busybox"]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.runtime.CreateContainer(request, timeout=1)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        cid = await kubelet_retry(lambda: api.runtime.CreateContainer(request))
        listed = (await api.runtime.ListContainers(cri.ListContainersRequest())).containers
        assert [c.id for c in listed] == [cid.container_id]
        await api.runtime.StartContainer(cri.StartContainerRequest(
            container_id=cid.container_id))
        await remove_all_pods(api)
