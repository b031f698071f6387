"""CRI-served metrics (ListMetricDescriptors, ListPodSandboxMetrics): what kubelet's
PodAndContainerStatsFromCRI serves on /metrics/cadvisor instead of cAdvisor's own.

Names, types and labels are cAdvisor's, labelled as CRI-O does (`id`, `image`,
`namespace`, `pod`, `container`; `cpu` and `interface` where cAdvisor has them), so the
usual dashboards and alerts work unchanged. Every value is read when asked for: the
supervisor's cgroup readings, the snapshotter's writable-layer usage, the OCI spec's
resources, and the counters of the pod's network namespace (pod-level series, on the
pause container `POD` as cAdvisor shows them)."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

from cri_api.v1 import api_pb2 as cri
from shoal_common.messages.monitor import StatsRequest, TaskState, TaskStats
from shoal_common.messages.snapshots import SnapshotUsage

from shoal_cri_gateway.domain import resources
from shoal_cri_gateway.domain.pods import Pods
from shoal_cri_gateway.domain.stats import layer_usage
from shoal_cri_gateway.store.metadata import ContainerRecord, PodRecord

BASE_LABELS = ("id", "image", "namespace", "pod", "container")
POD_CONTAINER = "POD"  # the `container` of pod-level series: cAdvisor's and CRI-O's name
NS_PER_S = 1_000_000_000
# cAdvisor's (and CRI-O's) bound: a memory limit above it is the kernel's "max", shown as 0.
UNLIMITED_MEMORY = 1 << 62


@dataclass(frozen=True)
class Descriptor:
    name: str
    help: str
    type: cri.MetricType.ValueType  # COUNTER or GAUGE
    extra_labels: tuple[str, ...] = ()

    def proto(self) -> cri.MetricDescriptor:
        return cri.MetricDescriptor(name=self.name, help=self.help,
                                    label_keys=[*BASE_LABELS, *self.extra_labels])


def _gauge(name: str, help_: str) -> Descriptor:
    return Descriptor(name, help_, cri.GAUGE)


CPU_USAGE = Descriptor("container_cpu_usage_seconds_total",
                       "Cumulative CPU time consumed in seconds.", cri.COUNTER, ("cpu",))
MEMORY_USAGE = _gauge("container_memory_usage_bytes", "Current memory usage in bytes, "
                      "including all memory regardless of when it was accessed.")
WORKING_SET = _gauge("container_memory_working_set_bytes", "Current working set in bytes.")
PROCESSES = _gauge("container_processes", "Number of processes running inside the container.")
FS_USAGE = _gauge("container_fs_usage_bytes",
                  "Bytes used by the container's writable layer.")
MEMORY_LIMIT = _gauge("container_spec_memory_limit_bytes",
                      "Memory limit for the container in bytes (0: unlimited).")
CPU_PERIOD = _gauge("container_spec_cpu_period", "CPU period of the container.")
CPU_QUOTA = _gauge("container_spec_cpu_quota", "CPU quota of the container.")
CPU_SHARES = _gauge("container_spec_cpu_shares", "CPU share of the container.")
START_TIME = _gauge("container_start_time_seconds",
                    "Start time of the container since unix epoch in seconds.")
LAST_SEEN = _gauge("container_last_seen", "Last time a container was seen by the exporter.")

# Columns of /proc/net/dev after "<interface>:": 8 receive counters, then 8 transmit ones.
NETWORK = tuple((Descriptor(f"container_network_{name}_total", help_, cri.COUNTER,
                            ("interface",)), column) for name, help_, column in (
    ("receive_bytes", "Cumulative count of bytes received.", 0),
    ("receive_packets", "Cumulative count of packets received.", 1),
    ("receive_errors", "Cumulative count of errors encountered while receiving.", 2),
    ("receive_packets_dropped", "Cumulative count of packets dropped while receiving.", 3),
    ("transmit_bytes", "Cumulative count of bytes transmitted.", 8),
    ("transmit_packets", "Cumulative count of packets transmitted.", 9),
    ("transmit_errors", "Cumulative count of errors encountered while transmitting.", 10),
    ("transmit_packets_dropped", "Cumulative count of packets dropped while transmitting.",
     11)))

DESCRIPTORS = (CPU_USAGE, MEMORY_USAGE, WORKING_SET, PROCESSES, FS_USAGE, MEMORY_LIMIT,
               CPU_PERIOD, CPU_QUOTA, CPU_SHARES, START_TIME, LAST_SEEN,
               *(d for d, _ in NETWORK))


def _metric(d: Descriptor, labels: list[str], value: int,
            extra: tuple[str, ...] = ()) -> cri.Metric:
    # Timestamp 0: the CRI's mark of a value read for this request (a timestamp marks a
    # cached one); kubelet then exposes it at scrape time, so Prometheus staleness works.
    return cri.Metric(name=d.name, metric_type=d.type, label_values=[*labels, *extra],
                      value=cri.UInt64Value(value=max(0, value)))


def container_metrics(c: ContainerRecord, pod: PodRecord, task: TaskState, s: TaskStats,
                      layer: SnapshotUsage | None, spec: cri.LinuxContainerResources,
                      now: float) -> cri.ContainerMetrics:
    labels = [c.id, c.image, pod.namespace, pod.name, c.name]
    limit = spec.memory_limit_in_bytes
    values = [
        # UInt64 values: whole seconds, truncated as CRI-O does (a counter stays monotonic).
        (CPU_USAGE, s.cpu_usage_ns // NS_PER_S, ("total",)),
        (MEMORY_USAGE, s.memory_usage_bytes, ()),
        (WORKING_SET, s.memory_working_set_bytes, ()),
        (PROCESSES, s.pids, ()),
        (MEMORY_LIMIT, limit if 0 < limit <= UNLIMITED_MEMORY else 0, ()),
        (CPU_PERIOD, spec.cpu_period, ()),
        (CPU_SHARES, spec.cpu_shares, ()),
        # The runtime's create (its cgroup's birth), as cAdvisor's creation time.
        (START_TIME, int(task.created_at) or c.created_at_ns // NS_PER_S, ()),
        (LAST_SEEN, int(now), ()),
    ]
    if spec.cpu_quota > 0:  # cAdvisor leaves an unlimited quota (-1) out
        values.append((CPU_QUOTA, spec.cpu_quota, ()))
    if layer is not None:
        values.append((FS_USAGE, layer.size, ()))
    return cri.ContainerMetrics(container_id=c.id, metrics=[
        _metric(d, labels, v, extra) for d, v, extra in values])


def parse_net_dev(text: str) -> dict[str, list[int]]:
    """Counters per interface of a /proc/net/dev, loopback left out (as cAdvisor does:
    traffic a pod sends itself never leaves it)."""
    out: dict[str, list[int]] = {}
    for line in text.splitlines()[2:]:  # two header lines
        name, sep, counters = line.partition(":")
        values = counters.split()
        if sep and name.strip() != "lo" and len(values) >= 16 and all(
                v.isdigit() for v in values):
            out[name.strip()] = [int(v) for v in values]
    return out


def read_pod_network(pid: int, netns_path: str) -> dict[str, list[int]]:
    """The pod's interfaces, through its pause process's /proc entry. The entry is opened
    once and the namespace checked under it, so a pause that exited (its pid maybe reused
    by another process) yields nothing instead of someone else's traffic."""
    try:
        want = os.stat(netns_path)
        proc = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return {}
    try:
        have = os.stat("ns/net", dir_fd=proc)
        if (have.st_dev, have.st_ino) != (want.st_dev, want.st_ino):
            return {}
        fd = os.open("net/dev", os.O_RDONLY, dir_fd=proc)
        with open(fd, encoding="utf-8", errors="replace") as f:
            return parse_net_dev(f.read())
    except OSError:
        return {}
    finally:
        os.close(proc)


