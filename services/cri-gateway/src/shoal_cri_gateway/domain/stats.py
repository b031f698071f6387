"""CRI stats: the supervisor's cgroup readings and the snapshotter's writable-layer usage."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from cri_api.v1 import api_pb2 as cri
from shoal_common.clients import Clients
from shoal_common.errors import NotFound, ShoalError
from shoal_common.messages.monitor import StatsRequest, TaskStats
from shoal_common.messages.snapshots import SnapshotKeyRequest, SnapshotUsage

from shoal_cri_gateway.domain.pods import Pods
from shoal_cri_gateway.domain.views import (
    container_matches,
    ctr_metadata,
    pod_matches,
    pod_metadata,
)
from shoal_cri_gateway.store.metadata import ContainerRecord, PodRecord

if TYPE_CHECKING:  # cri_metrics uses layer_usage from here
    from shoal_cri_gateway.domain.cri_metrics import CriMetrics


async def layer_usage(clients: Clients, container_id: str) -> SnapshotUsage | None:
    """The container's writable layer (its snapshot's own files); None when unknown."""
    try:
        return await clients.snapshots.usage(SnapshotKeyRequest(key=container_id))
    except ShoalError:
        return None


def _container_stats(c: ContainerRecord, s: TaskStats,
                     layer: SnapshotUsage | None) -> cri.ContainerStats:
    stats = cri.ContainerStats(attributes=cri.ContainerAttributes(
        id=c.id, metadata=ctr_metadata(c), labels=c.labels, annotations=c.annotations))
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


class Stats:
    """Of the caller's Shoal namespace (`ns`) only."""

    def __init__(self, pods: Pods, cri_metrics: CriMetrics) -> None:
        self.pods = pods
        self.cri_metrics = cri_metrics  # the same readings as Prometheus series (CRI metrics)

    async def _of(self, ns: str, ctrs: list[ContainerRecord]) -> list[cri.ContainerStats]:
        if not ctrs:  # an empty `ids` would ask for every task on the node
            return []
        clients = self.pods.clients(ns)
        reply = await clients.monitor.stats(StatsRequest(ids=[c.id for c in ctrs]))
        stats = {s.id: s for s in reply.stats}
        present = [c for c in ctrs if c.id in stats]
        layers = await asyncio.gather(*(layer_usage(clients, c.id) for c in present))
        return [_container_stats(c, stats[c.id], layer)
                for c, layer in zip(present, layers, strict=True)]

    async def container(self, ns: str, container_id: str) -> cri.ContainerStats:
        ctr = await self.pods.meta.container(container_id, ns)
        stats = await self._of(ns, [ctr])
        if not stats:
            raise NotFound(f"container {ctr.id} has no stats (it is not running)")
        return stats[0]

    async def list_containers(self, ns: str, f: cri.ContainerStatsFilter | None
                              ) -> list[cri.ContainerStats]:
        return await self._of(ns, [c for c in await self.pods.meta.containers(ns)
                                   if container_matches(c, f)])

    async def _pod(self, pod: PodRecord) -> cri.PodSandboxStats:
        """A pod's usage is the sum of its containers' (the pause process is negligible)."""
        ns = pod.shoal_namespace
        ctrs = await self._of(ns, await self.pods.meta.containers(ns, pod.id))
        now = time.time_ns()
        stats = cri.PodSandboxStats(attributes=cri.PodSandboxAttributes(
            id=pod.id, metadata=pod_metadata(pod), labels=pod.labels,
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

    async def pod(self, ns: str, pod_id: str) -> cri.PodSandboxStats:
        return await self._pod(await self.pods.meta.pod(pod_id, ns))

    async def list_pods(self, ns: str, f: cri.PodSandboxStatsFilter | None
                        ) -> list[cri.PodSandboxStats]:
        return [await self._pod(p) for p in await self.pods.meta.pods(ns) if pod_matches(p, f)]
