"""A node whose one service is killed at named steps, for crash-boundary tests.

Every step is armed `kill` when the service starts, and each is disarmed by its marker file
(shoal_common.faults fires a kill only while its marker is missing, and writes it as it
kills): removing one marker arms exactly that step, once, without restarting anything. A
watcher restarts the service whenever it dies, as `shoal up` or systemd would."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from support.processes import Node, ServiceProcess, ServiceSet
from support.shoal import Cri, host_names, leftovers, remove_all_pods, start_shoal

T = TypeVar("T")
LEASES = Path("/var/lib/cni/networks/shoal")  # host-local's, of Shoal's default network
# Reconnect at once to a restarted gateway (gRPC's default backoff grows to minutes).
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 500)]
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def kubelet_retry(call: Callable[[float], Awaitable[T]], per_call: float = 10.0,
                        budget: float = 60.0) -> T:
    """What kubelet does: a call that fails UNAVAILABLE or DEADLINE_EXCEEDED (each attempt
    given `per_call` seconds) is made again, for up to `budget` seconds."""
    end = time.monotonic() + budget
    while True:
        try:
            return await call(per_call)
        except grpc.aio.AioRpcError as err:
            if err.code() not in RETRIED or time.monotonic() > end:
                raise
        await asyncio.sleep(0.3)


@dataclass
class KillNode:
    """A started node; `service` is the one killed, at the steps given to `start`."""

    services: ServiceSet
    service: str
    steps: list[str]
    markers: Path
    before: set[str] = field(default_factory=set)
    restarts: int = 0
    proc: ServiceProcess | None = None
    api: Cri | None = None
    # Held while a scenario has calls in flight that a kill must not interrupt.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _channel: grpc.aio.Channel | None = None
    _watcher: asyncio.Task[None] | None = None

    @classmethod
    def at(cls, nats_url: str, root: Path, node_id: str, service: str,
           steps: list[str]) -> KillNode:
        return cls(ServiceSet(Node(node_id, nats_url, root)), service, steps, root / "faults")

    @property
    def env(self) -> dict[str, str]:
        return {"SHOAL_FAULTS": ",".join(f"{s}=kill" for s in self.steps),
                "SHOAL_FAULTS_DIR": str(self.markers)}

    async def start(self, images: dict[str, str]) -> None:
        self.markers.mkdir(parents=True, exist_ok=True)
        for step in self.steps:
            (self.markers / f"fault-{step}").touch()  # disarmed
        self.before = host_names()
        procs = await start_shoal(self.services, images, env={self.service: self.env})
        self.proc = procs[self.service]
        self._channel = grpc.aio.insecure_channel(f"unix://{self.services.node.cri_socket}",
                                                  options=CHANNEL_OPTIONS)
        self.api = Cri(self._channel)
        self._watcher = asyncio.create_task(self._restart_when_dead())

    async def close(self) -> None:
        if self.api is not None:
            try:  # what a failed scenario left: conmon and the pods outlive the services
                await asyncio.wait_for(remove_all_pods(self.api), 60)
            except (grpc.aio.AioRpcError, TimeoutError):
                pass
        if self._watcher is not None:
            self._watcher.cancel()  # before the services stop: they must stay stopped
        if self._channel is not None:
            await self._channel.close()
        await asyncio.to_thread(self.services.stop_all)

    async def _restart_when_dead(self) -> None:
        while True:
            assert self.proc is not None
            await asyncio.to_thread(self.proc.proc.wait)
            self.proc = self.services.start(self.service, extra=self.services.extra,
                                            env=self.env)
            await asyncio.to_thread(self.services.wait_serving, self.proc)
            self.restarts += 1

    def arm(self, step: str) -> int:
        """Arm `step` to kill once; returns the restart count to wait past."""
        assert step in self.steps, step
        (self.markers / f"fault-{step}").unlink()
        return self.restarts

    async def restarted(self, since: int, step: str, timeout: float = 40.0) -> None:
        """Until the service, killed after `since` restarts, serves again."""
        end = time.monotonic() + timeout
        while self.restarts <= since:
            if time.monotonic() > end:
                fired = (self.markers / f"fault-{step}").exists()
                raise AssertionError(f"{self.service} not killed at {step} (reached: {fired})"
                                     if not fired else f"{self.service} not back after {step}")
            await asyncio.sleep(0.05)

    def leftovers(self) -> list[str]:
        """leftovers(), its IP leases only those this node's pods hold: test runs beside
        this one number their nodes' subnets from the same start."""
        logs = " ".join(p.read_text(errors="replace")
                        for p in (self.services.node.root / "logs").glob("*.log"))
        ids = set(re.findall(r"[0-9a-f]{64}", logs))
        return [f for f in leftovers(self.services, self.services.subnet_prefix, self.before)
                if not f.startswith("ip lease ") or _holder(f.removeprefix("ip lease ")) in ids]

    def leftovers_of(self, ids: Iterable[str]) -> list[str]:
        """leftovers() naming one of `ids` (a netns by its first 32 characters), and IP
        leases held by one: other pods may be on the node meanwhile."""
        ids = {i for i in ids if i}
        marks = ids | {i[:32] for i in ids}
        found = [f for f in self.leftovers() if any(m in f for m in marks)]
        for lease in LEASES.glob(f"{self.services.subnet_prefix}*"):
            if (holder := _holder(lease.name)) in ids:
                found.append(f"ip lease {lease.name} of {holder}")
        return found


def _holder(ip: str) -> str:
    """The container id a host-local lease file (`<id>\\r\\n<ifname>`) names."""
    try:
        return (LEASES / ip).read_text(errors="replace").split()[0]
    except (OSError, IndexError):
        return ""  # released meanwhile


def pod_name(step: str) -> str:
    """A pod name (and hostname) for a scenario: RFC 1123, from the step's name."""
    return "k-" + step.replace(".", "-").replace("_", "-")[:60]