def pod_metrics(pod: PodRecord, network: dict[str, list[int]]) -> list[cri.Metric]:
    labels = [pod.id, "", pod.namespace, pod.name, POD_CONTAINER]
    return [_metric(d, labels, counters[column], (interface,))
            for interface, counters in sorted(network.items()) for d, column in NETWORK]


class CriMetrics:
    def __init__(self, pods: Pods) -> None:
        self.pods = pods

    @staticmethod
    def descriptors() -> list[cri.MetricDescriptor]:
        """Fixed for the gateway's life: kubelet reads them once, at its start."""
        return [d.proto() for d in DESCRIPTORS]

    async def _network(self, pod: PodRecord, inside: TaskState | None
                       ) -> dict[str, list[int]]:
        # A host-network pod (no netns of its own) would report the node's interfaces.
        if not pod.netns_path or inside is None or inside.state != "running" or \
                not inside.pid:
            return {}
        return await asyncio.to_thread(read_pod_network, inside.pid, pod.netns_path)

    async def _spec(self, c: ContainerRecord, task: TaskState) -> cri.LinuxContainerResources:
        """The resources ContainerStatus reports: the OCI spec's, with applied updates."""
        created = await resources.base(c.config, task.bundle)
        return resources.current(created, c.updated_resources).linux

    async def _containers(self, ns: str, ctrs: list[ContainerRecord],
                          pods: dict[str, PodRecord], tasks: dict[str, TaskState]
                          ) -> dict[str, list[cri.ContainerMetrics]]:
        """Metrics of the given (running) containers, by pod id."""
        if not ctrs:  # an empty `ids` would ask for every task on the node
            return {}
        clients = self.pods.clients(ns)
        reply = await clients.monitor.stats(StatsRequest(ids=[c.id for c in ctrs]))
        stats = {s.id: s for s in reply.stats}
        present = [c for c in ctrs if c.id in stats]
        layers, specs = await asyncio.gather(
            asyncio.gather(*(layer_usage(clients, c.id) for c in present)),
            asyncio.gather(*(self._spec(c, tasks[c.id]) for c in present)))
        now = time.time()
        out: dict[str, list[cri.ContainerMetrics]] = {}
        for c, layer, spec in zip(present, layers, specs, strict=True):
            out.setdefault(c.pod_id, []).append(container_metrics(
                c, pods[c.pod_id], tasks[c.id], stats[c.id], layer, spec, now))
        return out

    async def list_pods(self, ns: str) -> list[cri.PodSandboxMetrics]:
        """Every pod of `ns` with its network counters and its running containers' metrics
        (a stopped container has no cgroup left to read, as in CRI-O)."""
        pods = {p.id: p for p in await self.pods.meta.pods(ns) if p.state != "creating"}
        tasks = await self.pods.task_states(ns)
        running = [c for c in await self.pods.meta.containers(ns)
                   if c.pod_id in pods and c.state != "creating"
                   and (t := tasks.get(c.id)) is not None and t.state == "running"]
        # A pod's interfaces are read through a process in its network namespace: its
        # pause process, or (a pod without one) any running container of it.
        inside = {c.pod_id: tasks[c.id] for c in running}
        by_pod, networks = await asyncio.gather(
            self._containers(ns, running, pods, tasks),
            asyncio.gather(*(self._network(p, inside.get(p.id) if p.pinned else
                                           tasks.get(p.id)) for p in pods.values())))
        return [cri.PodSandboxMetrics(pod_sandbox_id=p.id, metrics=pod_metrics(p, network),
                                      container_metrics=by_pod.get(p.id, []))
                for p, network in zip(pods.values(), networks, strict=True)]
