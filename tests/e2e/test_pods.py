"""Pods and containers end to end through the CRI socket: real gateway, executor,
supervisor (conmon + runc), snapshotter, puller, CNI plugins and registry."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from support.processes import ServiceSet
from support.shoal import Cri

pytestmark = pytest.mark.e2e


def pod_config(tmp: Path, name: str = "web") -> cri.PodSandboxConfig:
    logs = tmp / f"logs-{name}"
    logs.mkdir(exist_ok=True)
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex, namespace="default"),
        hostname=name, log_directory=str(logs),
        dns_config=cri.DNSConfig(servers=["10.96.0.10"], searches=["default.svc"]),
        labels={"app": name})


def container_config(image: str, *command: str, name: str = "main") -> cri.ContainerConfig:
    return cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name),
                               image=cri.ImageSpec(image=image), command=list(command),
                               log_path=f"{name}.log", labels={"c": name})


async def busybox_pod(api: Cri, images: dict[str, str], config: cri.PodSandboxConfig) -> str:
    """busybox pulled, then a pod of `config` run: its id."""
    await api.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=images["busybox"])))
    return (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
            ).pod_sandbox_id


async def create(api: Cri, pod_id: str, config: cri.PodSandboxConfig,
                 container: cri.ContainerConfig) -> str:
    """A container made in the pod: its id."""
    return (await api.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod_id, sandbox_config=config, config=container))).container_id


async def wait_state(api: Cri, cid: str, state: int, timeout: float = 20) -> cri.ContainerStatus:
    end = time.monotonic() + timeout
    while True:
        status = (await api.runtime.ContainerStatus(cri.ContainerStatusRequest(
            container_id=cid))).status
        if status.state == state or time.monotonic() > end:
            return status
        await asyncio.sleep(0.1)


async def test_pod_and_container_lifecycle(shoal: Cri, images: dict[str, str],
                                           tmp_path: Path) -> None:
    api = shoal
    config = pod_config(tmp_path)
    pod_id = await busybox_pod(api, images, config)
    status = (await api.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(
        pod_sandbox_id=pod_id))).status
    assert status.state == cri.SANDBOX_READY
    assert status.network.ip.startswith("10.")
    cid = await create(api, pod_id, config, container_config(
        images["busybox"], "sh", "-c",
        "echo hello; echo oops >&2; cat /etc/resolv.conf; hostname; sleep 3600"))
    created = await wait_state(api, cid, cri.CONTAINER_CREATED)
    assert created.state == cri.CONTAINER_CREATED
    await api.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    running = await wait_state(api, cid, cri.CONTAINER_RUNNING)
    assert running.state == cri.CONTAINER_RUNNING and running.started_at > 0
    log_file = Path(config.log_directory) / "main.log"
    for _ in range(50):
        if log_file.exists() and log_file.read_text().rstrip().endswith(" web"):
            break
        await asyncio.sleep(0.1)
    lines = log_file.read_text().splitlines()
    assert any(line.split(" ", 3)[1:] == ["stdout", "F", "hello"] for line in lines), lines
    assert any(line.split(" ", 3)[1:] == ["stderr", "F", "oops"] for line in lines), lines
    assert any(line.endswith("nameserver 10.96.0.10") for line in lines)
    assert any(line.endswith(" web") for line in lines)

    out = await api.runtime.ExecSync(cri.ExecSyncRequest(container_id=cid,
                                                         cmd=["sh", "-c", "echo hi; exit 7"],
                                                         timeout=10))
    assert out.stdout == b"hi\n" and out.exit_code == 7

    listed = await api.runtime.ListContainers(cri.ListContainersRequest(
        filter=cri.ContainerFilter(pod_sandbox_id=pod_id)))
    assert [c.id for c in listed.containers] == [cid]
    stats = await api.runtime.ContainerStats(cri.ContainerStatsRequest(container_id=cid))
    assert stats.stats.memory.working_set_bytes.value > 0

    await api.runtime.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=2))
    stopped = await wait_state(api, cid, cri.CONTAINER_EXITED)
    assert stopped.state == cri.CONTAINER_EXITED
    assert stopped.finished_at >= stopped.started_at
    await api.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=cid))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    await api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    status = (await api.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(
        pod_sandbox_id=pod_id))).status
    assert status.state == cri.SANDBOX_NOTREADY
    await api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert not any(name.startswith(f"shoal-{pod_id[:32]}")
                   for name in os.listdir("/var/run/netns"))
    pods = await api.runtime.ListPodSandbox(cri.ListPodSandboxRequest())
    assert pod_id not in [p.id for p in pods.items]


async def test_exit_codes_and_reasons(shoal: Cri, images: dict[str, str],
                                      tmp_path: Path) -> None:
    api = shoal
    config = pod_config(tmp_path, "jobs")
    pod_id = await busybox_pod(api, images, config)
    results = {}
    for name, script in (("ok", "exit 0"), ("bad", "exit 3")):
        cid = await create(api, pod_id, config,
                           container_config(images["busybox"], "sh", "-c", script, name=name))
        await api.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
        results[name] = await wait_state(api, cid, cri.CONTAINER_EXITED)
    assert (results["ok"].exit_code, results["ok"].reason) == (0, "Completed")
    assert (results["bad"].exit_code, results["bad"].reason) == (3, "Error")
    # RemoveContainer on a running container kills and removes it (CRI semantics).
    cid = await create(api, pod_id, config,
                       container_config(images["busybox"], "sleep", "3600", name="long"))
    await api.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    await api.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=cid))
    listed = await api.runtime.ListContainers(cri.ListContainersRequest())
    assert cid not in [c.id for c in listed.containers]


async def test_bad_requests_get_clear_errors(shoal: Cri, images: dict[str, str],
                                             tmp_path: Path) -> None:
    api = shoal
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(
            config=cri.PodSandboxConfig()))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.runtime.StartContainer(cri.StartContainerRequest(container_id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    config = pod_config(tmp_path, "errs")
    pod_id = (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
              ).pod_sandbox_id
    # A repeat (kubelet's retry) is the same pod; the same identity with another config
    # is refused.
    again = await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
    assert again.pod_sandbox_id == pod_id
    other = cri.PodSandboxConfig()
    other.CopyFrom(config)
    other.hostname = "another"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=other))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, sandbox_config=config,
            config=container_config(f"{images['busybox']}-never-pulled", "true")))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def kubelet_resources(**kw: int) -> cri.LinuxContainerResources:
    """Kubelet puts a hugepage limit (0) for every page size the kernel offers into every
    container, whether or not the host has a hugetlb cgroup (this one has none)."""
    sizes = [name.removeprefix("hugepages-") for name in os.listdir("/sys/kernel/mm/hugepages")]
    names = {"2048kB": "2MB", "1048576kB": "1GB", "64kB": "64KB", "32768kB": "32MB"}
    return cri.LinuxContainerResources(
        hugepage_limits=[cri.HugepageLimit(page_size=names[s], limit=0) for s in sizes], **kw)


async def test_containers_with_the_resources_kubelet_sends_run(
        shoal: Cri, images: dict[str, str], tmp_path: Path) -> None:
    api = shoal
    config = pod_config(tmp_path, "qos")
    config.linux.cgroup_parent = f"/kubepods/burstable/pod{config.metadata.uid}"
    pod_id = await busybox_pod(api, images, config)
    classes = {"besteffort": dict(cpu_shares=2, oom_score_adj=1000),
               "burstable": dict(cpu_shares=102, cpu_period=100000, cpu_quota=50000,
                                 memory_limit_in_bytes=64 << 20, oom_score_adj=968)}
    for name, res in classes.items():
        cfg = container_config(images["busybox"], "sh", "-c", "exit 4", name=name)
        cfg.linux.resources.CopyFrom(kubelet_resources(**res))
        cid = await create(api, pod_id, config, cfg)
        await api.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
        status = await wait_state(api, cid, cri.CONTAINER_EXITED)
        assert (status.state, status.exit_code) == (cri.CONTAINER_EXITED, 4), name


async def test_stop_of_what_is_gone_is_not_an_error(shoal: Cri, images: dict[str, str],
                                                    tmp_path: Path) -> None:
    """critest v1.36 "Idempotence": StopContainer / StopPodSandbox of something already
    removed (or never made: kubelet stops containers whose create failed) succeed."""
    api = shoal
    config = pod_config(tmp_path, "idem")
    pod_id = await busybox_pod(api, images, config)
    cid = await create(api, pod_id, config, container_config(images["busybox"], "sleep", "60"))
    await api.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=cid))
    await api.runtime.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=1))
    await api.runtime.StopContainer(cri.StopContainerRequest(container_id="0" * 64))
    await api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    await api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    await api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    with pytest.raises(grpc.aio.AioRpcError) as err:  # what never existed: NOT_FOUND
        await api.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_huge_reference_gets_a_bounded_error(shoal: Cri) -> None:
    """A 1 MB image reference is not echoed whole (it would overflow the client's metadata
    limit and the client would see a transport error instead of the answer)."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await shoal.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(
            image="x" * (1 << 20))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(err.value.details() or "") < 4096


