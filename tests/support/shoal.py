"""A whole Shoal node for end-to-end tests: test images in the registry, the five services
started with their own pod subnet and bridge, and a CRI client of the node's socket."""

from __future__ import annotations

import asyncio
import itertools

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc

from support.images import busybox_image, pause_image, push
from support.processes import ServiceProcess, ServiceSet
from support.registry import Registry

# Each start gets 10.<n>.0.0/24 on bridge shoalt<n>, so nodes never share a network.
_subnets = itertools.count(40)


class Cri:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.runtime = cri_grpc.RuntimeServiceStub(channel)
        self.images = cri_grpc.ImageServiceStub(channel)


@pytest.fixture(scope="module", name="images")
def images_fixture(registry: Registry) -> dict[str, str]:
    """The `images` fixture (import it into a test module): pause and busybox, pushed."""
    push(registry.url, "pods/pause", "1", pause_image())
    push(registry.url, "pods/busybox", "1", busybox_image())
    return {"pause": f"{registry.host}/pods/pause:1", "busybox": f"{registry.host}/pods/busybox:1"}


async def start_shoal(services: ServiceSet, images: dict[str, str]) -> dict[str, ServiceProcess]:
    n = next(_subnets)
    common = ["--set", f'cri.sandbox_image="{images["pause"]}"',
              "--set", f'services.executor.pod_subnet="10.{n}.0.0/24"',
              "--set", f'services.executor.cni_bridge="shoalt{n}"']
    procs = {name: services.start(name, extra=common) for name in (
        "puller", "snapshotter", "executor", "supervisor", "cri-gateway")}
    for sp in procs.values():
        await asyncio.to_thread(services.wait_serving, sp)
    return procs


async def remove_all_pods(api: Cri) -> None:
    """Leave nothing behind: pods (and their containers), netns, mounts."""
    pods = await api.runtime.ListPodSandbox(cri.ListPodSandboxRequest())
    for pod in pods.items:
        await api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id))
        await api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
