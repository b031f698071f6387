"""A whole Shoal node for end-to-end tests: test images in the registry, the five services
started with their own pod subnet and bridge, and a CRI client of the node's socket."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc

from support.images import busybox_image, pause_image, push
from support.processes import Node, ServiceProcess, ServiceSet, pids_mentioning
from support.registry import Registry

# Each start gets 10.<n>.0.0/24 on bridge shoalt<n>, so nodes never share a network.
_subnets = itertools.count(40)


class Cri:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.runtime = cri_grpc.RuntimeServiceStub(channel)
        self.images = cri_grpc.ImageServiceStub(channel)


@contextlib.asynccontextmanager
async def cri_client(services: ServiceSet) -> AsyncIterator[Cri]:
    """A CRI client of the node's socket, for as long as the block runs."""
    async with grpc.aio.insecure_channel(f"unix://{services.node.cri_socket}") as channel:
        yield Cri(channel)


@pytest.fixture(scope="module", name="images")
def images_fixture(registry: Registry) -> dict[str, str]:
    """The `images` fixture (tests/e2e's conftest has it; elsewhere import it into a test
    module): pause and busybox, pushed."""
    push(registry.url, "pods/pause", "1", pause_image())
    push(registry.url, "pods/busybox", "1", busybox_image())
    return {"pause": f"{registry.host}/pods/pause:1", "busybox": f"{registry.host}/pods/busybox:1"}


async def start_shoal(services: ServiceSet, images: dict[str, str],
                      env: dict[str, dict[str, str]] | None = None
                      ) -> dict[str, ServiceProcess]:
    """`env`: more environment per service (e.g. {"executor": {"SHOAL_FAULTS": ...}}).
    The node's bridge and masquerade chain go when `services` is stopped (stop_all)."""
    n = next(_subnets)
    services.subnet_prefix = f"10.{n}."
    # Set before anything starts: stop_all deletes them even if the start fails.
    services.pod_subnet, services.bridge = f"10.{n}.0.0/24", f"shoalt{n}"
    common = ["--set", f'cri.sandbox_image="{images["pause"]}"',
              "--set", f'services.executor.pod_subnet="{services.pod_subnet}"',
              "--set", f'services.executor.cni_bridge="{services.bridge}"']
    services.extra = common
    procs = {name: services.start(name, extra=common, env=(env or {}).get(name)) for name in (
        "puller", "snapshotter", "executor", "supervisor", "cri-gateway")}
    for sp in procs.values():
        await asyncio.to_thread(services.wait_serving, sp)
    return procs


async def remove_all_pods(api: Cri, namespaces: Sequence[str] = ()) -> None:
    """Leave nothing behind: pods (and their containers), netns, mounts; of the default
    namespace (k8s.io), or of each of `namespaces`."""
    for md in [(("shoal-namespace", ns),) for ns in namespaces] or [None]:
        pods = await api.runtime.ListPodSandbox(cri.ListPodSandboxRequest(), metadata=md)
        for pod in pods.items:
            await api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id),
                                             metadata=md)
            await api.runtime.RemovePodSandbox(
                cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id), metadata=md)



async def start_main(api: Cri, pod_id: str, config: cri.PodSandboxConfig, image: str,
                     command: list[str]) -> str:
    """A container "main" of `image` running `command` in the pod, logging to main.log in
    the pod's log directory, started: its id."""
    cid = (await api.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod_id, sandbox_config=config, config=cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="main"), image=cri.ImageSpec(image=image),
            command=command, log_path="main.log")))).container_id
    await api.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    return cid


