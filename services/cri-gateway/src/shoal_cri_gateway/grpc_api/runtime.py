"""CRI RuntimeService. RPCs not written yet answer UNIMPLEMENTED (the generated base)."""

from __future__ import annotations

import grpc
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc
from shoal_common import __version__
from shoal_common.bus import Bus

from shoal_cri_gateway.domain.status import runtime_conditions
from shoal_cri_gateway.grpc_api.rpc import rpc

KUBE_API_VERSION = "0.1.0"  # what kubelet expects in VersionResponse.version
RUNTIME_NAME = "shoal"
RUNTIME_API_VERSION = "v1"


class RuntimeService(cri_grpc.RuntimeServiceServicer):
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    @rpc
    async def Version(self, request: cri.VersionRequest,
                      context: grpc.aio.ServicerContext) -> cri.VersionResponse:
        return cri.VersionResponse(version=KUBE_API_VERSION, runtime_name=RUNTIME_NAME,
                                   runtime_version=__version__,
                                   runtime_api_version=RUNTIME_API_VERSION)

    @rpc
    async def Status(self, request: cri.StatusRequest,
                     context: grpc.aio.ServicerContext) -> cri.StatusResponse:
        conditions = await runtime_conditions(self.bus)
        return cri.StatusResponse(status=cri.RuntimeStatus(conditions=[
            cri.RuntimeCondition(type=c.type, status=c.status, reason=c.reason,
                                 message=c.message) for c in conditions]))
