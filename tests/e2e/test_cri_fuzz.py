"""A generated corpus of hostile runtime.v1 requests against a real node: valid requests
with one field at a time replaced by a hostile value (control characters, newlines,
traversals, huge strings and numbers, wrong enum values). Every answer is an OK or a
status kubelet can act on — never INTERNAL, UNKNOWN or a hang — no service restarts, and
nothing is left once the pods are removed."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from google.protobuf.message import Message
from support.shoal import RunningShoal, host_names, leftovers, pod_config, shared_node

pytestmark = pytest.mark.e2e

SEED = 20261202
running = shared_node("fuzz")

STRINGS = ["", "\n", "a\nb", "\x00", "\x1b[31m", "../../../../tmp/fuzz", "/", "/etc/passwd",
           " ", "x" * 70_000, "é" * 300, "-rf", "$(reboot)", "a b\tc", "..", "%00", "\u202e"]
INTS = [-1, 0, 1, 65535, 65536, 2**31, 2**63 - 1, -(2**63)]
# kubelet retries these, or reads them as an answer about its request.
ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNIMPLEMENTED}


def scalar_paths(message: Message, prefix: str = "") -> Iterator[tuple[str, Message, str]]:
    """(dotted path, owning message, field name) of every set scalar field, recursively."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.type == field.TYPE_MESSAGE:
            if field.is_repeated:
                if field.message_type.GetOptions().map_entry:
                    continue  # maps: mutated as a whole below
                for i, item in enumerate(value):
                    yield from scalar_paths(item, f"{path}[{i}].")
            else:
                yield from scalar_paths(value, f"{path}.")
        elif not field.is_repeated:
            yield path, message, field.name


def mutants(base: Message, rng: random.Random, count: int) -> Iterator[tuple[str, Message]]:
    """`count` copies of `base`, each with one scalar field set to a hostile value."""
    fields = list(scalar_paths(base))
    for _ in range(count):
        copy = type(base)()
        copy.CopyFrom(base)
        path, _, name = rng.choice(fields)
        owner = _follow(copy, path)
        descriptor = owner.DESCRIPTOR.fields_by_name[name]
        if descriptor.type == descriptor.TYPE_STRING:
            value: object = rng.choice(STRINGS)
        elif descriptor.type == descriptor.TYPE_BOOL:
            value = not getattr(owner, name)
        elif descriptor.type == descriptor.TYPE_BYTES:
            value = rng.choice(STRINGS).encode()
        else:
            value = rng.choice(INTS)
        try:
            setattr(owner, name, value)
        except (ValueError, TypeError):
            continue  # out of the field's own range: protobuf refuses it client-side
        yield f"{path}={value!r:.40}", copy


def _follow(message: Message, path: str) -> Message:
    owner = message
    for part in path.split(".")[:-1]:
        name, _, index = part.partition("[")
        owner = getattr(owner, name)
        if index:
            owner = owner[int(index.rstrip("]"))]
    return owner


def kubelet_like_pod(tmp: Path) -> cri.PodSandboxConfig:
    config = pod_config(tmp, "fuzz", labels={"app": "fuzz"}, annotations={"a": "b"},
                        dns_config=cri.DNSConfig(servers=["10.96.0.10"], searches=["svc"],
                                                 options=["ndots:5"]),
                        port_mappings=[cri.PortMapping(container_port=80, host_port=0)])
    config.linux.cgroup_parent = f"/kubepods/besteffort/pod{uuid.uuid4().hex}"
    config.linux.sysctls["net.ipv4.ip_unprivileged_port_start"] = "0"
    return config


def container(image: str) -> cri.ContainerConfig:
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="fuzz"), image=cri.ImageSpec(image=image),
        command=["sh", "-c", "exit 0"], args=["x"], working_dir="/",
        envs=[cri.KeyValue(key="A", value="b")], labels={"c": "d"}, log_path="fuzz.log",
        linux=cri.LinuxContainerConfig(resources=cri.LinuxContainerResources(
            cpu_shares=2, memory_limit_in_bytes=64 << 20, oom_score_adj=1000)))


async def answer(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        async with asyncio.timeout(60):
            await call()  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_hostile_requests_get_answers_kubelet_can_act_on(
        running: RunningShoal, images: dict[str, str], tmp_path: Path) -> None:
    api = running.api
    rng = random.Random(SEED)
    before = host_names()
    pids = {name: sp.proc.pid for name, sp in running.procs.items()}
    await api.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(
        image=images["busybox"])))
    bad: list[str] = []
    pod_base = kubelet_like_pod(tmp_path)
    for what, config in mutants(pod_base, rng, 60):
        if not what.startswith("metadata.uid="):
            config.metadata.uid = uuid.uuid4().hex  # each its own pod, not a retry
        code = await answer(lambda c=config: api.runtime.RunPodSandbox(  # type: ignore[misc]
            cri.RunPodSandboxRequest(config=c)))
        if code not in ACCEPTABLE:
            bad.append(f"RunPodSandbox {what}: {code.name}")
    pod_base.metadata.uid = uuid.uuid4().hex
    pod_id = (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_base))
              ).pod_sandbox_id
    for what, config in mutants(container(images["busybox"]), rng, 60):
        request = cri.CreateContainerRequest(pod_sandbox_id=pod_id, sandbox_config=pod_base,
                                             config=config)
        code = await answer(lambda r=request: api.runtime.CreateContainer(r))  # type: ignore[misc]
        if code not in ACCEPTABLE:
            bad.append(f"CreateContainer {what}: {code.name}")
    # A LIKE wildcard is no prefix: "%" must not name the one pod there is.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id="%"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for value in STRINGS:
        for call in (lambda v=value: api.images.ImageStatus(cri.ImageStatusRequest(
                        image=cri.ImageSpec(image=v))),
                     lambda v=value: api.runtime.ContainerStatus(cri.ContainerStatusRequest(
                         container_id=v)),
                     lambda v=value: api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(
                         pod_sandbox_id=v)),
                     lambda v=value: api.runtime.ExecSync(cri.ExecSyncRequest(
                         container_id=v, cmd=["true"], timeout=5))):
            code = await answer(call)  # type: ignore[arg-type]
            if code not in ACCEPTABLE:
                bad.append(f"by id {value!r:.20}: {code.name}")
    assert bad == [], bad
    assert {name: sp.proc.pid for name, sp in running.procs.items()} == pids
    assert all(sp.proc.poll() is None for sp in running.procs.values()), "a service exited"
    for pod in (await api.runtime.ListPodSandbox(cri.ListPodSandboxRequest())).items:
        await api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id))
        await api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
    assert leftovers(running.services, running.services.subnet_prefix, before) == []
