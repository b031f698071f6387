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
from shoal_common.errors import AlreadyExists, FailedPrecondition, Invalid, NotFound, ShoalError
from shoal_common.infra import needs_pause
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
from shoal_common.oci import chain_ids
from shoal_common.tracing import deadline_var

from shoal_cri_gateway.domain import image_volumes, metrics, resources
from shoal_cri_gateway.domain.container_config import (
    check_security_context,
    fit_exec_output,
    log_path,
)
from shoal_cri_gateway.domain.namespaces import NamespacedClients
from shoal_cri_gateway.store.metadata import ContainerRecord, Metadata, PodIdentity, PodRecord

log = structlog.get_logger("shoal.cri")
T = TypeVar("T")
_PULL_KEY = os.urandom(32)

__all__ = ["Pods", "fit_exec_output", "gather_states", "new_id", "pull_id"]


def pull_id(ref: str, auth: bytes = b"") -> str:
    """Derived from what is pulled, so a repeated pull (a retry, or another pod wanting the
    same image) joins the one in flight instead of starting its own."""
    # Keyed by a secret of this process: pull ids travel in events, credentials must not.
    return "cri-" + hmac.new(_PULL_KEY, ref.encode() + b"\0" + auth, "sha256").hexdigest()[:40]


def new_id() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex  # 64 hex characters, like containerd's ids


def _top_chain(image: ImageInfo) -> str:
    """The chain ID of the image's top layer as its diff IDs imply it ("" when the puller's
    layer list does not add up: the snapshotter's unpack then says why). Computed, not
    taken from the list: a snapshot key is shared by every image with those layers."""
    if not image.layers:
        return ""
    top = chain_ids([layer.diff_id for layer in image.layers])[-1]
    return top if top == image.layers[-1].chain_id else ""


