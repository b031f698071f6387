"""CRI RuntimeService. RPCs not written yet answer UNIMPLEMENTED (the generated base)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import TypeVar

import grpc
import msgspec
import nats.errors
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc
from nats.aio.client import ServerVersion
from nats.js.api import DeliverPolicy
from shoal_common import __version__, codec, subjects
from shoal_common.bus import Bus
from shoal_common.errors import Invalid, NotFound, ShoalError
from shoal_common.messages.monitor import (
    ExecSyncReply,
    ExecSyncRequest,
    Resources,
    StatsReply,
    StatsRequest,
    TaskCreated,
    TaskDeleted,
    TaskExited,
    TaskIdRequest,
    TaskStarted,
    TaskState,
    TaskStats,
    UpdateRequest,
)
from shoal_common.messages.snapshots import SnapshotKeyRequest, SnapshotUsage
from shoal_common.tracing import bind_trace, new_trace_id

from shoal_cri_gateway.domain import resources
from shoal_cri_gateway.domain.pods import NAMESPACE, Pods, gather_states
from shoal_cri_gateway.domain.status import runtime_conditions
from shoal_cri_gateway.grpc_api.rpc import CRI_REQUESTS, rpc
from shoal_cri_gateway.store.metadata import ContainerRecord, PodRecord
from shoal_cri_gateway.streaming.server import StreamServer

StreamRequest = TypeVar("StreamRequest", cri.ExecRequest, cri.AttachRequest,
                        cri.PortForwardRequest)

KUBE_API_VERSION = "0.1.0"  # what kubelet expects in VersionResponse.version
RUNTIME_NAME = "shoal"
RUNTIME_API_VERSION = "v1"

# Task event → CRI container event type (and the message type to decode it with).
TASK_EVENTS: dict[str, tuple[int, type[TaskCreated | TaskStarted | TaskExited | TaskDeleted]]] = {
    TaskCreated.TOPIC: (cri.CONTAINER_CREATED_EVENT, TaskCreated),
    TaskStarted.TOPIC: (cri.CONTAINER_STARTED_EVENT, TaskStarted),
    TaskExited.TOPIC: (cri.CONTAINER_STOPPED_EVENT, TaskExited),
    TaskDeleted.TOPIC: (cri.CONTAINER_DELETED_EVENT, TaskDeleted),
}


CONTAINER_STATES = {"created": cri.CONTAINER_CREATED, "running": cri.CONTAINER_RUNNING,
                    "stopped": cri.CONTAINER_EXITED}


def _with_id(request: StreamRequest, full_id: str) -> StreamRequest:
    """The request with the id it named (maybe a unique prefix, as crictl passes) resolved,
    so the streaming session acts on the same object the RPC checked."""
    copy = type(request)()
    copy.CopyFrom(request)
    if isinstance(copy, cri.PortForwardRequest):
        copy.pod_sandbox_id = full_id
    else:
        copy.container_id = full_id
    return copy


def _check_streams(rpc_name: str, request: cri.ExecRequest | cri.AttachRequest) -> None:
    """kubelet's rules for a remote command request."""
    if not request.container_id:
        raise Invalid(f"{rpc_name}: container_id is required")
    if request.tty and request.stderr:
        raise Invalid(f"{rpc_name}: tty and stderr cannot both be true")
    if not (request.stdin or request.stdout or request.stderr):
        raise Invalid(f"{rpc_name}: one of stdin, stdout, or stderr must be set")


