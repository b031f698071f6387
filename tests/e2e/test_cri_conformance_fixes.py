"""What the conformance run against crictl and critest v1.26.1 found wrong in Shoal's CRI
gateway (docs/conformance.md), kept fixed: container security contexts the CRI does not
allow are refused by CreateContainer, before any work, as containerd refuses them (the
allowed neighbours still create); `crictl info` shows the NATS server's version as a
version."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from support.processes import ServiceSet
from support.shoal import Cri, images_fixture, remove_all_pods, start_shoal  # noqa: F401

pytestmark = pytest.mark.e2e


@pytest.fixture
async def pod(services: ServiceSet, images: dict[str, str],
              tmp_path: Path) -> AsyncIterator[tuple[Cri, str, cri.PodSandboxConfig]]:
    await start_shoal(services, images)
    async with grpc.aio.insecure_channel(f"unix://{services.node.cri_socket}") as channel:
        api = Cri(channel)
        await api.images.PullImage(cri.PullImageRequest(
            image=cri.ImageSpec(image=images["busybox"])))
        config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(
            name="conformance", uid=uuid.uuid4().hex, namespace="default"),
            log_directory=str(tmp_path))
        pod_id = (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
                  ).pod_sandbox_id
        yield api, pod_id, config
        await remove_all_pods(api)


async def create(pod: tuple[Cri, str, cri.PodSandboxConfig], image: str,
                 sc: cri.LinuxContainerSecurityContext) -> str:
    api, pod_id, config = pod
    container = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=f"c-{uuid.uuid4().hex[:8]}"),
        image=cri.ImageSpec(image=image), command=["sleep", "60"],
        linux=cri.LinuxContainerConfig(security_context=sc))
    return (await api.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=container, sandbox_config=config))).container_id


async def refused(pod: tuple[Cri, str, cri.PodSandboxConfig], image: str,
                  sc: cri.LinuxContainerSecurityContext) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(pod, image, sc)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    return err.value.details() or ""


async def containers(pod: tuple[Cri, str, cri.PodSandboxConfig]) -> int:
    return len((await pod[0].runtime.ListContainers(cri.ListContainersRequest())).containers)


async def test_run_as_group_needs_a_user(pod: tuple[Cri, str, cri.PodSandboxConfig],
                                         images: dict[str, str]) -> None:
    # critest: "runtime should return error if RunAsGroup is set without RunAsUser".
    details = await refused(pod, images["busybox"], cri.LinuxContainerSecurityContext(
        run_as_group=cri.Int64Value(value=1002)))
    assert "run_as_group" in details
    assert await containers(pod) == 0  # nothing was made
    await create(pod, images["busybox"], cri.LinuxContainerSecurityContext(
        run_as_user=cri.Int64Value(value=1001), run_as_group=cri.Int64Value(value=1002)))
    await create(pod, images["busybox"], cri.LinuxContainerSecurityContext(
        run_as_username="app", run_as_group=cri.Int64Value(value=1002)))
    assert await containers(pod) == 2


async def test_seccomp_profile_path_needs_a_known_name_or_localhost(
        pod: tuple[Cri, str, cri.PodSandboxConfig], images: dict[str, str],
        tmp_path: Path) -> None:
    # critest: "runtime should not support a custom seccomp profile without using
    # localhost/ as a prefix" (a bare path used to run the container unconfined).
    profile = tmp_path / "block-chmod.json"
    profile.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["chmod", "fchmodat"], "action": "SCMP_ACT_ERRNO"}]}))
    for bad in (str(profile), "block-chmod.json", "runtime/unknown"):
        details = await refused(pod, images["busybox"], cri.LinuxContainerSecurityContext(
            seccomp_profile_path=bad))
        assert "unsupported seccomp profile" in details and bad in details
    assert await containers(pod) == 0
    for good in ("", "unconfined", "runtime/default", "docker/default", f"localhost/{profile}"):
        await create(pod, images["busybox"], cri.LinuxContainerSecurityContext(
            seccomp_profile_path=good))
    # The SecurityProfile field supersedes the legacy path, which is then not looked at.
    await create(pod, images["busybox"], cri.LinuxContainerSecurityContext(
        seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfile.RuntimeDefault),
        seccomp_profile_path="ignored"))
    assert await containers(pod) == 6


async def test_status_reports_the_nats_server_version(
        pod: tuple[Cri, str, cri.PodSandboxConfig]) -> None:
    # `crictl info` showed "nats_server": "<nats server v2.15.1>" (the client's repr).
    reply = await pod[0].runtime.Status(cri.StatusRequest(verbose=True))
    version = json.loads(reply.info["version"])["nats_server"]
    assert re.fullmatch(r"\d+\.\d+\.\d+([-+][0-9A-Za-z.+-]+)?", version), version