class Pods:
    """Every operation takes the caller's Shoal namespace (`ns`) first: it finds records
    only there, resolves images there, and sends its commands with it."""

    def __init__(self, clients: NamespacedClients, metadata: Metadata,
                 sandbox_image: str, drop_infra: bool = True) -> None:
        self.clients = clients
        self.meta = metadata
        self.sandbox_image = sandbox_image
        self.drop_infra = drop_infra  # no pause rootfs for a pod the executor gives none
        self._started_pods: set[str] = set()
        self._inflight: dict[tuple[str, ...], asyncio.Task[Any]] = {}

    async def image(self, ns: str, ref: str, pull: bool) -> ImageInfo:
        images = self.clients(ns).images
        try:
            return await images.get(ImageGetRequest(ref=ref, with_config=True))
        except NotFound:
            if not pull:
                raise NotFound(f"image {ref!r} not found: pull it first") from None
        await images.pull(PullRequest(ref=ref, pull_id=pull_id(ref)))
        return await images.get(ImageGetRequest(ref=ref, with_config=True))

    async def rootfs(self, ns: str, key: str, image: ImageInfo, name: str) -> MountsReply:
        """A writable snapshot on the image's layers (unpacked first if need be; the
        snapshotter records that `name` in `ns` uses them)."""
        snapshots = self.clients(ns).snapshots
        labels = {"shoal/owner": "cri"}
        top = _top_chain(image)
        if top:
            # Mostly the image is unpacked already (its pull's event did it), so the snapshot
            # is asked for first: one bus hop instead of two. A parent not found (not
            # unpacked yet, or collected since) sends us through the unpack, which also waits
            # out an unpack in flight.
            try:
                return await snapshots.prepare(PrepareRequest(key=key, parent=top,
                                                              labels=labels))
            except NotFound:
                pass
        unpacked = await snapshots.unpack(UnpackRequest(image=name, layers=image.layers))
        return await snapshots.prepare(PrepareRequest(
            key=key, parent=unpacked.chain_id, labels=labels))

    async def _remove_snapshot(self, ns: str, key: str) -> None:
        try:
            await self.clients(ns).snapshots.remove(SnapshotKeyRequest(key=key))
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

    async def run(self, ns: str, config: cri.PodSandboxConfig, handler: str) -> PodRecord:
        """Idempotent by the pod's CRI identity (namespace, name, uid, attempt) in `ns`: a
        repeat returns what the first made, joins it in flight, or finishes it half made."""
        md = config.metadata
        if not md.name or not md.uid or not md.namespace:
            raise Invalid("RunPodSandbox: metadata name, uid and namespace are required")
        while True:  # None: it joined the undo of an abandoned create; now make it anew
            record = await self._once(_pod_key(ns, md),
                                      lambda: self._run(ns, config, handler))
            if record is not None:
                return record

    async def _run(self, ns: str, config: cri.PodSandboxConfig, handler: str
                   ) -> PodRecord | None:
        md = config.metadata
        record = await self.meta.pod_named(ns, md)
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
                               annotations=dict(config.annotations), runtime_handler=handler,
                               shoal_namespace=ns)
            await self.meta.add_pod(record)  # the intent, before anything is made
            await faults.point("cri.sandbox.recorded")
        try:
            pause_config, rootfs = b"{}", []
            if not self.drop_infra or needs_pause(config):
                pause = await self.image(ns, self.sandbox_image, pull=True)
                pause_config = pause.config
                rootfs = (await self.rootfs(ns, f"sandbox-{record.id}", pause,
                                            self.sandbox_image)).mounts
            info = await self.clients(ns).tasks.sandbox_create(SandboxCreateRequest(
                id=record.id, config=record.config, pause_image_config=pause_config,
                rootfs=rootfs, runtime_handler=handler))
            await faults.point("cri.sandbox.created")
        except BaseException:
            await asyncio.shield(self._undo_pod(record))
            raise
        record.state, record.ip = "ready", info.ip
        record.additional_ips, record.netns_path = info.additional_ips, info.netns_path
        record.pinned = info.pinned
        # A completion mark (the intent was durable): see Database.transaction.
        await self.meta.update_pod(record, durable=False)
        log.info("pod sandbox ready", pod=f"{md.namespace}/{md.name}", id=record.id,
                 ip=info.ip, shoal_namespace=ns)
        return record

    async def _undo_pod(self, record: PodRecord) -> None:
        """Roll a failed create back completely; where a service cannot answer now, the
        record stays (listed NOTREADY) for kubelet's remove or the next reconcile."""
        try:
            await self._forget_pod(record)
        except ShoalError as exc:
            log.warning("could not undo a failed pod sandbox yet", id=record.id,
                        error=exc.message)

    async def _forget_pod(self, pod: PodRecord) -> None:
        """Everything of a pod, then its record: the record goes last, so a failure on the
        way leaves it listed for a retry instead of leaking what it names."""
        ns = pod.shoal_namespace
        try:
            await self.clients(ns).tasks.sandbox_remove(SandboxIdRequest(id=pod.id))
        except NotFound:
            pass
        await faults.point("cri.sandbox.removing")
        if not pod.pinned:  # a pod without a pause process has no pause rootfs
            await self._remove_snapshot(ns, f"sandbox-{pod.id}")
        await self.meta.delete_pod(pod.id)

    async def stop(self, ns: str, pod_id: str) -> None:
        try:
            pod = await self.meta.pod(pod_id, ns)
        except NotFound:
            return  # a stop of what is already gone is not an error (the CRI's rule)
        await self._settled(_pod_key(ns, pod))
        try:
            await self.clients(ns).tasks.sandbox_stop(SandboxIdRequest(id=pod.id))
        except NotFound:
            pass  # the executor has nothing of it (left) to stop
        await faults.point("cri.sandbox.stopping")
        pod.state = "notready"
        await self.meta.update_pod(pod)

    async def remove(self, ns: str, pod_id: str) -> None:
        try:
            pod = await self.meta.pod(pod_id, ns)
        except NotFound:
            return  # idempotent, as the CRI asks
        await self._settled(_pod_key(ns, pod))
        for ctr in await self.meta.containers(ns, pod.id):
            await self.remove_container(ns, ctr.id)
        await self._forget_pod(pod)

    async def reconcile(self) -> None:
        """Undo the creates no one is finishing (a gateway killed mid-create), then tasks no
        record names: called when this replica takes the CRI socket, serving alone. Every
        namespace's."""
        for pod in await self.meta.pods(None):
            ns = pod.shoal_namespace
            for ctr in await self.meta.containers(ns, pod.id):
                if ctr.state == "creating" and _ctr_key(ctr) not in self._inflight:
                    await self._once(_ctr_key(ctr),
                                     partial(self._undo_creating, ns, ctr.id, True))
            if pod.state == "creating" and _pod_key(ns, pod) not in self._inflight:
                await self._once(_pod_key(ns, pod),
                                 partial(self._undo_creating, ns, pod.id, False))
        await self._sweep_tasks()

    async def _undo_creating(self, ns: str, object_id: str, container: bool) -> None:
        """Read again under the create's key: a retry may have finished it meanwhile."""
        with contextlib.suppress(NotFound):
            if container and (await self.meta.container(object_id, ns)).state == "creating":
                log.info("undoing a half-made container", id=object_id)
                await self._undo_container(ns, object_id)
            elif not container and (pod := await self.meta.pod(object_id, ns)).state == \
                    "creating":
                log.info("undoing a half-made pod sandbox", id=object_id)
                await self._undo_pod(pod)

    async def _sweep_tasks(self) -> None:
        """Remove, through the executor, each sandbox or container with a task but no record
        here (in any namespace): records are written before anything is made and deleted
        after it is removed."""
        tasks = (await self.task_states(None)).values()  # listed before the records are read
        pods = {p.id for p in await self.meta.pods(None)}
        ctrs = {c.id for c in await self.meta.containers(None)}
        executor = self.clients.cri.tasks  # no record is left to say whose it was
        for task in tasks:
            pod_id = task.sandbox_id or task.id
            try:
                if pod_id not in pods:  # its containers go with it
                    pods.add(pod_id)
                    await executor.sandbox_remove(SandboxIdRequest(id=pod_id))
                elif task.id != pod_id and task.id not in ctrs:
                    await executor.container_remove(ContainerIdRequest(id=task.id))
            except ShoalError as exc:
                log.warning("could not remove an unrecorded task", id=task.id, error=exc.message)

    async def update_pod_resources(self, ns: str, pod_id: str,
                                   request: cri.UpdatePodSandboxResourcesRequest) -> None:
        """Kubelet has already resized the pod's cgroup (the CRI's contract: best effort,
        after the fact); the pod's recorded config follows, so status and a restarted
        gateway report the new pod-level resources."""
        pod = await self.meta.pod(pod_id, ns)
        config = _parse(cri.PodSandboxConfig, pod.config)
        if request.HasField("overhead"):
            config.linux.overhead.CopyFrom(request.overhead)
        if request.HasField("resources"):
            config.linux.resources.CopyFrom(request.resources)
        await self.meta.set_pod_config(pod.id, config.SerializeToString(deterministic=True))

    async def sandbox_state(self, pod: PodRecord) -> str:
        """A pod whose pause process died is NOTREADY even if nobody stopped it (a pod with
        none is as its record says)."""
        if pod.state != "ready":
            return "notready"
        if pod.pinned:
            return "ready"
        try:
            task = await self.clients(pod.shoal_namespace).monitor.state(
                TaskIdRequest(id=pod.id))
        except NotFound:
            return "notready"
        return "ready" if task.state == "running" else "notready"

    # -- containers --------------------------------------------------------------------

    async def create_container(self, ns: str, pod_id: str, config: cri.ContainerConfig,
                               sandbox_config: cri.PodSandboxConfig) -> ContainerRecord:
        """Idempotent by (pod, name, attempt), as RunPodSandbox is by its identity."""
        pod = await self.meta.pod(pod_id, ns)
        if not config.metadata.name:
            raise Invalid("CreateContainer: metadata name is required")
        if not config.image.image:
            raise Invalid("CreateContainer: image is required")
        check_security_context(config)
        image_volumes.check(config)
        key = ("container", ns, pod.id, config.metadata.name, str(config.metadata.attempt))
        while True:  # None: it joined the undo of an abandoned create; now make it anew
            record = await self._once(key, lambda: self._create_container(pod, config,
                                                                          sandbox_config))
            if record is not None:
                return record

    async def _create_container(self, pod: PodRecord, config: cri.ContainerConfig,
                                sandbox_config: cri.PodSandboxConfig
                                ) -> ContainerRecord | None:
        md, ns = config.metadata, pod.shoal_namespace
        record = await self.meta.container_named(pod.id, md.name, md.attempt)
        if record is not None:
            if _parse(cri.ContainerConfig, record.config) != config:
                raise AlreadyExists(f"container {md.name} (attempt {md.attempt}) exists in "
                                    f"pod {pod.id} with another config: {record.id}")
            if record.state != "creating":
                return record
            log.info("finishing a half-made container", id=record.id)
        image = await self.image(ns, config.image.image, pull=False)
        volume_images = await image_volumes.find(partial(self.image, ns, pull=False), config)
        if record is None:
            record = ContainerRecord(
                id=new_id(), pod_id=pod.id, name=md.name, attempt=md.attempt,
                created_at_ns=time.time_ns(), image=config.image.image,
                image_ref=image.repo_digests[0] if image.repo_digests else image.id,
                image_id=image.id, config=config.SerializeToString(deterministic=True),
                labels=dict(config.labels), annotations=dict(config.annotations),
                log_path=log_path(sandbox_config, config), state="creating",
                shoal_namespace=ns)
            await self.meta.add_container(record)  # the intent, before anything is made
            await faults.point("cri.container.recorded")
        try:
            mounts = await self.rootfs(ns, record.id, image, config.image.image)
            made = cri.ContainerConfig()
            made.CopyFrom(config)
            if record.log_path:
                made.log_path = record.log_path
            await image_volumes.mount(self.clients(ns), record.id, made, volume_images)
            await self.clients(ns).tasks.container_create(ContainerCreateRequest(
                id=record.id, sandbox_id=pod.id, config=made.SerializeToString(),
                sandbox_config=sandbox_config.SerializeToString() or pod.config,
                image_config=image.config, rootfs=mounts.mounts,
                runtime_handler=pod.runtime_handler))
            await faults.point("cri.container.created")
        except BaseException:
            await asyncio.shield(self._undo_container(ns, record.id))
            raise
        record.state = "created"
        await self.meta.set_container_state(record.id, "created", durable=False)
        return record

    async def _undo_container(self, ns: str, container_id: str) -> None:
        try:
            await self._forget_container(ns, container_id)
        except ShoalError as exc:
            log.warning("could not undo a failed container yet", id=container_id,
                        error=exc.message)

    async def start_container(self, ns: str, container_id: str) -> None:
        ctr = await self.meta.container(container_id, ns)
        if ctr.state == "creating":
            raise FailedPrecondition(f"container {ctr.id} is still being created")
        await self._start_task(ns, ctr.id)
        if ctr.pod_id not in self._started_pods:
            # Pod start latency ends at the pod's first container start (this gateway's view:
            # a restarted gateway does not observe pods started before it).
            self._started_pods.add(ctr.pod_id)
            pod = await self.meta.pod(ctr.pod_id, ns)
            metrics.POD_START_SECONDS.observe(max(0.0, (time.time_ns() - pod.created_at_ns)
                                                  / 1e9))

    async def _start_task(self, ns: str, container_id: str) -> None:
        """Straight to the supervisor (the executor would only look up the record we have,
        a bus hop per start)."""
        monitor = self.clients(ns).monitor
        try:
            await monitor.start(TaskIdRequest(id=container_id))
        except FailedPrecondition:
            # A start repeated after its reply was lost finds a short-lived container
            # already exited: the first start did start it, so the repeat succeeds.
            state = await monitor.state(TaskIdRequest(id=container_id))
            if not (state.state == "stopped" and state.started_at > 0):
                raise

    async def stop_container(self, ns: str, container_id: str, timeout: int) -> None:
        try:
            ctr = await self.meta.container(container_id, ns)
        except NotFound:
            return  # kubelet stops containers whose create failed: not an error (CRI)
        await self._settled(_ctr_key(ctr))
        try:
            await self.clients(ns).tasks.stop_container(ContainerStopRequest(
                id=ctr.id, timeout=float(max(timeout, 0))))
        except NotFound:
            pass

    async def remove_container(self, ns: str, container_id: str) -> None:
        try:
            ctr = await self.meta.container(container_id, ns)
        except NotFound:
            return
        await self._settled(_ctr_key(ctr))
        await self._forget_container(ns, ctr.id)

    async def _forget_container(self, ns: str, container_id: str) -> None:
        clients = self.clients(ns)
        try:
            await clients.tasks.container_remove(ContainerIdRequest(id=container_id))
        except NotFound:
            pass
        await self._remove_snapshot(ns, container_id)
        with contextlib.suppress(NotFound):  # its image volumes' views, no longer bound
            ctr = await self.meta.container(container_id, ns)
            await image_volumes.remove(clients, ctr.id, ctr.config)
        await self.meta.delete_container(container_id)

    async def task_states(self, ns: str | None) -> dict[str, TaskState]:
        """Every task on the node (the supervisor's tasks are not per namespace: callers
        join them with their namespace's records); `ns` is the header sent."""
        monitor = (self.clients.cri if ns is None else self.clients(ns)).monitor
        reply = await monitor.list_tasks(TaskListRequest())
        return {t.id: t for t in reply.tasks}

    async def task_state(self, ns: str, container_id: str) -> TaskState | None:
        try:
            return await self.clients(ns).monitor.state(TaskIdRequest(id=container_id))
        except NotFound:
            return None

    async def update_resources(self, ns: str, container_id: str,
                               r: cri.LinuxContainerResources) -> None:
        ctr = await self.meta.container(container_id, ns)
        await self.clients(ns).monitor.update(UpdateRequest(id=ctr.id, resources=Resources(
            cpu_shares=r.cpu_shares, cpu_quota=r.cpu_quota, cpu_period=r.cpu_period,
            cpuset_cpus=r.cpuset_cpus, cpuset_mems=r.cpuset_mems,
            memory_limit=r.memory_limit_in_bytes)))
        # Recorded only once applied, as containerd updates its status after the task.
        await self.meta.update_resources(ctr.id, lambda stored: resources.record_update(
            stored, r))

    async def reopen_log(self, ns: str, container_id: str) -> None:
        ctr = await self.meta.container(container_id, ns)
        await self.clients(ns).monitor.reopen_log(TaskIdRequest(id=ctr.id))

    async def exec_sync(self, ns: str, container_id: str, cmd: list[str], timeout: int
                        ) -> ExecSyncReply:
        ctr = await self.meta.container(container_id, ns)
        if not cmd:
            raise Invalid("ExecSync: cmd is empty")
        reply = await self.clients(ns).monitor.exec_sync_within(ExecSyncRequest(
            id=ctr.id, cmd=cmd, timeout=float(timeout)))
        return fit_exec_output(reply, ctr.id)


def _pod_key(ns: str, md: PodIdentity) -> tuple[str, ...]:
    return ("pod", ns, md.namespace, md.name, md.uid, str(md.attempt))


def _ctr_key(ctr: ContainerRecord) -> tuple[str, ...]:
    return ("container", ctr.shoal_namespace, ctr.pod_id, ctr.name, str(ctr.attempt))


M = TypeVar("M", cri.PodSandboxConfig, cri.ContainerConfig)


def _parse(kind: type[M], data: bytes) -> M:
    """Compared as messages, not bytes: a retry's maps may serialize in another order."""
    message = kind()
    message.ParseFromString(data)
    return message


async def gather_states(pods: Pods, records: list[PodRecord]) -> dict[str, str]:
    states = await asyncio.gather(*(pods.sandbox_state(p) for p in records))
    return {p.id: s for p, s in zip(records, states, strict=True)}