async def exited(api: Cri, container_id: str, timeout: float = 30) -> cri.ContainerStatus:
    """The container's status once it has exited, or as it is after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        status = (await api.runtime.ContainerStatus(cri.ContainerStatusRequest(
            container_id=container_id))).status
        if status.state == cri.CONTAINER_EXITED or time.monotonic() > end:
            return status
        await asyncio.sleep(0.1)


@dataclass
class RunningShoal:
    """A started node: its CRI client and its service processes."""

    api: Cri
    services: ServiceSet
    procs: dict[str, ServiceProcess]


@contextlib.asynccontextmanager
async def running_node(nats_url: str, root: Path, node_id: str, images: dict[str, str],
                       namespaces: Sequence[str] = ()) -> AsyncIterator[RunningShoal]:
    """A node of its own under `root` (one a module's tests can share, e.g. from a
    module-scoped fixture): started with start_shoal; at the end every pod (of
    `namespaces`, see remove_all_pods) is removed and the services are stopped."""
    services = ServiceSet(Node(node_id, nats_url, root))
    try:
        procs = await start_shoal(services, images)
        async with cri_client(services) as api:
            node = RunningShoal(api, services, procs)
            yield node
            await remove_all_pods(node.api, namespaces)
    finally:
        services.stop_all()


def pod_config(tmp: Path, name: str, **kw: Any) -> cri.PodSandboxConfig:
    """A pod named `name` (a fresh uid) logging under `tmp`; `kw`: more config fields."""
    logs = tmp / f"logs-{name}"
    logs.mkdir(exist_ok=True)
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex, namespace="default"),
        hostname=name, log_directory=str(logs), **kw)


def shared_node(name: str) -> Any:
    """A module-scoped `running` fixture, one node for all of a module's tests (each must
    leave it as it found it): `running = shared_node("input")` in the module."""

    @pytest.fixture(scope="module", name="running")
    async def running(nats_url: str, tmp_path_factory: pytest.TempPathFactory,
                      images: dict[str, str]) -> AsyncIterator[RunningShoal]:
        async with running_node(nats_url, tmp_path_factory.mktemp("node"),
                                f"t{os.getpid()}-{name}", images) as node:
            yield node

    return running


def host_names() -> set[str]:
    """Network namespaces and the pods' cgroups (default parent /shoal) on the host now."""
    netns_dir = Path("/var/run/netns")
    names = {f"netns {p.name}" for p in netns_dir.iterdir()} if netns_dir.exists() else set()
    for ctrl in ("memory", "pids", "cpu"):
        # os.walk, not glob: another node's cgroups may vanish while they are listed.
        base = f"/sys/fs/cgroup/{ctrl}/shoal"
        names |= {f"cgroup {d}" for d, _, _ in os.walk(base) if d != base}
    return names


def leftovers(services: ServiceSet, subnet_prefix: str, before: set[str]) -> list[str]:
    """Everything a node's pods may leave on the host that is still there: runtime
    processes (conmon, runc, the containers), mounts, network namespaces and cgroups new
    since `before` (host_names()), IP leases, bundles, pod directories, executor and
    supervisor records."""
    node = services.node
    # Every id a service handles is in its log (see leftovers_at).
    logs = " ".join(p.read_text(errors="replace") for p in (node.root / "logs").glob("*.log"))
    return leftovers_at(node, logs, {sp.proc.pid for sp in services}, subnet_prefix, before)


def leftovers_at(node: Node, logs: str, ours: set[int], subnet_prefix: str,
                 before: set[str]) -> list[str]:
    """leftovers() of a node whatever started it (e.g. `shoal up`, whose children all log
    to its stderr): `logs` is the text of its services' logs, `ours` the pids that may
    still name its root (its services, the caller's own ancestors)."""
    # Only this node's: other tests may run beside it. Every id a service handles is in its
    # log (a 64-hex pod or container id; a netns is named by its first 32 characters).
    ids = set(re.findall(r"[0-9a-f]{64}", logs))
    found: list[str] = sorted(
        name for name in host_names() - before
        if name.rsplit("/", 1)[-1] in ids
        or name.removeprefix("netns shoal-") in {i[:32] for i in ids})
    for pid in pids_mentioning(str(node.root)):
        if pid not in ours:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue  # gone meanwhile
            found.append(f"process {pid}: " + cmdline.replace(b"\0", b" ")
                         .decode(errors="replace")[:200])
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point.startswith(str(node.root)):
            found.append(f"mount {point}")
    ipam = Path("/var/lib/cni/networks/shoal")
    if ipam.exists():
        found += [f"ip lease {f.name}" for f in ipam.iterdir()
                  if f.name.startswith(subnet_prefix)]
    for d in ("executor/bundles", "executor/sandboxes"):
        path = node.run_root / d
        if path.exists():
            found += [f"{d}/{p.name}" for p in path.iterdir()]
    for db, tables in (("executor/executor.db", ("sandboxes", "containers")),
                       ("supervisor/tasks.db", ("tasks",))):
        path = node.state_root / db
        if path.exists():
            with sqlite3.connect(path) as conn:
                for table in tables:
                    found += [f"{db} {table} {row[0]}" for row in
                              conn.execute(f"SELECT id FROM {table}")]
    return found
