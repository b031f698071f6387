"""A RUN step as a CRI pod + container in the build namespace.

The container runs the step's parent image (named in the build namespace, so the CRI
finds it and the snapshotter records the layers under that name), so the executor applies
the image's Env, User and WorkingDir; the build args in effect are added to its
environment. Its CRI log is followed and streamed while it runs. When it has exited, the
caller reads its writable snapshot (the snapshot key is the CRI container's id), then the
pod goes, with the snapshot and the log directory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cri_api.v1 import api_pb2 as cri
from shoal_cli.cri_client import Cri
from shoal_cli.run import NETWORK_ANNOTATION
from shoal_common.clients import SnapshotsClient
from shoal_common.messages.snapshots import Mount, SnapshotKeyRequest

from shoal_docker_gateway.domain.build.errors import BuildError
from shoal_docker_gateway.domain.logs import parse_line

BUILD_LABEL = "io.shoal.docker.build"
OWNER_LABEL = "io.shoal.docker.build-owner"  # the pid of the gateway running the build
LOG_FILE = "run.log"
POLL = 0.1
DRAIN_READS = 3
READ = 1 << 20

Say = Callable[[str], Awaitable[None]]


@dataclass
class RunSpec:
    argv: list[str]
    env: dict[str, str]  # the build args in effect
    network: str = ""  # "", default, bridge, host, none, or a Shoal network's name
    memory: int = 0
    cpu_shares: int = 0
    cpu_period: int = 0
    cpu_quota: int = 0
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    labels: dict[str, str] = field(default_factory=dict)


def _configs(spec: RunSpec, image: str, cid: str, namespace: str, logs: Path
             ) -> tuple[cri.PodSandboxConfig, cri.ContainerConfig]:
    pod = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=f"build-{cid[:12]}", uid=cid,
                                        namespace=namespace),
        hostname=cid[:12], log_directory=str(logs), labels=spec.labels)
    ctr = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="build"), image=cri.ImageSpec(image=image),
        command=spec.argv, envs=[cri.KeyValue(key=k, value=v) for k, v in spec.env.items()],
        log_path=LOG_FILE, labels=spec.labels)
    if spec.network == "host":
        pod.linux.security_context.namespace_options.network = cri.NODE
        ctr.linux.security_context.namespace_options.network = cri.NODE
    elif spec.network not in ("", "default", "bridge"):
        pod.annotations[NETWORK_ANNOTATION] = spec.network
    res = ctr.linux.resources
    res.memory_limit_in_bytes = spec.memory
    res.cpu_shares, res.cpu_period, res.cpu_quota = (spec.cpu_shares, spec.cpu_period,
                                                     spec.cpu_quota)
    res.cpuset_cpus, res.cpuset_mems = spec.cpuset_cpus, spec.cpuset_mems
    return pod, ctr


class _Log:
    """The CRI log of the step, read as it grows: whole lines, as the text they carry."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def _read(self) -> bytes:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read(READ)
        except FileNotFoundError:
            return b""
        end = data.rfind(b"\n")
        if end < 0:
            return b""
        self.offset += end + 1
        out = bytearray()
        for line in data[:end].split(b"\n"):
            entry = parse_line(line)
            if entry is not None:
                out += entry.text
        return bytes(out)

    async def read(self) -> str:
        return (await asyncio.to_thread(self._read)).decode(errors="replace")


async def _exit_code(api: Cri, ctr_id: str) -> int | None:
    st = (await api.runtime.ContainerStatus(cri.ContainerStatusRequest(
        container_id=ctr_id))).status
    return st.exit_code if st.state == cri.CONTAINER_EXITED else None


async def _follow(api: Cri, ctr_id: str, log: _Log, say: Say) -> int:
    while True:
        text = await log.read()
        if text:
            await say(text)
        code = await _exit_code(api, ctr_id)
        if code is not None:
            for _ in range(DRAIN_READS):  # conmon may still be writing its last words
                await asyncio.sleep(POLL)
                if text := await log.read():
                    await say(text)
            return code
        if not text:
            await asyncio.sleep(POLL)


async def _remove_pod(api: Cri, pod_id: str) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError):
        await api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    with contextlib.suppress(grpc.aio.AioRpcError):
        await api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


def describe(argv: list[str]) -> str:
    return " ".join(argv)


@contextlib.asynccontextmanager
async def run(api: Cri, snapshots: SnapshotsClient, namespace: str, log_root: Path,
              image: str, spec: RunSpec, say: Say) -> AsyncIterator[list[Mount]]:
    """Run the step; yields its writable snapshot's mounts once it exited 0 (a BuildError
    with its code otherwise). Leaving removes the pod."""
    cid = uuid.uuid4().hex + uuid.uuid4().hex
    logs = log_root / f"build-{cid}"
    await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True, mode=0o700)
    pod, ctr = _configs(spec, image, cid, namespace, logs)
    pod_id = ""
    try:
        await say(f" ---> Running in {cid[:12]}\n")
        pod_id = (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(
            config=pod))).pod_sandbox_id
        ctr_id = (await api.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=ctr, sandbox_config=pod))).container_id
        await api.runtime.StartContainer(cri.StartContainerRequest(container_id=ctr_id))
        code = await _follow(api, ctr_id, _Log(logs / LOG_FILE), say)
        if code != 0:
            raise BuildError(f"The command '{describe(spec.argv)}' returned a non-zero "
                             f"code: {code}", code)
        yield (await snapshots.mounts(SnapshotKeyRequest(key=ctr_id))).mounts
        await say(f"Removing intermediate container {cid[:12]}\n")
    finally:
        if pod_id:
            await asyncio.shield(_remove_pod(api, pod_id))
        await asyncio.to_thread(shutil.rmtree, logs, True)


def stale(owner: str, build_id: str, active: set[str]) -> bool:
    """Whether a build's leftover may go: ours and finished, or its gateway is dead (a
    gateway killed mid-build; another replica's running build is kept)."""
    if owner == str(os.getpid()):
        return build_id not in active
    if not owner.isdigit():
        return True
    try:
        os.kill(int(owner), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


async def sweep(api: Cri, active: set[str]) -> None:
    """Pods of builds no longer running (a gateway killed mid-build left them)."""
    pods = (await api.runtime.ListPodSandbox(cri.ListPodSandboxRequest())).items
    for pod in pods:
        build_id = pod.labels.get(BUILD_LABEL)
        if build_id is not None and stale(pod.labels.get(OWNER_LABEL, ""), build_id, active):
            await _remove_pod(api, pod.id)


def overlay_dirs(mount: Mount) -> tuple[Path, list[Path]] | None:
    """(upper dir, lower dirs top first) of an overlay mount; None for anything else."""
    if mount.type != "overlay":
        return None
    upper, lowers = "", []
    for option in mount.options:
        key, _, value = option.partition("=")
        if key == "upperdir":
            upper = value
        elif key == "lowerdir":
            lowers = [p for p in value.split(":") if p]
    if not upper:
        return None
    return Path(upper), [Path(p) for p in lowers]


def new_id() -> str:
    return uuid.uuid4().hex[:16]
