"""Pods and containers as the CRI sees them: each RPC becomes commands to the puller,
snapshotter, executor and supervisor, and metadata the gateway keeps."""

from __future__ import annotations

import asyncio
import time
import uuid

import structlog
from cri_api.v1 import api_pb2 as cri
from shoal_common.clients import Clients
from shoal_common.errors import Invalid, NotFound, ShoalError
from shoal_common.messages.images import ImageGetRequest, ImageInfo, PullRequest
from shoal_common.messages.monitor import (
    ExecSyncReply,
    ExecSyncRequest,
    Resources,
    TaskIdRequest,
    TaskListRequest,
    TaskState,
    UpdateRequest,
)
from shoal_common.messages.snapshots import (
    MountsReply,
    PrepareRequest,
    SnapshotKeyRequest,
    UnpackRequest,
)
from shoal_common.messages.tasks import (
    ContainerCreateRequest,
    ContainerIdRequest,
    ContainerStopRequest,
    SandboxCreateRequest,
    SandboxIdRequest,
)

from shoal_cri_gateway.domain import metrics, resources
from shoal_cri_gateway.store.metadata import ContainerRecord, Metadata, PodRecord

log = structlog.get_logger("shoal.cri")

NAMESPACE = "k8s.io"

# The legacy `seccomp_profile_path` (superseded by the `seccomp` SecurityProfile): these
# names, or "localhost/<absolute path>". Anything else is refused, as containerd and CRI-O
# do, rather than read as "no profile" (which would run the container unconfined).
SECCOMP_PROFILE_NAMES = ("", "unconfined", "runtime/default", "docker/default")
SECCOMP_LOCALHOST_PREFIX = "localhost/"


def new_id() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex  # 64 hex characters, like containerd's ids


def check_security_context(config: cri.ContainerConfig) -> None:
    """Refuse, before any work, the security contexts the CRI does not allow (containerd's
    CRI plugin refuses the same): a group without a user to apply it to, and a legacy
    seccomp profile path that is neither a known name nor `localhost/<path>`."""
    if not config.HasField("linux") or not config.linux.HasField("security_context"):
        return
    sc = config.linux.security_context
    if (sc.HasField("run_as_group") and not sc.HasField("run_as_user")
            and not sc.run_as_username):
        raise Invalid("CreateContainer: run_as_group is set without run_as_user or "
                      "run_as_username")
    path = sc.seccomp_profile_path
    if (not sc.HasField("seccomp") and path not in SECCOMP_PROFILE_NAMES
            and not path.startswith(SECCOMP_LOCALHOST_PREFIX)):
        raise Invalid(f"CreateContainer: unsupported seccomp profile {path!r}: use "
                      f"{', '.join(repr(n) for n in SECCOMP_PROFILE_NAMES[1:])} or "
                      f"'{SECCOMP_LOCALHOST_PREFIX}<absolute path>'")


