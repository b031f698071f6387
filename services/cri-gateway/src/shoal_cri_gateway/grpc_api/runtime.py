"""CRI RuntimeService: protobuf requests in, domain calls, protobuf answers out.

Everything else (records, bus calls, state and stats assembly, events) is the gateway's
domain; RPCs not written yet answer UNIMPLEMENTED (the generated base)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import grpc
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc
from shoal_common import __version__
from shoal_common.bus import Bus
from shoal_common.errors import GRPC_STATUS, Invalid, ShoalError
from shoal_common.tracing import bind_trace, new_trace_id

from shoal_cri_gateway.domain.events import ContainerEvents
from shoal_cri_gateway.domain.pods import Pods
from shoal_cri_gateway.domain.resources import cgroup_driver
from shoal_cri_gateway.domain.stats import Stats
from shoal_cri_gateway.domain.status import runtime_conditions, runtime_handlers, verbose_info
from shoal_cri_gateway.domain.views import Views
from shoal_cri_gateway.grpc_api.rpc import CRI_REQUESTS, namespace_of, rpc
from shoal_cri_gateway.streaming.server import StreamServer

StreamRequest = TypeVar("StreamRequest", cri.ExecRequest, cri.AttachRequest,
                        cri.PortForwardRequest)

Filter = TypeVar("Filter", covariant=True)

KUBE_API_VERSION = "0.1.0"  # what kubelet expects in VersionResponse.version
RUNTIME_NAME = "shoal"
RUNTIME_API_VERSION = "v1"


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


class _Filtered(Protocol[Filter]):
    """A List request, whose `filter` counts only when it is set."""

    @property
    def filter(self) -> Filter: ...

    def HasField(self, field_name: Literal["filter"], /) -> bool: ...


def _filter_of(request: _Filtered[Filter]) -> Filter | None:
    return request.filter if request.HasField("filter") else None


@dataclass
class Runtime:
    """The gateway's domain, as the RuntimeService sees it."""

    bus: Bus  # for Status: the services' health and the NATS server's version
    pods: Pods
    views: Views
    stats: Stats
    events: ContainerEvents
    streams: StreamServer


class Unimplemented(NotImplementedError):
    """An RPC Shoal does not implement: answered UNIMPLEMENTED with this message."""


