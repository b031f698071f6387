"""The executor (`tasks.*`): pod sandboxes and containers, idempotent by the caller's id."""

from __future__ import annotations

from shoal_common.clients.base import ServiceClient, Verb
from shoal_common.messages import Empty, RuntimeStatusReply, RuntimeStatusRequest
from shoal_common.messages.monitor import TaskState
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


class TasksClient(ServiceClient):
    service = "tasks"

    status = Verb("status", RuntimeStatusRequest, RuntimeStatusReply)
    sandbox_create = Verb("sandbox.create", SandboxCreateRequest, SandboxInfo,
                          attempt_timeout=SETUP_TIMEOUT, timeout=SETUP_TIMEOUT, retries=0)
    sandbox_status = Verb("sandbox.status", SandboxIdRequest, SandboxInfo)
    sandbox_stop = Verb("sandbox.stop", SandboxIdRequest, SandboxInfo, attempt_timeout=120,
                        retries=0)
    sandbox_remove = Verb("sandbox.remove", SandboxIdRequest, Empty, attempt_timeout=60,
                          retries=0)
    container_create = Verb("container.create", ContainerCreateRequest, ContainerCreateReply,
                            attempt_timeout=120, retries=0)
    container_start = Verb("container.start", ContainerIdRequest, TaskState,
                           attempt_timeout=60, retries=0)
    # Sent through `stop_container`, which adds the grace period to the attempt's budget.
    container_stop = Verb("container.stop", ContainerStopRequest, TaskState,
                          attempt_timeout=STOP_MARGIN, retries=0)
    container_remove = Verb("container.remove", ContainerIdRequest, Empty, attempt_timeout=60,
                            retries=0)

    async def stop_container(self, req: ContainerStopRequest) -> TaskState:
        """A stop waits the container's grace period on top of the attempt's own budget."""
        return await self.call(TasksClient.container_stop, req,
                               attempt_timeout=STOP_MARGIN + max(req.timeout, 0.0))