async def test_exec_sync_output_larger_than_a_bus_message(shoal: Cri, images: dict[str, str],
                                                          services: ServiceSet,
                                                          tmp_path: Path) -> None:
    """ExecSync output well past NATS' 1 MiB payload reaches the CRI client byte for byte
    (the supervisor keeps it in files and the gateway's client reads it in chunks); as much
    as the gateway's 16 MiB gRPC message allows."""
    api = shoal
    config = pod_config(tmp_path, "big")
    pod_id = await busybox_pod(api, images, config)
    cid = await create(api, pod_id, config, container_config(images["busybox"], "sleep", "3600"))
    await api.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    assert (await wait_state(api, cid, cri.CONTAINER_RUNNING)).state == cri.CONTAINER_RUNNING
    # 2.1 million short lines: the CRI log conmon writes is split back exactly.
    out = "".join(f"{i}\n" for i in range(1, 1_800_001)).encode()
    err = "".join(f"{i}\n" for i in range(1, 300_001)).encode()
    limit = 16 << 20  # the gateway's (and kubelet's) gRPC message limit
    async with grpc.aio.insecure_channel(f"unix://{services.node.cri_socket}", options=[
            ("grpc.max_receive_message_length", limit)]) as channel:
        begin = time.monotonic()
        reply = await Cri(channel).runtime.ExecSync(cri.ExecSyncRequest(
            container_id=cid, cmd=["sh", "-c", "seq 1 1800000; seq 1 300000 >&2; exit 4"],
            timeout=60))
        print(f"CRI ExecSync of {len(out) + len(err)} bytes: {time.monotonic() - begin:.2f}s")
    assert reply.exit_code == 4
    assert reply.stdout == out and reply.stderr == err


async def test_update_pod_sandbox_resources_is_recorded(shoal: Cri, tmp_path: Path) -> None:
    """Kubelet resizes the pod's cgroup itself, then tells the runtime (best effort): the
    pod's config follows; an unknown pod is NOT_FOUND."""
    config = pod_config(tmp_path, "resized")
    pod_id = (await shoal.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
              ).pod_sandbox_id
    await shoal.runtime.UpdatePodSandboxResources(cri.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=pod_id[:12], resources=cri.LinuxContainerResources(
            cpu_shares=512, memory_limit_in_bytes=256 << 20)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await shoal.runtime.UpdatePodSandboxResources(cri.UpdatePodSandboxResourcesRequest(
            pod_sandbox_id="0" * 64))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await shoal.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