class RuntimeService(cri_grpc.RuntimeServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.pods = runtime.pods
        self.streams = runtime.streams

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
        conditions, components = await runtime_conditions(self.rt.bus)
        response = cri.StatusResponse(status=cri.RuntimeStatus(conditions=[
            cri.RuntimeCondition(type=c.type, status=c.status, reason=c.reason,
                                 message=c.message) for c in conditions]),
            runtime_handlers=[cri.RuntimeHandler(name=h.name, features=cri.RuntimeHandlerFeatures(
                recursive_read_only_mounts=h.recursive_read_only,
                user_namespaces=h.user_namespaces)) for h in runtime_handlers(components)],
            # The executor applies SupplementalGroupsPolicy (Merge and Strict) on every
            # handler, and ContainerStatus reports the ids the process runs with.
            features=cri.RuntimeFeatures(supplemental_groups_policy=True))
        if request.verbose:
            response.info.update(verbose_info(self.rt.bus, components))
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
        raise Unimplemented("CheckpointContainer: not implemented in Shoal: it needs CRIU, and "
                            "CRIU cannot run on the kernels it was built on (`criu check`: "
                            "'kerndat_vdso_fill_symtable failed' on Linux 6.18)")

    @rpc
    async def ListMetricDescriptors(self, request: cri.ListMetricDescriptorsRequest,
                                    context: grpc.aio.ServicerContext
                                    ) -> cri.ListMetricDescriptorsResponse:
        return cri.ListMetricDescriptorsResponse(
            descriptors=self.rt.stats.cri_metrics.descriptors())

    @rpc
    async def ListPodSandboxMetrics(self, request: cri.ListPodSandboxMetricsRequest,
                                    context: grpc.aio.ServicerContext
                                    ) -> cri.ListPodSandboxMetricsResponse:
        return cri.ListPodSandboxMetricsResponse(
            pod_metrics=await self.rt.stats.cri_metrics.list_pods(namespace_of(context)))

    @rpc
    async def UpdatePodSandboxResources(self, request: cri.UpdatePodSandboxResourcesRequest,
                                        context: grpc.aio.ServicerContext
                                        ) -> cri.UpdatePodSandboxResourcesResponse:
        await self.pods.update_pod_resources(namespace_of(context), request.pod_sandbox_id,
                                             request)
        return cri.UpdatePodSandboxResourcesResponse()

    @rpc
    async def RuntimeConfig(self, request: cri.RuntimeConfigRequest,
                            context: grpc.aio.ServicerContext) -> cri.RuntimeConfigResponse:
        # kubelet 1.31+ takes its cgroup driver from here (KubeletCgroupDriverFromCRI).
        return cri.RuntimeConfigResponse(linux=cri.LinuxRuntimeConfiguration(
            cgroup_driver=cgroup_driver(self.rt.bus.config)))

    # -- pod sandboxes -----------------------------------------------------------------

    @rpc
    async def RunPodSandbox(self, request: cri.RunPodSandboxRequest,
                            context: grpc.aio.ServicerContext) -> cri.RunPodSandboxResponse:
        pod = await self.pods.run(namespace_of(context), request.config,
                                  request.runtime_handler)
        return cri.RunPodSandboxResponse(pod_sandbox_id=pod.id)

    @rpc
    async def StopPodSandbox(self, request: cri.StopPodSandboxRequest,
                             context: grpc.aio.ServicerContext) -> cri.StopPodSandboxResponse:
        await self.pods.stop(namespace_of(context), request.pod_sandbox_id)
        return cri.StopPodSandboxResponse()

    @rpc
    async def RemovePodSandbox(self, request: cri.RemovePodSandboxRequest,
                               context: grpc.aio.ServicerContext
                               ) -> cri.RemovePodSandboxResponse:
        await self.pods.remove(namespace_of(context), request.pod_sandbox_id)
        return cri.RemovePodSandboxResponse()

    @rpc
    async def PodSandboxStatus(self, request: cri.PodSandboxStatusRequest,
                               context: grpc.aio.ServicerContext
                               ) -> cri.PodSandboxStatusResponse:
        status, info = await self.rt.views.pod_status(namespace_of(context),
                                                      request.pod_sandbox_id)
        return cri.PodSandboxStatusResponse(status=status, info=info if request.verbose else {})

    @rpc
    async def ListPodSandbox(self, request: cri.ListPodSandboxRequest,
                             context: grpc.aio.ServicerContext) -> cri.ListPodSandboxResponse:
        return cri.ListPodSandboxResponse(items=await self.rt.views.list_pods(
            namespace_of(context), _filter_of(request)))

    # -- containers --------------------------------------------------------------------

    @rpc
    async def CreateContainer(self, request: cri.CreateContainerRequest,
                              context: grpc.aio.ServicerContext) -> cri.CreateContainerResponse:
        ctr = await self.pods.create_container(namespace_of(context), request.pod_sandbox_id,
                                               request.config, request.sandbox_config)
        return cri.CreateContainerResponse(container_id=ctr.id)

    @rpc
    async def StartContainer(self, request: cri.StartContainerRequest,
                             context: grpc.aio.ServicerContext) -> cri.StartContainerResponse:
        await self.pods.start_container(namespace_of(context), request.container_id)
        return cri.StartContainerResponse()

    @rpc
    async def StopContainer(self, request: cri.StopContainerRequest,
                            context: grpc.aio.ServicerContext) -> cri.StopContainerResponse:
        await self.pods.stop_container(namespace_of(context), request.container_id,
                                       request.timeout)
        return cri.StopContainerResponse()

    @rpc
    async def RemoveContainer(self, request: cri.RemoveContainerRequest,
                              context: grpc.aio.ServicerContext) -> cri.RemoveContainerResponse:
        await self.pods.remove_container(namespace_of(context), request.container_id)
        return cri.RemoveContainerResponse()

    @rpc
    async def ContainerStatus(self, request: cri.ContainerStatusRequest,
                              context: grpc.aio.ServicerContext) -> cri.ContainerStatusResponse:
        status, info = await self.rt.views.container_status(namespace_of(context),
                                                            request.container_id)
        return cri.ContainerStatusResponse(status=status, info=info if request.verbose else {})

    @rpc
    async def ListContainers(self, request: cri.ListContainersRequest,
                             context: grpc.aio.ServicerContext) -> cri.ListContainersResponse:
        return cri.ListContainersResponse(containers=await self.rt.views.list_containers(
            namespace_of(context), _filter_of(request)))

    @rpc
    async def UpdateContainerResources(self, request: cri.UpdateContainerResourcesRequest,
                                       context: grpc.aio.ServicerContext
                                       ) -> cri.UpdateContainerResourcesResponse:
        await self.pods.update_resources(namespace_of(context), request.container_id,
                                         request.linux)
        return cri.UpdateContainerResourcesResponse()

    @rpc
    async def ReopenContainerLog(self, request: cri.ReopenContainerLogRequest,
                                 context: grpc.aio.ServicerContext
                                 ) -> cri.ReopenContainerLogResponse:
        await self.pods.reopen_log(namespace_of(context), request.container_id)
        return cri.ReopenContainerLogResponse()

    @rpc
    async def ExecSync(self, request: cri.ExecSyncRequest,
                       context: grpc.aio.ServicerContext) -> cri.ExecSyncResponse:
        reply = await self.pods.exec_sync(namespace_of(context), request.container_id,
                                          list(request.cmd), request.timeout)
        return cri.ExecSyncResponse(stdout=reply.stdout, stderr=reply.stderr,
                                    exit_code=reply.exit_code)

    # -- streaming (answered with a URL on the streaming server) ------------------------

    @rpc
    async def Exec(self, request: cri.ExecRequest,
                   context: grpc.aio.ServicerContext) -> cri.ExecResponse:
        _check_streams("Exec", request)
        if not request.cmd:
            raise Invalid("Exec: cmd is empty")
        ns = namespace_of(context)
        ctr = await self.streams.runtime.running_container(ns, request.container_id)
        return cri.ExecResponse(url=self.streams.url("exec", _with_id(request, ctr.id), ns))

    @rpc
    async def Attach(self, request: cri.AttachRequest,
                     context: grpc.aio.ServicerContext) -> cri.AttachResponse:
        _check_streams("Attach", request)
        ns = namespace_of(context)
        ctr = await self.streams.runtime.running_container(ns, request.container_id)
        return cri.AttachResponse(url=self.streams.url("attach", _with_id(request, ctr.id),
                                                       ns))

    @rpc
    async def PortForward(self, request: cri.PortForwardRequest,
                          context: grpc.aio.ServicerContext) -> cri.PortForwardResponse:
        if not request.pod_sandbox_id:
            raise Invalid("PortForward: pod_sandbox_id is required")
        if any(not 0 < p < 65536 for p in request.port):
            raise Invalid(f"PortForward: ports must be 1-65535, got {list(request.port)}")
        ns = namespace_of(context)
        pod = await self.streams.runtime.ready_pod(ns, request.pod_sandbox_id)
        return cri.PortForwardResponse(url=self.streams.url("portforward",
                                                            _with_id(request, pod.id), ns))

    # -- stats -------------------------------------------------------------------------

    @rpc
    async def ContainerStats(self, request: cri.ContainerStatsRequest,
                             context: grpc.aio.ServicerContext) -> cri.ContainerStatsResponse:
        return cri.ContainerStatsResponse(stats=await self.rt.stats.container(
            namespace_of(context), request.container_id))

    @rpc
    async def ListContainerStats(self, request: cri.ListContainerStatsRequest,
                                 context: grpc.aio.ServicerContext
                                 ) -> cri.ListContainerStatsResponse:
        return cri.ListContainerStatsResponse(stats=await self.rt.stats.list_containers(
            namespace_of(context), _filter_of(request)))

    @rpc
    async def PodSandboxStats(self, request: cri.PodSandboxStatsRequest,
                              context: grpc.aio.ServicerContext) -> cri.PodSandboxStatsResponse:
        return cri.PodSandboxStatsResponse(stats=await self.rt.stats.pod(
            namespace_of(context), request.pod_sandbox_id))

    @rpc
    async def ListPodSandboxStats(self, request: cri.ListPodSandboxStatsRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> cri.ListPodSandboxStatsResponse:
        return cri.ListPodSandboxStatsResponse(stats=await self.rt.stats.list_pods(
            namespace_of(context), _filter_of(request)))

    # -- events ------------------------------------------------------------------------

    async def GetContainerEvents(self, request: cri.GetEventsRequest,
                                 context: grpc.aio.ServicerContext
                                 ) -> AsyncIterator[cri.ContainerEventResponse]:
        """Live container lifecycle events (kubelet's evented PLEG). A stream, so not
        wrapped by `rpc`: counted and traced once at its start."""
        bind_trace(new_trace_id(), rpc="GetContainerEvents")
        try:
            ns = namespace_of(context)
        except ShoalError as exc:
            CRI_REQUESTS.labels("GetContainerEvents", "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode[GRPC_STATUS[exc.code]], exc.message)
        CRI_REQUESTS.labels("GetContainerEvents", "OK").inc()
        async for event in self.rt.events.follow(ns):
            yield event
