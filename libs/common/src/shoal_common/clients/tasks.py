"""The executor (`tasks.*`): pod sandboxes and containers, idempotent by the caller's id,
and pod networks."""

from __future__ import annotations

from shoal_common.clients.base import PROBE_TIMEOUT, ServiceClient, Verb
from shoal_common.messages import Empty, RuntimeStatusReply, RuntimeStatusRequest
from shoal_common.messages.monitor import TaskState
from shoal_common.messages.networks import (
    NetworkAttachment,
    NetworkCreateRequest,
    NetworkInfo,
    NetworkList,
    NetworkListRequest,
    NetworkNameRequest,
    SandboxNetworkRequest,
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

SETUP_TIMEOUT = 300.0  # a sandbox's pause image may still be unpacking
STOP_MARGIN = 60.0  # a stop's budget beyond its grace period
ATTEMPT = 30.0  # a create or remove answers in seconds; silence this long = a dead replica


class TasksClient(ServiceClient):
    service = "tasks"

    status = Verb("status", RuntimeStatusRequest, RuntimeStatusReply,
                  attempt_timeout=PROBE_TIMEOUT, retries=1, wait_for_service=False)
    # Creates and removes are idempotent by the caller's id (the executor serialises a
    # repeat behind the first), so an attempt that hears nothing for ATTEMPT seconds — its
    # replica was killed — is sent again instead of waiting out the whole budget.
    sandbox_create = Verb("sandbox.create", SandboxCreateRequest, SandboxInfo,
                          attempt_timeout=ATTEMPT, timeout=SETUP_TIMEOUT, retries=9)
    sandbox_status = Verb("sandbox.status", SandboxIdRequest, SandboxInfo)
    sandbox_stop = Verb("sandbox.stop", SandboxIdRequest, SandboxInfo, attempt_timeout=ATTEMPT,
                        retries=3)
    sandbox_remove = Verb("sandbox.remove", SandboxIdRequest, Empty, attempt_timeout=ATTEMPT,
                          retries=3)
    container_create = Verb("container.create", ContainerCreateRequest, ContainerCreateReply,
                            attempt_timeout=ATTEMPT, retries=3)
    container_start = Verb("container.start", ContainerIdRequest, TaskState,
                           attempt_timeout=ATTEMPT, retries=1)
    # Sent through `stop_container`, which adds the grace period to the attempt's budget.
    container_stop = Verb("container.stop", ContainerStopRequest, TaskState,
                          attempt_timeout=STOP_MARGIN, retries=1)
    container_remove = Verb("container.remove", ContainerIdRequest, Empty,
                            attempt_timeout=ATTEMPT, retries=3)
    # Pod networks (CNI configuration lists in the executor's conf dir). A create is
    # idempotent by its id; a repeated remove finds the network gone (NOT_FOUND).
    network_create = Verb("network.create", NetworkCreateRequest, NetworkInfo,
                          attempt_timeout=ATTEMPT, retries=3)
    network_list = Verb("network.list", NetworkListRequest, NetworkList)
    network_get = Verb("network.get", NetworkNameRequest, NetworkInfo)
    network_remove = Verb("network.remove", NetworkNameRequest, Empty,
                          attempt_timeout=ATTEMPT, retries=3)
    # A ready pod on more networks than the one it was made on (Docker's network connect).
    sandbox_connect = Verb("sandbox.connect", SandboxNetworkRequest, NetworkAttachment,
                           attempt_timeout=ATTEMPT, retries=3)
    sandbox_disconnect = Verb("sandbox.disconnect", SandboxNetworkRequest, Empty,
                              attempt_timeout=ATTEMPT, retries=3)

    async def stop_container(self, req: ContainerStopRequest) -> TaskState:
        """A stop waits the container's grace period on top of the attempt's own budget."""
        return await self.call(TasksClient.container_stop, req,
                               attempt_timeout=STOP_MARGIN + max(req.timeout, 0.0))
