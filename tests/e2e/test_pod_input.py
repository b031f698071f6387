"""Hostile pod specs through the real CRI socket: each bad field is refused with
INVALID_ARGUMENT naming it before anything is made (no netns, pod, cgroup, process, mount,
directory or record is left), and the values kubelet really sends still work."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from support.shoal import RunningShoal, host_names, leftovers, pod_config, shared_node

pytestmark = pytest.mark.e2e

CGROUP_ROOT = Path("/sys/fs/cgroup")
EVIL = f"evil-{uuid.uuid4().hex[:12]}"  # a cgroup name no other test makes


running = shared_node("pod-input")


def _dns(**kw: list[str]) -> Callable[[cri.PodSandboxConfig], None]:
    return lambda c: c.dns_config.CopyFrom(cri.DNSConfig(**kw))


def _port(**kw: int | str) -> Callable[[cri.PodSandboxConfig], None]:
    return lambda c: c.port_mappings.append(cri.PortMapping(**kw))


def _set(field: str, value: str) -> Callable[[cri.PodSandboxConfig], None]:
    def apply(c: cri.PodSandboxConfig) -> None:
        target = c.linux if field == "cgroup_parent" else c
        setattr(target, field, value)
    return apply


def _sysctls(host_network: bool = False, **values: str) -> Callable[[cri.PodSandboxConfig], None]:
    def apply(c: cri.PodSandboxConfig) -> None:
        c.linux.sysctls.update({k.replace("__", "."): v for k, v in values.items()})
        if host_network:
            c.linux.security_context.namespace_options.network = cri.NODE
    return apply


# (the field the refusal must name, how to break the config)
BAD: list[tuple[str, Callable[[cri.PodSandboxConfig], None]]] = [
    ("PodSandboxConfig.hostname", _set("hostname", "web\n10.0.0.1 evil")),
    ("PodSandboxConfig.hostname", _set("hostname", "\x1b]0;owned\x07web")),
    ("PodSandboxConfig.hostname", _set("hostname", "a" * 64)),
    ("PodSandboxConfig.hostname", _set("hostname", "web_1")),
    ("dns_config.servers[0]", _dns(servers=["10.96.0.10\nnameserver 6.6.6.6"])),
    ("dns_config.servers[1]", _dns(servers=["10.96.0.10", "dns.example.com"])),
    ("dns_config.servers", _dns(servers=["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"])),
    ("dns_config.searches[0]", _dns(searches=["svc\nnameserver 6.6.6.6"])),
    ("dns_config.searches[0]", _dns(searches=["a b"])),
    ("dns_config.searches", _dns(searches=[f"s{i}.example" for i in range(33)])),
    ("dns_config.options[0]", _dns(options=["ndots:5\nnameserver 6.6.6.6"])),
    ("port_mappings[0].host_port", _port(container_port=80, host_port=65536)),
    ("port_mappings[0].host_port", _port(container_port=80, host_port=-1)),
    ("port_mappings[0].container_port", _port(container_port=70000)),
    ("port_mappings[0].container_port", _port(container_port=0, host_port=18099)),
    ("port_mappings[0].protocol", _port(container_port=80, host_port=18099, protocol=7)),
    ("port_mappings[0].host_ip", _port(container_port=80, host_port=18099,
                                       host_ip="0.0.0.0 -j ACCEPT")),
    ("linux.cgroup_parent", _set("cgroup_parent", f"../../../../{EVIL}")),
    ("linux.cgroup_parent", _set("cgroup_parent", f"/kubepods/../../{EVIL}")),
    ("linux.cgroup_parent", _set("cgroup_parent", f"/{EVIL}")),
    ("linux.cgroup_parent", _set("cgroup_parent", f"{EVIL}.slice")),
    ("linux.sysctls['kernel.hostname']", _sysctls(kernel__hostname="evil")),
    ("linux.sysctls['vm.swappiness']", _sysctls(vm__swappiness="1")),
    ("linux.sysctls['net.core.somaxconn']", _sysctls(True, net__core__somaxconn="1")),
    ("linux.sysctls['net.ipv4.ip_forward']", _sysctls(net__ipv4__ip_forward="1\n0")),
]


def cgroups_named(name: str) -> list[Path]:
    return [Path(d) / n for d, dirs, _ in os.walk(CGROUP_ROOT) for n in dirs if name in n]


@pytest.mark.parametrize(("field", "breaks"), BAD, ids=[f"{i}-{f}" for i, (f, _) in
                                                         enumerate(BAD)])
async def test_a_hostile_pod_field_is_refused_naming_it_and_nothing_is_made(
        running: RunningShoal, tmp_path: Path, field: str,
        breaks: Callable[[cri.PodSandboxConfig], None]) -> None:
    before = host_names()
    config = pod_config(tmp_path, "hostile")
    breaks(config)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running.api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert field in (err.value.details() or ""), err.value.details()
    assert (await running.api.runtime.ListPodSandbox(cri.ListPodSandboxRequest())).items == []
    assert leftovers(running.services, running.services.subnet_prefix, before) == []
    assert cgroups_named(EVIL) == []
    sandboxes = running.services.node.run_root / "executor" / "sandboxes"
    assert not sandboxes.exists() or list(sandboxes.iterdir()) == []


def _cgroup_dirs(relative: str) -> list[Path]:
    """The pod's cgroup in each hierarchy (v1: one per controller; v2: one)."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT / relative]
    return [CGROUP_ROOT / c / relative for c in ("memory", "pids", "cpu")]


