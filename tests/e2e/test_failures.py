"""A create that fails part-way undoes everything it made: a failure injected at each step
of RunPodSandbox and CreateContainer (shoal_common.faults) leaves no process, mount,
netns, cgroup, IP lease, bundle or record, and the next pod works."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from support.processes import ServiceSet
from support.shoal import Cri, cri_client, host_names, leftovers, remove_all_pods, start_shoal

pytestmark = pytest.mark.e2e

SANDBOX_STEPS = ["executor.sandbox.netns", "executor.sandbox.pinned", "executor.sandbox.rootfs",
                 "executor.sandbox.started", "executor.sandbox.network"]
# Steps of the pause process: their pod shares a PID namespace (the CRI's default, which
# these pods keep), so it has one; the others ask for kubelet's CONTAINER and have none.
PAUSE_STEPS = {"executor.sandbox.rootfs", "executor.sandbox.started"}
CONTAINER_STEPS = ["executor.container.rootfs", "executor.container.created"]


def pod_config(tmp: Path, name: str) -> cri.PodSandboxConfig:
    logs = tmp / f"logs-{name}"
    logs.mkdir(exist_ok=True)
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex, namespace="default"),
        hostname=name, log_directory=str(logs),
        port_mappings=[cri.PortMapping(container_port=80, host_port=18080 + len(name))])


@contextlib.asynccontextmanager
async def shoal_with(services: ServiceSet, images: dict[str, str], fault: str
                     ) -> AsyncIterator[Cri]:
    """A node whose executor fails at step `fault`, with busybox pulled."""
    await start_shoal(services, images, env={"executor": {"SHOAL_FAULTS": f"{fault}=fail"}})
    async with cri_client(services) as api:
        await api.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(
            image=images["busybox"])))
        yield api


@pytest.mark.parametrize("step", SANDBOX_STEPS)
async def test_a_sandbox_failing_at_each_step_leaves_nothing(
        services: ServiceSet, images: dict[str, str], tmp_path: Path, step: str) -> None:
    before = host_names()
    async with shoal_with(services, images, step) as api:
        config = pod_config(tmp_path, "doomed")
        if step not in PAUSE_STEPS:
            config.linux.security_context.namespace_options.pid = cri.CONTAINER
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
        assert f"fault injected at {step}" in (err.value.details() or "")
        assert (await api.runtime.ListPodSandbox(cri.ListPodSandboxRequest())).items == []
        assert leftovers(services, services.subnet_prefix, before) == []


@pytest.mark.parametrize("step", CONTAINER_STEPS)
async def test_a_container_failing_at_each_step_leaves_nothing(
        services: ServiceSet, images: dict[str, str], tmp_path: Path, step: str) -> None:
    before = host_names()
    async with shoal_with(services, images, step) as api:
        config = pod_config(tmp_path, "survivor")
        pod_id = (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
                  ).pod_sandbox_id
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.runtime.CreateContainer(cri.CreateContainerRequest(
                pod_sandbox_id=pod_id, sandbox_config=config, config=cri.ContainerConfig(
                    metadata=cri.ContainerMetadata(name="doomed"),
                    image=cri.ImageSpec(image=images["busybox"]), command=["true"])))
        assert f"fault injected at {step}" in (err.value.details() or "")
        listed = await api.runtime.ListContainers(cri.ListContainersRequest())
        assert listed.containers == []
        found = leftovers(services, services.subnet_prefix, before)
        # Only the pod itself is left (its pause process, netns, lease, mounts, records).
        assert not [f for f in found if "doomed" in f or "executor.db containers" in f]
        await remove_all_pods(api)
        assert leftovers(services, services.subnet_prefix, before) == []
