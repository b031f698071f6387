"""Pods and containers as the CRI sees them: each RPC becomes commands to the puller,
snapshotter, executor and supervisor, and metadata the gateway keeps."""

from __future__ import annotations

import asyncio
import time
import uuid

import structlog
from cri_api.v1 import api_pb2 as cri
from shoal_common.bus import Bus
from shoal_common.errors import Invalid, NotFound, ShoalError
from shoal_common.messages import Empty
from shoal_common.messages.images import ImageGetRequest, ImageInfo, PullReply, PullRequest
from shoal_common.messages.monitor import (
    TaskIdRequest,
    TaskListReply,
    TaskListRequest,
    TaskState,
)
from shoal_common.messages.snapshots import (
    MountsReply,
    PrepareRequest,
    SnapshotKeyRequest,
    UnpackReply,
    UnpackRequest,
)
from shoal_common.messages.tasks import (
    ContainerCreateReply,
    ContainerCreateRequest,
    ContainerIdRequest,
    ContainerStopRequest,
    SandboxCreateRequest,
    SandboxIdRequest,
    SandboxInfo,
)

from shoal_cri_gateway.domain import metrics
from shoal_cri_gateway.store.metadata import ContainerRecord, Metadata, PodRecord

log = structlog.get_logger("shoal.cri")

NAMESPACE = "k8s.io"
SETUP_TIMEOUT = 300.0  # pulling the pause image and unpacking may take a while

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
    def __init__(self, bus: Bus, metadata: Metadata, sandbox_image: str) -> None:
        self.bus = bus
        self.meta = metadata
        self.sandbox_image = sandbox_image
        self._started_pods: set[str] = set()

    async def image(self, ref: str, pull: bool) -> ImageInfo:
        try:
            return await self.bus.request("images", "get", ImageGetRequest(
                ref=ref, with_config=True), ImageInfo, namespace=NAMESPACE)
        except NotFound:
            if not pull:
                raise NotFound(f"image {ref!r} not found: pull it first") from None
        await self.bus.request("images", "pull", PullRequest(ref=ref, pull_id=new_id()),
                               PullReply, namespace=NAMESPACE, timeout=SETUP_TIMEOUT,
                               attempt_timeout=SETUP_TIMEOUT, retries=0)
        return await self.bus.request("images", "get", ImageGetRequest(
            ref=ref, with_config=True), ImageInfo, namespace=NAMESPACE)

    async def rootfs(self, key: str, image: ImageInfo, name: str) -> MountsReply:
        """A writable snapshot on the image's layers (unpacked first if need be)."""
        unpacked = await self.bus.request(
            "snapshots", "unpack", UnpackRequest(image=name, layers=image.layers), UnpackReply,
            namespace=NAMESPACE, timeout=SETUP_TIMEOUT, attempt_timeout=SETUP_TIMEOUT,
            retries=0)
        return await self.bus.request("snapshots", "prepare", PrepareRequest(
            key=key, parent=unpacked.chain_id, labels={"shoal/owner": "cri"}), MountsReply,
            namespace=NAMESPACE)

    async def _remove_snapshot(self, key: str) -> None:
        try:
            await self.bus.request("snapshots", "remove", SnapshotKeyRequest(key=key), Empty,
                                   namespace=NAMESPACE)
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
            info = await self.bus.request("tasks", "sandbox.create", SandboxCreateRequest(
                id=record.id, config=record.config, pause_image_config=pause.config,
                rootfs=mounts.mounts, runtime_handler=handler), SandboxInfo,
                namespace=NAMESPACE, timeout=SETUP_TIMEOUT, attempt_timeout=SETUP_TIMEOUT,
                retries=0)
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
            await self.bus.request("tasks", "sandbox.remove", SandboxIdRequest(id=pod_id),
                                   Empty, namespace=NAMESPACE, attempt_timeout=60, retries=0)
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
            await self.bus.request("tasks", "sandbox.stop", SandboxIdRequest(id=pod.id),
                                   SandboxInfo, namespace=NAMESPACE, attempt_timeout=120,
                                   retries=0)
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
            task = await self.bus.request("monitor", "state", TaskIdRequest(id=pod.id), TaskState,
                                          namespace=NAMESPACE)
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
            await self.bus.request("tasks", "container.create", ContainerCreateRequest(
                id=record.id, sandbox_id=pod.id, config=config.SerializeToString(),
                sandbox_config=sandbox_config.SerializeToString() or pod.config,
                image_config=image.config, rootfs=mounts.mounts,
                runtime_handler=pod.runtime_handler), ContainerCreateReply,
                namespace=NAMESPACE, attempt_timeout=120, retries=0)
        except BaseException:
            await self._forget_container(record.id)
            raise
        return record

    async def start_container(self, container_id: str) -> None:
        ctr = await self.meta.container(container_id)
        await self.bus.request("tasks", "container.start", ContainerIdRequest(id=ctr.id),
                               TaskState, namespace=NAMESPACE, attempt_timeout=60, retries=0)
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
            await self.bus.request("tasks", "container.stop", ContainerStopRequest(
                id=ctr.id, timeout=float(max(timeout, 0))), TaskState, namespace=NAMESPACE,
                attempt_timeout=max(timeout, 0) + 60, retries=0)
        except NotFound:
            pass

    async def remove_container(self, container_id: str) -> None:
        try:
            ctr = await self.meta.container(container_id)
        except NotFound:
            return
        await self._forget_container(ctr.id)

    async def _forget_container(self, container_id: str) -> None:
        await self.bus.request("tasks", "container.remove", ContainerIdRequest(id=container_id),
                               Empty, namespace=NAMESPACE, attempt_timeout=60, retries=0)
        await self._remove_snapshot(container_id)
        await self.meta.delete_container(container_id)

    async def task_states(self) -> dict[str, TaskState]:
        reply = await self.bus.request("monitor", "list", TaskListRequest(), TaskListReply,
                                       namespace=NAMESPACE)
        return {t.id: t for t in reply.tasks}

    async def task_state(self, container_id: str) -> TaskState | None:
        try:
            return await self.bus.request("monitor", "state", TaskIdRequest(id=container_id),
                                          TaskState, namespace=NAMESPACE)
        except NotFound:
            return None


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