async def _exec(running: RunningShoal, cid: str, script: str) -> str:
    reply = await running.api.runtime.ExecSync(cri.ExecSyncRequest(
        container_id=cid, cmd=["sh", "-c", script], timeout=10))
    assert reply.exit_code == 0, reply
    return reply.stdout.decode()


async def test_what_kubelet_sends_still_works(running: RunningShoal, images: dict[str, str],
                                              tmp_path: Path) -> None:
    api = running.api
    await api.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=images["busybox"])))
    config = pod_config(tmp_path, "kubelet-style")
    parent = f"/kubepods/burstable/pod{config.metadata.uid}"
    config.linux.cgroup_parent = parent
    config.linux.sysctls.update({"net.ipv4.ip_unprivileged_port_start": "0",
                                 "kernel.shm_rmid_forced": "1"})
    config.dns_config.CopyFrom(cri.DNSConfig(
        servers=["10.96.0.10"], options=["ndots:5"],
        searches=["default.svc.cluster.local", "svc.cluster.local", "cluster.local"]))
    config.port_mappings.append(cri.PortMapping(container_port=80, host_port=0))
    pod_id = (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
              ).pod_sandbox_id
    try:
        assert all(d.is_dir() for d in _cgroup_dirs(f"{parent.lstrip('/')}/{pod_id}"))
        cid = (await api.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, sandbox_config=config, config=cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name="main"),
                image=cri.ImageSpec(image=images["busybox"]), command=["sleep", "3600"],
                linux=cri.LinuxContainerConfig(security_context=cri.
                                               LinuxContainerSecurityContext(
                                                   run_as_user=cri.Int64Value(value=1000))))
        ))).container_id
        await api.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
        assert await _exec(running, cid, "cat /proc/sys/net/ipv4/ip_unprivileged_port_start "
                           "/proc/sys/kernel/shm_rmid_forced") == "0\n1\n"
        # A non-root user reads the pod's files.
        assert await _exec(running, cid, "cat /etc/resolv.conf") == (
            "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local "
            "cluster.local\noptions ndots:5\n")
        assert await _exec(running, cid, "cat /etc/hostname") == "kubelet-style\n"
        pod_dir = running.services.node.run_root / "executor" / "sandboxes" / pod_id
        assert stat.S_IMODE(pod_dir.stat().st_mode) == 0o711
        for name in ("hostname", "resolv.conf", "hosts"):
            assert stat.S_IMODE((pod_dir / name).stat().st_mode) == 0o644, name
    finally:
        await api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        await api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
        for d in _cgroup_dirs(parent.lstrip("/")):  # kubelet removes the pod's own cgroup
            if d.is_dir():
                d.rmdir()
