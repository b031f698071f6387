"""CRI-served metrics (kubelet's PodAndContainerStatsFromCRI): ListMetricDescriptors and
ListPodSandboxMetrics from a real pod's cgroups, writable layer and network namespace."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2 as cri
from support.shoal import Cri, pod_config

pytestmark = pytest.mark.e2e

MEMORY_LIMIT = 64 << 20
CPU_QUOTA, CPU_PERIOD = 150_000, 100_000
EXPECTED = {
    "container_cpu_usage_seconds_total", "container_memory_usage_bytes",
    "container_memory_working_set_bytes", "container_processes", "container_fs_usage_bytes",
    "container_spec_memory_limit_bytes", "container_spec_cpu_period",
    "container_spec_cpu_quota", "container_spec_cpu_shares", "container_start_time_seconds",
    "container_last_seen", "container_network_receive_bytes_total",
    "container_network_transmit_bytes_total", "container_network_receive_packets_total",
    "container_network_transmit_packets_total"}


def by_name(metrics: list[cri.Metric], keys: dict[str, list[str]]
            ) -> dict[str, list[dict[str, str | int]]]:
    """Each metric's labels by key (checked against its descriptor), with its value."""
    out: dict[str, list[dict[str, str | int]]] = {}
    for m in metrics:
        assert m.name in keys, m.name
        assert len(m.label_values) == len(keys[m.name]), m
        out.setdefault(m.name, []).append(
            {**dict(zip(keys[m.name], m.label_values, strict=True)), "value": m.value.value,
             "type": m.metric_type})
    return out


async def start_worker(api: Cri, image: str, tmp_path: Path) -> tuple[str, str]:
    """A pod whose container pings the pod's gateway (traffic on eth0), writes 256 KiB to
    its writable layer, then burns CPU until the pod is removed."""
    await api.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
    config = pod_config(tmp_path, "metered")
    pod_id = (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
              ).pod_sandbox_id
    ip = (await api.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(
        pod_sandbox_id=pod_id))).status.network.ip
    gateway = ip.rsplit(".", 1)[0] + ".1"  # the CNI bridge (host-local's first address)
    script = (f"busybox ping -c 3 {gateway}; dd if=/dev/zero of=/tmp/blob bs=1k count=256; "
              "while :; do :; done")
    ctr = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="worker"), image=cri.ImageSpec(image=image),
        command=["sh", "-c", script], log_path="worker.log",
        linux=cri.LinuxContainerConfig(resources=cri.LinuxContainerResources(
            memory_limit_in_bytes=MEMORY_LIMIT, cpu_quota=CPU_QUOTA, cpu_period=CPU_PERIOD)))
    cid = (await api.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod_id, sandbox_config=config, config=ctr))).container_id
    await api.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    return pod_id, cid


async def pod_metrics(api: Cri, pod_id: str) -> cri.PodSandboxMetrics:
    pods = (await api.runtime.ListPodSandboxMetrics(
        cri.ListPodSandboxMetricsRequest())).pod_metrics
    return next(p for p in pods if p.pod_sandbox_id == pod_id)


def check_network(net: dict[str, list[dict[str, str | int]]], pod_id: str) -> None:
    """The pod's own interfaces (not the node's, not loopback), on the pause `POD`."""
    interfaces = {s["interface"] for series in net.values() for s in series}
    assert interfaces == {"eth0"}, net
    labels = {"id": pod_id, "image": "", "namespace": "default", "pod": "metered",
              "container": "POD"}
    for name, series in net.items():
        assert name.startswith("container_network_"), name
        for s in series:
            assert {k: s[k] for k in labels} == labels, (name, s)
            assert s["type"] == cri.COUNTER
    for direction in ("receive", "transmit"):
        assert net[f"container_network_{direction}_bytes_total"][0]["value"] > 0
        assert net[f"container_network_{direction}_packets_total"][0]["value"] >= 3


async def test_pod_and_container_metrics(shoal: Cri, images: dict[str, str],
                                         tmp_path: Path) -> None:
    api = shoal
    bb = images["busybox"]
    pod_id, cid = await start_worker(api, bb, tmp_path)
    descriptors = (await api.runtime.ListMetricDescriptors(
        cri.ListMetricDescriptorsRequest())).descriptors
    keys = {d.name: list(d.label_keys) for d in descriptors}
    assert len(keys) == len(descriptors) and EXPECTED <= set(keys)
    assert all(d.help for d in descriptors)
    base = ["id", "image", "namespace", "pod", "container"]
    assert keys["container_cpu_usage_seconds_total"] == [*base, "cpu"]
    assert keys["container_network_receive_bytes_total"] == [*base, "interface"]
    assert keys["container_memory_working_set_bytes"] == base

    # CPU is reported in whole seconds: wait for the first one (and the pings' replies).
    end = time.monotonic() + 60
    while True:
        pod = await pod_metrics(api, pod_id)
        ctrs = {c.container_id: by_name(list(c.metrics), keys) for c in pod.container_metrics}
        net = by_name(list(pod.metrics), keys)
        cpu = ctrs.get(cid, {}).get("container_cpu_usage_seconds_total", [{"value": 0}])
        rx = net.get("container_network_receive_packets_total", [{"value": 0}])
        if (cpu[0]["value"] >= 1 and rx[0]["value"] >= 3) or time.monotonic() > end:
            break
        await asyncio.sleep(0.5)
    assert set(ctrs) == {cid}
    m = ctrs[cid]

    def one(name: str) -> dict[str, str | int]:
        assert len(m[name]) == 1, m[name]
        return m[name][0]

    labels = {"id": cid, "image": bb, "namespace": "default", "pod": "metered",
              "container": "worker"}
    for name, series in m.items():
        for s in series:
            assert {k: s[k] for k in labels} == labels, (name, s)
    assert one("container_cpu_usage_seconds_total")["cpu"] == "total"
    assert one("container_cpu_usage_seconds_total")["value"] >= 1
    assert one("container_cpu_usage_seconds_total")["type"] == cri.COUNTER
    assert one("container_memory_working_set_bytes")["value"] > 0
    assert one("container_memory_working_set_bytes")["type"] == cri.GAUGE
    assert one("container_memory_usage_bytes")["value"] >= \
        one("container_memory_working_set_bytes")["value"]
    assert one("container_processes")["value"] >= 1
    assert one("container_fs_usage_bytes")["value"] >= 256 << 10
    assert one("container_spec_memory_limit_bytes")["value"] == MEMORY_LIMIT
    assert one("container_spec_cpu_quota")["value"] == CPU_QUOTA
    assert one("container_spec_cpu_period")["value"] == CPU_PERIOD
    now = time.time()
    assert now - 120 < one("container_start_time_seconds")["value"] <= now
    assert now - 30 < one("container_last_seen")["value"] <= now + 1
    check_network(net, pod_id)

    # A stopped container has no metrics; its pod is still listed.
    await api.runtime.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=0))
    assert list((await pod_metrics(api, pod_id)).container_metrics) == []