def _selected(labels: dict[str, str], selector: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _pod_metadata(p: PodRecord) -> cri.PodSandboxMetadata:
    return cri.PodSandboxMetadata(name=p.name, uid=p.uid, namespace=p.namespace,
                                  attempt=p.attempt)


def _ctr_metadata(c: ContainerRecord) -> cri.ContainerMetadata:
    return cri.ContainerMetadata(name=c.name, attempt=c.attempt)


def _container_state(task: TaskState | None) -> int:
    return CONTAINER_STATES.get(task.state, cri.CONTAINER_UNKNOWN) if task else \
        cri.CONTAINER_UNKNOWN


def _pod_status(pod: PodRecord, state: str) -> cri.PodSandboxStatus:
    config = cri.PodSandboxConfig()
    config.ParseFromString(pod.config)
    return cri.PodSandboxStatus(
        id=pod.id, metadata=_pod_metadata(pod),
        state=cri.SANDBOX_READY if state == "ready" else cri.SANDBOX_NOTREADY,
        created_at=pod.created_at_ns,
        network=cri.PodSandboxNetworkStatus(ip=pod.ip, additional_ips=[
            cri.PodIP(ip=ip) for ip in pod.additional_ips]),
        linux=cri.LinuxPodSandboxStatus(namespaces=cri.Namespace(
            options=config.linux.security_context.namespace_options)),
        labels=pod.labels, annotations=pod.annotations,
        runtime_handler=pod.runtime_handler)


async def _container_status(ctr: ContainerRecord, task: TaskState | None
                            ) -> cri.ContainerStatus:
    config = cri.ContainerConfig()
    config.ParseFromString(ctr.config)
    created = await resources.base(ctr.config, task.bundle if task is not None else "")
    status = cri.ContainerStatus(
        id=ctr.id, metadata=_ctr_metadata(ctr), state=_container_state(task),
        created_at=ctr.created_at_ns, image=cri.ImageSpec(image=ctr.image),
        image_ref=ctr.image_ref, image_id=ctr.image_id, labels=ctr.labels,
        annotations=ctr.annotations, mounts=list(config.mounts), log_path=ctr.log_path,
        resources=resources.current(created, ctr.updated_resources))
    if task is not None:
        status.started_at = int(task.started_at * 1e9)
        status.finished_at = int(task.finished_at * 1e9)
        status.exit_code = task.exit_code
        status.reason = task.reason
        status.message = task.message
    return status


def _nats_server_version(version: ServerVersion) -> str:
    """The version the NATS server reports ("2.10.7"), or "" when unknown: str() of
    nats-py's ServerVersion is its repr ("<nats server v2.10.7>"), and it reads
    "0.0.0-unknown" while disconnected."""
    try:
        text = f"{version.major}.{version.minor}.{version.patch}"
        pre, build = version.prerelease, version.build
    except (AttributeError, TypeError, ValueError):
        return ""
    text += (f"-{pre}" if pre else "") + (f"+{build}" if build else "")
    return "" if text == "0.0.0-unknown" else text


def _version_of(components: dict[str, object], name: str) -> str:
    entry = components.get(name)
    return str(entry.get("version", "")) if isinstance(entry, dict) else ""


class Unimplemented(NotImplementedError):
    """An RPC Shoal does not implement: answered UNIMPLEMENTED with this message."""


class RuntimeService(cri_grpc.RuntimeServiceServicer):
    def __init__(self, bus: Bus, pods: Pods, streams: StreamServer) -> None:
        self.bus = bus
        self.pods = pods
        self.streams = streams

    async def _monitor(self, verb: str, message: object, reply: type) -> object:
        return await self.bus.request("monitor", verb, message, reply,  # type: ignore[arg-type]
                                      namespace=NAMESPACE)

    # -- runtime -----------------------------------------------------------------------

    @rpc
    async def Version(self, request: cri.VersionRequest,
                      context: grpc.aio.ServicerContext) -> cri.VersionResponse:
        return cri.VersionResponse(version=KUBE_API_VERSION, runtime_name=RUNTIME_NAME,
                                   runtime_version=__version__,
                                   runtime_api_version=RUNTIME_API_VERSION)

    @rpc
    async def Status(self, request: cri.StatusRequest,
                     context: grpc.aio.ServicerContext) -> cri.StatusResponse:
        conditions, components = await runtime_conditions(self.bus)
        response = cri.StatusResponse(status=cri.RuntimeStatus(conditions=[
            cri.RuntimeCondition(type=c.type, status=c.status, reason=c.reason,
                                 message=c.message) for c in conditions]),
            runtime_handlers=[cri.RuntimeHandler(name=h) for h in components.get(
                "handlers", ["runc"])])  # type: ignore[union-attr]
        if request.verbose:
            config = msgspec.to_builtins(self.bus.config)
            config["nats"].pop("password_file", None)  # where a secret lives stays private
            response.info["config"] = json.dumps(config)
            response.info["components"] = json.dumps(components)
            response.info["version"] = json.dumps({
                "shoal": __version__,
                "nats_server": _nats_server_version(self.bus.nc.connected_server_version),
                "runc": _version_of(components, "runc"),
                "conmon": _version_of(components, "conmon"),
                "cni": _version_of(components, "cni")})
        return response

    @rpc
    async def UpdateRuntimeConfig(self, request: cri.UpdateRuntimeConfigRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> cri.UpdateRuntimeConfigResponse:
        # kubelet sends the node's pod CIDR here; Shoal's CNI config (host-local ranges)
        # decides pod addresses, as containerd does when its CNI config has its own ranges.
        return cri.UpdateRuntimeConfigResponse()

    @rpc
    async def CheckpointContainer(self, request: cri.CheckpointContainerRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> cri.CheckpointContainerResponse:
        raise Unimplemented("CheckpointContainer: checkpoint/restore is not implemented in "
                            "Shoal")

    @rpc
    async def ListMetricDescriptors(self, request: cri.ListMetricDescriptorsRequest,
                                    context: grpc.aio.ServicerContext
                                    ) -> cri.ListMetricDescriptorsResponse:
        raise Unimplemented("ListMetricDescriptors: CRI-served metrics are not implemented; "
                            "scrape each service's /metrics (docs/metrics.md)")

    @rpc
    async def ListPodSandboxMetrics(self, request: cri.ListPodSandboxMetricsRequest,
                                    context: grpc.aio.ServicerContext
                                    ) -> cri.ListPodSandboxMetricsResponse:
        raise Unimplemented("ListPodSandboxMetrics: CRI-served metrics are not implemented; "
                            "use ListPodSandboxStats or each service's /metrics")

    @rpc
    async def UpdatePodSandboxResources(self, request: cri.UpdatePodSandboxResourcesRequest,
                                        context: grpc.aio.ServicerContext
                                        ) -> cri.UpdatePodSandboxResourcesResponse:
        raise Unimplemented("UpdatePodSandboxResources: pod-level resource updates are not "
                            "implemented; UpdateContainerResources is")

    @rpc
    async def RuntimeConfig(self, request: cri.RuntimeConfigRequest,
                            context: grpc.aio.ServicerContext) -> cri.RuntimeConfigResponse:
        return cri.RuntimeConfigResponse(linux=cri.LinuxRuntimeConfiguration(
            cgroup_driver=cri.CGROUPFS))

    # -- pod sandboxes -----------------------------------------------------------------

    @rpc
    async def RunPodSandbox(self, request: cri.RunPodSandboxRequest,
                            context: grpc.aio.ServicerContext) -> cri.RunPodSandboxResponse:
        pod = await self.pods.run(request.config, request.runtime_handler)
        return cri.RunPodSandboxResponse(pod_sandbox_id=pod.id)

    @rpc
    async def StopPodSandbox(self, request: cri.StopPodSandboxRequest,
                             context: grpc.aio.ServicerContext) -> cri.StopPodSandboxResponse:
        await self.pods.stop(request.pod_sandbox_id)
        return cri.StopPodSandboxResponse()

    @rpc
    async def RemovePodSandbox(self, request: cri.RemovePodSandboxRequest,
                               context: grpc.aio.ServicerContext
                               ) -> cri.RemovePodSandboxResponse:
        await self.pods.remove(request.pod_sandbox_id)
        return cri.RemovePodSandboxResponse()

    @rpc
    async def PodSandboxStatus(self, request: cri.PodSandboxStatusRequest,
                               context: grpc.aio.ServicerContext
                               ) -> cri.PodSandboxStatusResponse:
        pod = await self.pods.meta.pod(request.pod_sandbox_id)
        state = await self.pods.sandbox_state(pod)
        status = _pod_status(pod, state)
        response = cri.PodSandboxStatusResponse(status=status)
        if request.verbose:
            response.info["info"] = json.dumps({"netnsPath": pod.netns_path, "state": state,
                                                "runtimeHandler": pod.runtime_handler or "runc"})
        return response

    @rpc
    async def ListPodSandbox(self, request: cri.ListPodSandboxRequest,
                             context: grpc.aio.ServicerContext) -> cri.ListPodSandboxResponse:
        f = request.filter if request.HasField("filter") else None
        pods = [p for p in await self.pods.meta.pods()
                if f is None or ((not f.id or p.id.startswith(f.id))
                                 and _selected(p.labels, dict(f.label_selector)))]
        states = await gather_states(self.pods, pods)
        items = []
        for p in pods:
            state = cri.SANDBOX_READY if states[p.id] == "ready" else cri.SANDBOX_NOTREADY
            if f is not None and f.HasField("state") and f.state.state != state:
                continue
            items.append(cri.PodSandbox(id=p.id, metadata=_pod_metadata(p), state=state,
                                        created_at=p.created_at_ns, labels=p.labels,
                                        annotations=p.annotations,
                                        runtime_handler=p.runtime_handler))
        return cri.ListPodSandboxResponse(items=items)

    # -- containers --------------------------------------------------------------------

    @rpc
    async def CreateContainer(self, request: cri.CreateContainerRequest,
                              context: grpc.aio.ServicerContext) -> cri.CreateContainerResponse:
        ctr = await self.pods.create_container(request.pod_sandbox_id, request.config,
                                               request.sandbox_config)
        return cri.CreateContainerResponse(container_id=ctr.id)

    @rpc
    async def StartContainer(self, request: cri.StartContainerRequest,
                             context: grpc.aio.ServicerContext) -> cri.StartContainerResponse:
        await self.pods.start_container(request.container_id)
        return cri.StartContainerResponse()

    @rpc
    async def StopContainer(self, request: cri.StopContainerRequest,
                            context: grpc.aio.ServicerContext) -> cri.StopContainerResponse:
        await self.pods.stop_container(request.container_id, request.timeout)
        return cri.StopContainerResponse()

    @rpc
    async def RemoveContainer(self, request: cri.RemoveContainerRequest,
                              context: grpc.aio.ServicerContext) -> cri.RemoveContainerResponse:
        await self.pods.remove_container(request.container_id)
        return cri.RemoveContainerResponse()

    @rpc
    async def ContainerStatus(self, request: cri.ContainerStatusRequest,
                              context: grpc.aio.ServicerContext) -> cri.ContainerStatusResponse:
        ctr = await self.pods.meta.container(request.container_id)
        task = await self.pods.task_state(ctr.id)
        status = await _container_status(ctr, task)
        response = cri.ContainerStatusResponse(status=status)
        if request.verbose:
            response.info["info"] = json.dumps({
                "sandboxID": ctr.pod_id, "pid": task.pid if task else 0,
                "bundle": task.bundle if task else ""})
        return response

    @rpc
    async def ListContainers(self, request: cri.ListContainersRequest,
                             context: grpc.aio.ServicerContext) -> cri.ListContainersResponse:
        f = request.filter if request.HasField("filter") else None
        tasks = await self.pods.task_states()
        out = []
        for c in await self.pods.meta.containers():
            state = _container_state(tasks.get(c.id))
            if f is not None and (
                    (f.id and not c.id.startswith(f.id))
                    or (f.pod_sandbox_id and not c.pod_id.startswith(f.pod_sandbox_id))
                    or (f.HasField("state") and f.state.state != state)
                    or not _selected(c.labels, dict(f.label_selector))):
                continue
            out.append(cri.Container(id=c.id, pod_sandbox_id=c.pod_id,
                                     metadata=_ctr_metadata(c),
                                     image=cri.ImageSpec(image=c.image), image_ref=c.image_ref,
                                     image_id=c.image_id, state=state,
                                     created_at=c.created_at_ns, labels=c.labels,
                                     annotations=c.annotations))
        return cri.ListContainersResponse(containers=out)

    @rpc
    async def UpdateContainerResources(self, request: cri.UpdateContainerResourcesRequest,
                                       context: grpc.aio.ServicerContext
                                       ) -> cri.UpdateContainerResourcesResponse:
        ctr = await self.pods.meta.container(request.container_id)
        r = request.linux
        await self._monitor("update", UpdateRequest(id=ctr.id, resources=Resources(
            cpu_shares=r.cpu_shares, cpu_quota=r.cpu_quota, cpu_period=r.cpu_period,
            cpuset_cpus=r.cpuset_cpus, cpuset_mems=r.cpuset_mems,
            memory_limit=r.memory_limit_in_bytes)), TaskState)
        # Recorded only once applied, as containerd updates its status after the task.
        await self.pods.meta.update_resources(
            ctr.id, lambda stored: resources.record_update(stored, r))
        return cri.UpdateContainerResourcesResponse()

    @rpc
    async def ReopenContainerLog(self, request: cri.ReopenContainerLogRequest,
                                 context: grpc.aio.ServicerContext
                                 ) -> cri.ReopenContainerLogResponse:
        ctr = await self.pods.meta.container(request.container_id)
        await self._monitor("reopen_log", TaskIdRequest(id=ctr.id), TaskState)
        return cri.ReopenContainerLogResponse()

    @rpc
    async def ExecSync(self, request: cri.ExecSyncRequest,
                       context: grpc.aio.ServicerContext) -> cri.ExecSyncResponse:
        ctr = await self.pods.meta.container(request.container_id)
        if not request.cmd:
            raise Invalid("ExecSync: cmd is empty")
        reply = await self.bus.request(
            "monitor", "exec_sync", ExecSyncRequest(id=ctr.id, cmd=list(request.cmd),
                                                    timeout=float(request.timeout)),
            ExecSyncReply, namespace=NAMESPACE,
            attempt_timeout=(request.timeout or 3600) + 30, retries=0)
        return cri.ExecSyncResponse(stdout=reply.stdout, stderr=reply.stderr,
                                    exit_code=reply.exit_code)

    # -- streaming (answered with a URL on the streaming server) ------------------------

    @rpc
    async def Exec(self, request: cri.ExecRequest,
                   context: grpc.aio.ServicerContext) -> cri.ExecResponse:
        _check_streams("Exec", request)
        if not request.cmd:
            raise Invalid("Exec: cmd is empty")
        ctr = await self.streams.runtime.running_container(request.container_id)
        return cri.ExecResponse(url=self.streams.url("exec", _with_id(request, ctr.id)))

    @rpc
    async def Attach(self, request: cri.AttachRequest,
                     context: grpc.aio.ServicerContext) -> cri.AttachResponse:
        _check_streams("Attach", request)
        ctr = await self.streams.runtime.running_container(request.container_id)
        return cri.AttachResponse(url=self.streams.url("attach", _with_id(request, ctr.id)))

    @rpc
    async def PortForward(self, request: cri.PortForwardRequest,
                          context: grpc.aio.ServicerContext) -> cri.PortForwardResponse:
        if not request.pod_sandbox_id:
            raise Invalid("PortForward: pod_sandbox_id is required")
        if any(not 0 < p < 65536 for p in request.port):
            raise Invalid(f"PortForward: ports must be 1-65535, got {list(request.port)}")
        pod = await self.streams.runtime.ready_pod(request.pod_sandbox_id)
        return cri.PortForwardResponse(url=self.streams.url("portforward",
                                                            _with_id(request, pod.id)))

    # -- stats -------------------------------------------------------------------------

    def _stats(self, c: ContainerRecord, s: TaskStats,
               layer: SnapshotUsage | None) -> cri.ContainerStats:
        stats = cri.ContainerStats(attributes=cri.ContainerAttributes(
            id=c.id, metadata=_ctr_metadata(c), labels=c.labels, annotations=c.annotations))
        stats.cpu.timestamp = s.timestamp_ns
        stats.cpu.usage_core_nano_seconds.value = s.cpu_usage_ns
        stats.memory.timestamp = s.timestamp_ns
        stats.memory.working_set_bytes.value = s.memory_working_set_bytes
        stats.memory.usage_bytes.value = s.memory_usage_bytes
        if layer is not None:
            stats.writable_layer.timestamp = s.timestamp_ns
            stats.writable_layer.fs_id.mountpoint = "/"
            stats.writable_layer.used_bytes.value = layer.size
            stats.writable_layer.inodes_used.value = layer.inodes
        return stats

    async def _all_stats(self, ids: list[str]) -> dict[str, TaskStats]:
        reply = await self.bus.request("monitor", "stats", StatsRequest(ids=ids), StatsReply,
                                       namespace=NAMESPACE)
        return {s.id: s for s in reply.stats}

    async def _layer_usage(self, container_id: str) -> SnapshotUsage | None:
        """The container's writable layer (its snapshot's own files)."""
        try:
            return await self.bus.request("snapshots", "usage",
                                          SnapshotKeyRequest(key=container_id), SnapshotUsage,
                                          namespace=NAMESPACE)
        except ShoalError:
            return None

    async def _container_stats(self, ctrs: list[ContainerRecord]) -> list[cri.ContainerStats]:
        stats = await self._all_stats([c.id for c in ctrs])
        present = [c for c in ctrs if c.id in stats]
        layers = await asyncio.gather(*(self._layer_usage(c.id) for c in present))
        return [self._stats(c, stats[c.id], layer)
                for c, layer in zip(present, layers, strict=True)]

    @rpc
    async def ContainerStats(self, request: cri.ContainerStatsRequest,
                             context: grpc.aio.ServicerContext) -> cri.ContainerStatsResponse:
        ctr = await self.pods.meta.container(request.container_id)
        stats = await self._container_stats([ctr])
        if not stats:
            raise NotFound(f"container {ctr.id} has no stats (it is not running)")
        return cri.ContainerStatsResponse(stats=stats[0])

    @rpc
    async def ListContainerStats(self, request: cri.ListContainerStatsRequest,
                                 context: grpc.aio.ServicerContext
                                 ) -> cri.ListContainerStatsResponse:
        f = request.filter if request.HasField("filter") else None
        ctrs = [c for c in await self.pods.meta.containers()
                if f is None or ((not f.id or c.id.startswith(f.id))
                                 and (not f.pod_sandbox_id
                                      or c.pod_id.startswith(f.pod_sandbox_id))
                                 and _selected(c.labels, dict(f.label_selector)))]
        return cri.ListContainerStatsResponse(stats=await self._container_stats(ctrs))

    async def _pod_stats(self, pod: PodRecord) -> cri.PodSandboxStats:
        """A pod's usage is the sum of its containers' (the pause process is negligible)."""
        ctrs = await self._container_stats(await self.pods.meta.containers(pod.id))
        now = time.time_ns()
        stats = cri.PodSandboxStats(attributes=cri.PodSandboxAttributes(
            id=pod.id, metadata=_pod_metadata(pod), labels=pod.labels,
            annotations=pod.annotations))
        linux = stats.linux
        linux.cpu.timestamp = now
        linux.cpu.usage_core_nano_seconds.value = sum(
            c.cpu.usage_core_nano_seconds.value for c in ctrs)
        linux.memory.timestamp = now
        linux.memory.working_set_bytes.value = sum(
            c.memory.working_set_bytes.value for c in ctrs)
        linux.memory.usage_bytes.value = sum(c.memory.usage_bytes.value for c in ctrs)
        linux.containers.extend(ctrs)
        return stats

    @rpc
    async def PodSandboxStats(self, request: cri.PodSandboxStatsRequest,
                              context: grpc.aio.ServicerContext) -> cri.PodSandboxStatsResponse:
        pod = await self.pods.meta.pod(request.pod_sandbox_id)
        return cri.PodSandboxStatsResponse(stats=await self._pod_stats(pod))

    @rpc
    async def ListPodSandboxStats(self, request: cri.ListPodSandboxStatsRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> cri.ListPodSandboxStatsResponse:
        f = request.filter if request.HasField("filter") else None
        pods = [p for p in await self.pods.meta.pods()
                if f is None or ((not f.id or p.id.startswith(f.id))
                                 and _selected(p.labels, dict(f.label_selector)))]
        return cri.ListPodSandboxStatsResponse(
            stats=[await self._pod_stats(p) for p in pods])



    # -- events ------------------------------------------------------------------------

    async def GetContainerEvents(self, request: cri.GetEventsRequest,
                                 context: grpc.aio.ServicerContext
                                 ) -> AsyncIterator[cri.ContainerEventResponse]:
        """Live container lifecycle events (kubelet's evented PLEG), fed from the task
        events the supervisor publishes to JetStream, each with its pod's statuses."""
        trace_id = new_trace_id()
        bind_trace(trace_id, rpc="GetContainerEvents")
        CRI_REQUESTS.labels("GetContainerEvents", "OK").inc()
        sub = await self.bus.js.subscribe(
            subjects.event_filter(self.bus.node, NAMESPACE, "tasks.>"), ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=3600)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                _, _, topic = subjects.parse_event(msg.subject)
                if topic not in TASK_EVENTS:
                    continue
                kind, event_type = TASK_EVENTS[topic]
                event = await self._event(kind, codec.decode(msg.data, event_type).id)
                if event is not None:
                    yield event
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _event(self, kind: int, task_id: str) -> cri.ContainerEventResponse | None:
        event = cri.ContainerEventResponse(container_id=task_id, container_event_type=kind,
                                           created_at=time.time_ns())
        try:
            try:
                ctr = await self.pods.meta.container(task_id)
                pod_id = ctr.pod_id
            except NotFound:
                pod_id = task_id  # a pod's own pause task
            pod = await self.pods.meta.pod(pod_id)
        except NotFound:
            return event if kind == cri.CONTAINER_DELETED_EVENT else None
        event.pod_sandbox_status.CopyFrom(_pod_status(pod, await self.pods.sandbox_state(pod)))
        tasks = await self.pods.task_states()
        event.containers_statuses.extend(await asyncio.gather(*(
            _container_status(c, tasks.get(c.id))
            for c in await self.pods.meta.containers(pod.id))))
        return event
