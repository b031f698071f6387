"""The nodes tests/support/chaos.py churns: `shoal up` (ShoalUp), or any runtime behind a
CRI socket that offers ChaosNode (bench/_containerd_churn.py has containerd's); and what
every run needs around one: waiting for RuntimeReady, removing every pod, scrubbing leaks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc
from shoal_common.fs import Under

from support.ports import free_port
from support.processes import (
    EVERY_SERVICE_AT_START,
    SERVICE_MODULES,
    Node,
    metrics_sets,
    pids_mentioning,
    shoal_up_argv,
)
from support.shoal import leftovers_at

NATS = "nats"  # the embedded nats-server, as a kill target
SERVICES = tuple(SERVICE_MODULES)


# --------------------------------------------------------------------------- shoal up


Spawn = Callable[[list[str], Path], "subprocess.Popen[bytes]"]


def subnet_prefix(subnet: str) -> str:
    """What the addresses (and IPAM lease files) of a /24 start with: "10.220.1."."""
    return ".".join(subnet.split(".")[:3]) + "."


def popen(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)


class ChaosNode(Protocol):
    """What run_chaos drives: ShoalUp, or another runtime behind a CRI socket (bench/ has
    containerd's), with `pids_of` naming what a kill target is now."""

    root: Path
    images: dict[str, str]

    @property
    def name(self) -> str: ...
    @property
    def cri_socket(self) -> Path: ...
    async def start(self, spawn: Spawn = popen, timeout: float = 90) -> None: ...
    def pids_of(self, target: str) -> list[int]: ...
    def restarts(self) -> int: ...
    async def stop(self, timeout: float = 90) -> int | None: ...
    def leftovers(self, before: set[str], ours: set[int]) -> list[str]:
        """What is left on the host once it stopped (`before`: host_names() before it
        started; `ours`: pids that may name its root and are not its own)."""
    def scrub(self, leaks: Sequence[str], ours: set[int]) -> None:
        """Undo what leftovers() reported, so that the next run or test does not see it."""


@dataclass
class ShoalUp:
    """One `shoal up` under `root` (embedded secured NATS on a free port, every metrics
    port free), running pods from `images` on its own subnet and bridge. Everything it
    and its children log goes to `log_path`."""

    root: Path
    node_id: str
    images: dict[str, str]
    subnet: str  # e.g. "10.220.1.0/24"
    bridge: str
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.port = free_port()
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def node(self) -> Node:
        return Node(self.node_id, f"nats://127.0.0.1:{self.port}", self.root)

    name = "shoal up"  # not a field: what reports call this runtime

    @property
    def cri_socket(self) -> Path:
        return self.node.cri_socket

    log_path = Under("root", "shoal-up.log")

    @property
    def subnet_prefix(self) -> str:
        return subnet_prefix(self.subnet)

    def argv(self) -> list[str]:
        sets = [f"nats.embedded.listen=127.0.0.1:{self.port}", "log.format=json",
                *metrics_sets(), EVERY_SERVICE_AT_START,
                f'cri.sandbox_image="{self.images["pause"]}"',
                f'services.executor.pod_subnet="{self.subnet}"',
                f'services.executor.cni_bridge="{self.bridge}"', *self.extra]
        return shoal_up_argv(self.root, self.node_id, sets)

    async def start(self, spawn: Spawn = popen, timeout: float = 90) -> None:
        """Start it (`spawn`: how; from the main thread if it sets PR_SET_PDEATHSIG) and
        wait until every replica answered health and CRI Status says RuntimeReady."""
        self.proc = spawn(self.argv(), self.log_path)
        targets = self.node.run_root / "prometheus-targets.json"
        end = time.monotonic() + timeout
        while not targets.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"shoal up exited {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > end:
                raise RuntimeError(f"shoal up not ready in {timeout:g} s:\n{self.tail()}")
            await asyncio.sleep(0.1)
        await until_runtime_ready(self.node.cri_socket, timeout)

    def tail(self, size: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-size:]

    def pids_of(self, target: str) -> list[int]:
        if target == NATS:
            return pids_mentioning(str(self.node.run_root / "nats" / "nats-server.conf"))
        return pids_mentioning(f"-m {SERVICE_MODULES[target]} --node-id {self.node_id} ")

    def restarts(self) -> int:
        return self.log_path.read_text(errors="replace").count('"child exited; restarting"')

    async def stop(self, timeout: float = 90) -> int | None:
        """SIGINT, as Ctrl-C: its exit code, or None if it had to be killed. The pods'
        bridge is deleted after."""
        code: int | None = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
            try:
                code = await asyncio.to_thread(self.proc.wait, timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, check=False)
        return code

    def leftovers(self, before: set[str], ours: set[int]) -> list[str]:
        return leftovers_at(self.node, self.log_path.read_text(errors="replace"), ours,
                            self.subnet_prefix, before)

    def scrub(self, leaks: Sequence[str], ours: set[int]) -> None:
        scrub(leaks, set(pids_mentioning(str(self.root))) - ours)


async def until_runtime_ready(sock: Path, limit: float) -> None:
    """Until CRI Status answers RuntimeReady (a fresh channel each time: a kept one would
    wait out gRPC's reconnect backoff)."""
    end = time.monotonic() + limit
    while True:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
                status = await cri_grpc.RuntimeServiceStub(channel).Status(
                    cri.StatusRequest(), timeout=2)
            if all(c.status for c in status.status.conditions if c.type == "RuntimeReady"):
                return
        if time.monotonic() > end:
            raise RuntimeError(f"CRI not RuntimeReady within {limit:g} s")
        await asyncio.sleep(0.2)


def scrub(leaks: Sequence[str], pids: set[int]) -> None:
    """Undo what a run leaked (and reported), so that it is not left on the host for the
    next run or test: kill `pids` (which name the run's root) and the processes in leaked
    cgroups, then unmount, delete network namespaces, cgroups and IP leases."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for leak in leaks:
        kind, _, what = leak.partition(" ")
        if kind == "cgroup":
            with contextlib.suppress(OSError, ValueError):
                for pid in Path(what, "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
    time.sleep(0.2)  # the killed leave their cgroups
    for leak in leaks:
        kind, _, what = leak.partition(" ")
        if kind == "mount":
            subprocess.run(["umount", "-l", what], capture_output=True, check=False)
        elif kind == "netns":
            subprocess.run(["ip", "netns", "delete", what], capture_output=True, check=False)
        elif kind == "cgroup":
            with contextlib.suppress(OSError):
                os.rmdir(what)
        elif leak.startswith("ip lease "):
            Path("/var/lib/cni/networks/shoal", leak.removeprefix("ip lease ")).unlink(
                missing_ok=True)


async def remove_every_pod(sock: Path) -> None:
    """Best effort: every pod the CRI lists, stopped and removed (one that fails is left
    for the leftovers check to name)."""
    async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
        rt = cri_grpc.RuntimeServiceStub(channel)
        try:
            pods = (await rt.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=20)).items
        except grpc.aio.AioRpcError:
            return
        for pod in pods:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id),
                                        timeout=60)
                await rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id),
                                          timeout=60)
