"""Pods and containers as the CRI sees them: each RPC becomes commands to the puller,
snapshotter, executor and supervisor, and metadata the gateway keeps."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any, TypeVar

import structlog
from cri_api.v1 import api_pb2 as cri
from shoal_common import faults
from shoal_common.clients import Clients
from shoal_common.errors import AlreadyExists, FailedPrecondition, Invalid, NotFound, ShoalError
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
from shoal_common.tracing import deadline_var

from shoal_cri_gateway.domain import image_volumes, metrics, resources
from shoal_cri_gateway.store.metadata import ContainerRecord, Metadata, PodRecord

log = structlog.get_logger("shoal.cri")
T = TypeVar("T")
_PULL_KEY = os.urandom(32)

NAMESPACE = "k8s.io"

# The legacy `seccomp_profile_path` (superseded by the `seccomp` SecurityProfile): these
# names, or "localhost/<absolute path>". Anything else is refused, as containerd and CRI-O
# do, rather than read as "no profile" (which would run the container unconfined).
SECCOMP_PROFILE_NAMES = ("", "unconfined", "runtime/default", "docker/default")
SECCOMP_LOCALHOST_PREFIX = "localhost/"


def pull_id(ref: str, auth: bytes = b"") -> str:
    """Derived from what is pulled, so a repeated pull (a retry, or another pod wanting the
    same image) joins the one in flight instead of starting its own."""
    # Keyed by a secret of this process: pull ids travel in events, credentials must not.
    return "cri-" + hmac.new(_PULL_KEY, ref.encode() + b"\0" + auth, "sha256").hexdigest()[:40]


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
        self._inflight: dict[tuple[str, ...], asyncio.Task[Any]] = {}

    async def image(self, ref: str, pull: bool) -> ImageInfo:
        images = self.clients.images
        try:
            return await images.get(ImageGetRequest(ref=ref, with_config=True))
        except NotFound:
            if not pull:
                raise NotFound(f"image {ref!r} not found: pull it first") from None
        await images.pull(PullRequest(ref=ref, pull_id=pull_id(ref)))
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

    # -- one create per request, whatever the client does ------------------------------

    def _once(self, key: tuple[str, ...], make: Callable[[], Coroutine[Any, Any, T]]
              ) -> Awaitable[T]:
        """The one run of `make` for `key` (a create's CRI identity), shielded from the
        caller: a create whose client gave up (kubelet's deadline, a dropped connection)
        goes on to its end, and the client's retry joins it instead of making a ghost. Its
        bus calls have their own budgets, not the first caller's deadline."""
        task = self._inflight.get(key)
        if task is None:
            context = contextvars.copy_context()
            context.run(deadline_var.set, None)
            task = asyncio.create_task(make(), context=context)
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._finished(key, t))
        return asyncio.shield(task)

    def _finished(self, key: tuple[str, ...], task: asyncio.Task[Any]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            log.debug("create failed", key=key, error=str(task.exception()))

    async def _settled(self, key: tuple[str, ...]) -> None:
        """Wait out a create in flight for `key` (a stop or remove must not race it)."""
        task = self._inflight.get(key)
        if task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(task)

    # -- pods --------------------------------------------------------------------------

    async def run(self, config: cri.PodSandboxConfig, handler: str) -> PodRecord:
        """Idempotent by the pod's CRI identity (namespace, name, uid, attempt): a repeat
        returns what the first made, joins it in flight, or finishes it half made."""
        md = config.metadata
        if not md.name or not md.uid or not md.namespace:
            raise Invalid("RunPodSandbox: metadata name, uid and namespace are required")
        while True:  # None: it joined the undo of an abandoned create; now make it anew
            record = await self._once(_pod_key(md), lambda: self._run(config, handler))
            if record is not None:
                return record

    async def _run(self, config: cri.PodSandboxConfig, handler: str) -> PodRecord | None:
        md = config.metadata
        record = await self.meta.pod_named(md.namespace, md.name, md.uid, md.attempt)
        if record is not None:
            if (_parse(cri.PodSandboxConfig, record.config) != config
                    or record.runtime_handler != handler):
                raise AlreadyExists(f"pod sandbox {md.namespace}/{md.name} (uid {md.uid}, "
                                    f"attempt {md.attempt}) exists with another config: "
                                    f"{record.id}")
            if record.state != "creating":
                return record
            log.info("finishing a half-made pod sandbox", id=record.id)
        else:
            record = PodRecord(id=new_id(), name=md.name, uid=md.uid, namespace=md.namespace,
                               attempt=md.attempt, state="creating",
                               created_at_ns=time.time_ns(),
                               config=config.SerializeToString(deterministic=True),
                               labels=dict(config.labels),
                               annotations=dict(config.annotations), runtime_handler=handler)
            await self.meta.add_pod(record)  # the intent, before anything is made
            await faults.point("cri.sandbox.recorded")
        try:
            pause = await self.image(self.sandbox_image, pull=True)
            mounts = await self.rootfs(f"sandbox-{record.id}", pause, self.sandbox_image)
            info = await self.clients.tasks.sandbox_create(SandboxCreateRequest(
                id=record.id, config=record.config, pause_image_config=pause.config,
                rootfs=mounts.mounts, runtime_handler=handler))
            await faults.point("cri.sandbox.created")
        except BaseException:
            await asyncio.shield(self._undo_pod(record))
            raise
        record.state, record.ip = "ready", info.ip
        record.additional_ips, record.netns_path = info.additional_ips, info.netns_path
        await self.meta.update_pod(record)
        log.info("pod sandbox ready", pod=f"{md.namespace}/{md.name}", id=record.id,
                 ip=info.ip)
        return record

    async def _undo_pod(self, record: PodRecord) -> None:
        """Roll a failed create back completely; where a service cannot answer now, the
        record stays (listed NOTREADY) for kubelet's remove or the next reconcile."""
        try:
            await self._forget_pod(record.id)
        except ShoalError as exc:
            log.warning("could not undo a failed pod sandbox yet", id=record.id,
                        error=exc.message)

    async def _forget_pod(self, pod_id: str) -> None:
        """Everything of a pod, then its record: the record goes last, so a failure on the
        way leaves it listed for a retry instead of leaking what it names."""
        try:
            await self.clients.tasks.sandbox_remove(SandboxIdRequest(id=pod_id))
        except NotFound:
            pass
        await faults.point("cri.sandbox.removing")
        await self._remove_snapshot(f"sandbox-{pod_id}")
        await self.meta.delete_pod(pod_id)

    async def stop(self, pod_id: str) -> None:
        try:
            pod = await self.meta.pod(pod_id)
        except NotFound:
            return  # a stop of what is already gone is not an error (the CRI's rule)
        await self._settled(_pod_key(pod))
        try:
            await self.clients.tasks.sandbox_stop(SandboxIdRequest(id=pod.id))
        except NotFound:
            pass  # the executor has nothing of it (left) to stop
        await faults.point("cri.sandbox.stopping")
        pod.state = "notready"
        await self.meta.update_pod(pod)

    async def remove(self, pod_id: str) -> None:
        try:
            pod = await self.meta.pod(pod_id)
        except NotFound:
            return  # idempotent, as the CRI asks
        await self._settled(_pod_key(pod))
        for ctr in await self.meta.containers(pod.id):
            await self.remove_container(ctr.id)
        await self._forget_pod(pod.id)

    async def reconcile(self) -> None:
        """Undo the creates no one is finishing (a gateway killed mid-create), then tasks no
        record names: called when this replica takes the CRI socket, serving alone."""
        for pod in await self.meta.pods():
            for ctr in await self.meta.containers(pod.id):
                if ctr.state == "creating" and _ctr_key(ctr) not in self._inflight:
                    await self._once(_ctr_key(ctr), partial(self._undo_creating, ctr.id, True))
            if pod.state == "creating" and _pod_key(pod) not in self._inflight:
                await self._once(_pod_key(pod), partial(self._undo_creating, pod.id, False))
        await self._sweep_tasks()

    async def _undo_creating(self, object_id: str, container: bool) -> None:
        """Read again under the create's key: a retry may have finished it meanwhile."""
        with contextlib.suppress(NotFound):
            if container and (await self.meta.container(object_id)).state == "creating":
                log.info("undoing a half-made container", id=object_id)
                await self._undo_container(object_id)
            elif not container and (pod := await self.meta.pod(object_id)).state == "creating":
                log.info("undoing a half-made pod sandbox", id=object_id)
                await self._undo_pod(pod)

    async def _sweep_tasks(self) -> None:
        """Remove, through the executor, each sandbox or container with a task but no record
        here: records are written before anything is made and deleted after it is removed."""
        tasks = (await self.task_states()).values()  # listed before the records are read
        pods = {p.id for p in await self.meta.pods()}
        ctrs = {c.id for c in await self.meta.containers()}
        for task in tasks:
            pod_id = task.sandbox_id or task.id
            try:
                if pod_id not in pods:  # its containers go with it
                    pods.add(pod_id)
                    await self.clients.tasks.sandbox_remove(SandboxIdRequest(id=pod_id))
                elif task.id != pod_id and task.id not in ctrs:
                    await self.clients.tasks.container_remove(ContainerIdRequest(id=task.id))
            except ShoalError as exc:
                log.warning("could not remove an unrecorded task", id=task.id, error=exc.message)

    async def update_pod_resources(self, pod_id: str, request: cri.UpdatePodSandboxResourcesRequest
                                   ) -> None:
        """Kubelet has already resized the pod's cgroup (the CRI's contract: best effort,
        after the fact); the pod's recorded config follows, so status and a restarted
        gateway report the new pod-level resources."""
        pod = await self.meta.pod(pod_id)
        config = _parse(cri.PodSandboxConfig, pod.config)
        if request.HasField("overhead"):
            config.linux.overhead.CopyFrom(request.overhead)
        if request.HasField("resources"):
            config.linux.resources.CopyFrom(request.resources)
        await self.meta.set_pod_config(pod.id, config.SerializeToString(deterministic=True))

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
        """Idempotent by (pod, name, attempt), as RunPodSandbox is by its identity."""
        pod = await self.meta.pod(pod_id)
        if not config.metadata.name:
            raise Invalid("CreateContainer: metadata name is required")
        if not config.image.image:
            raise Invalid("CreateContainer: image is required")
        check_security_context(config)
        image_volumes.check(config)
        key = ("container", pod.id, config.metadata.name, str(config.metadata.attempt))
        while True:  # None: it joined the undo of an abandoned create; now make it anew
            record = await self._once(key, lambda: self._create_container(pod, config,
                                                                          sandbox_config))
            if record is not None:
                return record

    async def _create_container(self, pod: PodRecord, config: cri.ContainerConfig,
                                sandbox_config: cri.PodSandboxConfig
                                ) -> ContainerRecord | None:
        md = config.metadata
        record = await self.meta.container_named(pod.id, md.name, md.attempt)
        if record is not None:
            if _parse(cri.ContainerConfig, record.config) != config:
                raise AlreadyExists(f"container {md.name} (attempt {md.attempt}) exists in "
                                    f"pod {pod.id} with another config: {record.id}")
            if record.state != "creating":
                return record
            log.info("finishing a half-made container", id=record.id)
        image = await self.image(config.image.image, pull=False)
        volume_images = await image_volumes.find(partial(self.image, pull=False), config)
        if record is None:
            record = ContainerRecord(
                id=new_id(), pod_id=pod.id, name=md.name, attempt=md.attempt,
                created_at_ns=time.time_ns(), image=config.image.image,
                image_ref=image.repo_digests[0] if image.repo_digests else image.id,
                image_id=image.id, config=config.SerializeToString(deterministic=True),
                labels=dict(config.labels), annotations=dict(config.annotations),
                log_path=_log_path(sandbox_config, config), state="creating")
            await self.meta.add_container(record)  # the intent, before anything is made
            await faults.point("cri.container.recorded")
        try:
            mounts = await self.rootfs(record.id, image, config.image.image)
            made = cri.ContainerConfig()
            made.CopyFrom(config)
            if record.log_path:
                made.log_path = record.log_path
            await image_volumes.mount(self.clients, record.id, made, volume_images)
            await self.clients.tasks.container_create(ContainerCreateRequest(
                id=record.id, sandbox_id=pod.id, config=made.SerializeToString(),
                sandbox_config=sandbox_config.SerializeToString() or pod.config,
                image_config=image.config, rootfs=mounts.mounts,
                runtime_handler=pod.runtime_handler))
            await faults.point("cri.container.created")
        except BaseException:
            await asyncio.shield(self._undo_container(record.id))
            raise
        record.state = "created"
        await self.meta.set_container_state(record.id, "created")
        return record

    async def _undo_container(self, container_id: str) -> None:
        try:
            await self._forget_container(container_id)
        except ShoalError as exc:
            log.warning("could not undo a failed container yet", id=container_id,
                        error=exc.message)

    async def start_container(self, container_id: str) -> None:
        ctr = await self.meta.container(container_id)
        if ctr.state == "creating":
            raise FailedPrecondition(f"container {ctr.id} is still being created")
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
        await self._settled(_ctr_key(ctr))
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
        await self._settled(_ctr_key(ctr))
        await self._forget_container(ctr.id)

    async def _forget_container(self, container_id: str) -> None:
        try:
            await self.clients.tasks.container_remove(ContainerIdRequest(id=container_id))
        except NotFound:
            pass
        await self._remove_snapshot(container_id)
        with contextlib.suppress(NotFound):  # its image volumes' views, no longer bound
            ctr = await self.meta.container(container_id)
            await image_volumes.remove(self.clients, ctr.id, ctr.config)
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
        reply = await self.clients.monitor.exec_sync_within(ExecSyncRequest(
            id=ctr.id, cmd=cmd, timeout=float(timeout)))
        return fit_exec_output(reply, ctr.id)


# The CRI's ExecSyncResponse must fit one gRPC message (16 MiB here, as containerd):
# keep the head of each stream, as CRI-O does, rather than fail the call.
EXEC_SYNC_BUDGET = 16 * 1024 * 1024 - 64 * 1024


def fit_exec_output(reply: ExecSyncReply, container_id: str,
                    budget: int = EXEC_SYNC_BUDGET) -> ExecSyncReply:
    out, err = reply.stdout, reply.stderr
    if len(out) + len(err) <= budget:
        return reply
    # stderr is usually the short one: give it up to half, stdout the rest.
    err = err[:max(budget // 2, budget - len(out))]
    out = out[:budget - len(err)]
    log.warning("ExecSync output truncated to fit the CRI response", container=container_id,
                stdout=len(reply.stdout), stderr=len(reply.stderr), kept=len(out) + len(err))
    return ExecSyncReply(exit_code=reply.exit_code, stdout=out, stderr=err, truncated=True)


def _pod_key(md: cri.PodSandboxMetadata | PodRecord) -> tuple[str, ...]:
    return ("pod", md.namespace, md.name, md.uid, str(md.attempt))


def _ctr_key(ctr: ContainerRecord) -> tuple[str, ...]:
    return ("container", ctr.pod_id, ctr.name, str(ctr.attempt))


M = TypeVar("M", cri.PodSandboxConfig, cri.ContainerConfig)


def _parse(kind: type[M], data: bytes) -> M:
    """Compared as messages, not bytes: a retry's maps may serialize in another order."""
    message = kind()
    message.ParseFromString(data)
    return message


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