class Pods:
    def __init__(self, clients: Clients, metadata: Metadata, sandbox_image: str) -> None:
        self.clients = clients
        self.meta = metadata
        self.sandbox_image = sandbox_image
        self._started_pods: set[str] = set()

    async def image(self, ref: str, pull: bool) -> ImageInfo:
        images = self.clients.images
        try:
            return await images.get(ImageGetRequest(ref=ref, with_config=True))
        except NotFound:
            if not pull:
                raise NotFound(f"image {ref!r} not found: pull it first") from None
        await images.pull(PullRequest(ref=ref, pull_id=new_id()))
        return await images.get(ImageGetRequest(ref=ref, with_config=True))

    async def rootfs(self, key: str, image: ImageInfo, name: str) -> MountsReply:
        """A writable snapshot on the image's layers (unpacked first if need be)."""
        snapshots = self.clients.snapshots
        unpacked = await snapshots.unpack(UnpackRequest(image=name, layers=image.layers))
        return await snapshots.prepare(PrepareRequest(
            key=key, parent=unpacked.chain_id, labels={"shoal/owner": "cri"}))

    async def _remove_snapshot(self, key: str) -> None:
        try:
            await self.clients.snapshots.remove(SnapshotKeyRequest(key=key))
        except NotFound:
            pass

    # -- pods --------------------------------------------------------------------------

    async def run(self, config: cri.PodSandboxConfig, handler: str) -> PodRecord:
        md = config.metadata
        if not md.name or not md.uid or not md.namespace:
            raise Invalid("RunPodSandbox: metadata name, uid and namespace are required")
        record = PodRecord(id=new_id(), name=md.name, uid=md.uid, namespace=md.namespace,
                           attempt=md.attempt, state="notready",
                           created_at_ns=time.time_ns(), config=config.SerializeToString(),
                           labels=dict(config.labels), annotations=dict(config.annotations),
                           runtime_handler=handler)
        await self.meta.add_pod(record)  # reserves the name; a duplicate fails here
        try:
            pause = await self.image(self.sandbox_image, pull=True)
            mounts = await self.rootfs(f"sandbox-{record.id}", pause, self.sandbox_image)
            info = await self.clients.tasks.sandbox_create(SandboxCreateRequest(
                id=record.id, config=record.config, pause_image_config=pause.config,
                rootfs=mounts.mounts, runtime_handler=handler))
        except BaseException:
            await self._forget_pod(record.id)
            raise
        record.state, record.ip = "ready", info.ip
        record.additional_ips, record.netns_path = info.additional_ips, info.netns_path
        await self.meta.update_pod(record)
        log.info("pod sandbox ready", pod=f"{md.namespace}/{md.name}", id=record.id,
                 ip=info.ip)
        return record

    async def _forget_pod(self, pod_id: str) -> None:
        try:
            await self.clients.tasks.sandbox_remove(SandboxIdRequest(id=pod_id))
        except ShoalError as exc:
            log.warning("cleaning up a failed sandbox", id=pod_id, error=exc.message)
        await self._remove_snapshot(f"sandbox-{pod_id}")
        await self.meta.delete_pod(pod_id)

    async def stop(self, pod_id: str) -> None:
        try:
            pod = await self.meta.pod(pod_id)
        except NotFound:
            return  # a stop of what is already gone is not an error (the CRI's rule)
        try:
            await self.clients.tasks.sandbox_stop(SandboxIdRequest(id=pod.id))
        except NotFound:
            pass  # the executor has nothing of it left to stop
        pod.state = "notready"
        await self.meta.update_pod(pod)

    async def remove(self, pod_id: str) -> None:
        try:
            pod = await self.meta.pod(pod_id)
        except NotFound:
            return  # idempotent, as the CRI asks
        for ctr in await self.meta.containers(pod.id):
            await self.remove_container(ctr.id)
        await self._forget_pod(pod.id)

    async def sandbox_state(self, pod: PodRecord) -> str:
        """A pod whose pause process died is NOTREADY even if nobody stopped it."""
        if pod.state != "ready":
            return "notready"
        try:
            task = await self.clients.monitor.state(TaskIdRequest(id=pod.id))
        except NotFound:
            return "notready"
        return "ready" if task.state == "running" else "notready"

    # -- containers --------------------------------------------------------------------

    async def create_container(self, pod_id: str, config: cri.ContainerConfig,
                               sandbox_config: cri.PodSandboxConfig) -> ContainerRecord:
        pod = await self.meta.pod(pod_id)
        if not config.metadata.name:
            raise Invalid("CreateContainer: metadata name is required")
        if not config.image.image:
            raise Invalid("CreateContainer: image is required")
        check_security_context(config)
        image = await self.image(config.image.image, pull=False)
        record = ContainerRecord(
            id=new_id(), pod_id=pod.id, name=config.metadata.name,
            attempt=config.metadata.attempt, created_at_ns=time.time_ns(),
            image=config.image.image,
            image_ref=image.repo_digests[0] if image.repo_digests else image.id,
            image_id=image.id, config=config.SerializeToString(),
            labels=dict(config.labels), annotations=dict(config.annotations),
            log_path=_log_path(sandbox_config, config))
        await self.meta.add_container(record)
        try:
            mounts = await self.rootfs(record.id, image, config.image.image)
            if record.log_path:
                config.log_path = record.log_path
            await self.clients.tasks.container_create(ContainerCreateRequest(
                id=record.id, sandbox_id=pod.id, config=config.SerializeToString(),
                sandbox_config=sandbox_config.SerializeToString() or pod.config,
                image_config=image.config, rootfs=mounts.mounts,
                runtime_handler=pod.runtime_handler))
        except BaseException:
            await self._forget_container(record.id)
            raise
        return record

    async def start_container(self, container_id: str) -> None:
        ctr = await self.meta.container(container_id)
        await self.clients.tasks.container_start(ContainerIdRequest(id=ctr.id))
        if ctr.pod_id not in self._started_pods:
            # Pod start latency ends at the pod's first container start (this gateway's view:
            # a restarted gateway does not observe pods started before it).
            self._started_pods.add(ctr.pod_id)
            pod = await self.meta.pod(ctr.pod_id)
            metrics.POD_START_SECONDS.observe(max(0.0, (time.time_ns() - pod.created_at_ns)
                                                  / 1e9))

    async def stop_container(self, container_id: str, timeout: int) -> None:
        try:
            ctr = await self.meta.container(container_id)
        except NotFound:
            return  # kubelet stops containers whose create failed: not an error (CRI)
        try:
            await self.clients.tasks.stop_container(ContainerStopRequest(
                id=ctr.id, timeout=float(max(timeout, 0))))
        except NotFound:
            pass

    async def remove_container(self, container_id: str) -> None:
        try:
            ctr = await self.meta.container(container_id)
        except NotFound:
            return
        await self._forget_container(ctr.id)

    async def _forget_container(self, container_id: str) -> None:
        await self.clients.tasks.container_remove(ContainerIdRequest(id=container_id))
        await self._remove_snapshot(container_id)
        await self.meta.delete_container(container_id)

    async def task_states(self) -> dict[str, TaskState]:
        reply = await self.clients.monitor.list_tasks(TaskListRequest())
        return {t.id: t for t in reply.tasks}

    async def task_state(self, container_id: str) -> TaskState | None:
        try:
            return await self.clients.monitor.state(TaskIdRequest(id=container_id))
        except NotFound:
            return None

    async def update_resources(self, container_id: str,
                               r: cri.LinuxContainerResources) -> None:
        ctr = await self.meta.container(container_id)
        await self.clients.monitor.update(UpdateRequest(id=ctr.id, resources=Resources(
            cpu_shares=r.cpu_shares, cpu_quota=r.cpu_quota, cpu_period=r.cpu_period,
            cpuset_cpus=r.cpuset_cpus, cpuset_mems=r.cpuset_mems,
            memory_limit=r.memory_limit_in_bytes)))
        # Recorded only once applied, as containerd updates its status after the task.
        await self.meta.update_resources(ctr.id, lambda stored: resources.record_update(
            stored, r))

    async def reopen_log(self, container_id: str) -> None:
        ctr = await self.meta.container(container_id)
        await self.clients.monitor.reopen_log(TaskIdRequest(id=ctr.id))

    async def exec_sync(self, container_id: str, cmd: list[str], timeout: int
                        ) -> ExecSyncReply:
        ctr = await self.meta.container(container_id)
        if not cmd:
            raise Invalid("ExecSync: cmd is empty")
        return await self.clients.monitor.exec_sync_within(ExecSyncRequest(
            id=ctr.id, cmd=cmd, timeout=float(timeout)))


def _log_path(pod: cri.PodSandboxConfig, ctr: cri.ContainerConfig) -> str:
    """kubelet gives a directory per pod and a path per container, relative to it."""
    if not ctr.log_path:
        return ""
    if ctr.log_path.startswith("/"):
        return ctr.log_path
    if not pod.log_directory:
        return ""
    return f"{pod.log_directory.rstrip('/')}/{ctr.log_path}"


async def gather_states(pods: Pods, records: list[PodRecord]) -> dict[str, str]:
    states = await asyncio.gather(*(pods.sandbox_state(p) for p in records))
    return {p.id: s for p, s in zip(records, states, strict=True)}
