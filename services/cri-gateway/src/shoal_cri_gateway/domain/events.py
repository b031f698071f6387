"""CRI container events (kubelet's evented PLEG), fed from the task events the supervisor
publishes to JetStream, each with its pod's statuses."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import nats.errors
from cri_api.v1 import api_pb2 as cri
from nats.js.api import DeliverPolicy
from shoal_common import codec, subjects
from shoal_common.bus import Bus
from shoal_common.errors import NotFound
from shoal_common.messages.monitor import TaskCreated, TaskDeleted, TaskExited, TaskStarted

from shoal_cri_gateway.domain.views import Views

# Task event → CRI container event type (and the message type to decode it with).
TASK_EVENTS: dict[str, tuple[cri.ContainerEventType.ValueType,
                             type[TaskCreated | TaskStarted | TaskExited | TaskDeleted]]] = {
    TaskCreated.TOPIC: (cri.CONTAINER_CREATED_EVENT, TaskCreated),
    TaskStarted.TOPIC: (cri.CONTAINER_STARTED_EVENT, TaskStarted),
    TaskExited.TOPIC: (cri.CONTAINER_STOPPED_EVENT, TaskExited),
    TaskDeleted.TOPIC: (cri.CONTAINER_DELETED_EVENT, TaskDeleted),
}


class ContainerEvents:
    def __init__(self, bus: Bus, views: Views) -> None:
        self.bus = bus
        self.views = views

    async def follow(self, ns: str) -> AsyncIterator[cri.ContainerEventResponse]:
        """New events of the Shoal namespace `ns` from now on (the supervisor publishes a
        task's events in its create's namespace; an ordered, ephemeral consumer: nothing
        stays behind)."""
        sub = await self.bus.js.subscribe(
            subjects.event_filter(self.bus.node, ns, "tasks.>"), ordered_consumer=True,
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
                event = await self._event(ns, kind, codec.decode(msg.data, event_type).id)
                if event is not None:
                    yield event
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _event(self, ns: str, kind: cri.ContainerEventType.ValueType, task_id: str
                     ) -> cri.ContainerEventResponse | None:
        event = cri.ContainerEventResponse(container_id=task_id, container_event_type=kind,
                                           created_at=time.time_ns())
        meta = self.views.pods.meta
        try:
            try:
                pod_id = (await meta.container(task_id, ns)).pod_id
            except NotFound:
                pod_id = task_id  # a pod's own pause task
            pod = await meta.pod(pod_id, ns)
        except NotFound:
            return event if kind == cri.CONTAINER_DELETED_EVENT else None
        status, containers = await self.views.pod_statuses(pod)
        event.pod_sandbox_status.CopyFrom(status)
        event.containers_statuses.extend(containers)
        return event
