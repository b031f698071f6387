"""Killing any one part of `shoal up` loses nothing and leaves the runtime reachable: a
service killed after running healthy is restarted at once however often it happens, a
crash loop still backs off, a killed nats-server comes back on the same address and store
(services reconnect by themselves), and a killed launcher is replaced by a new one on the
same roots with the containers still running.

The times measured are printed (`pytest -s`) and bounded loosely; see the launcher's
supervision module for the policy."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc
from shoal_cli.runstate import RunState
from shoal_cli.supervision import HEALTHY_AFTER, RestartPolicy
from shoal_common import nats_auth
from shoal_common.bus import Bus
from shoal_common.catalog import SERVICES
from shoal_common.clients import CLIENTS
from shoal_common.config import load_config
from shoal_common.messages import HealthReply
from support.ports import free_port
from support.processes import (
    EVERY_SERVICE_AT_START,
    SHOAL,
    metrics_sets,
    pids_mentioning,
    shoal_up_argv,
)
from support.shoal import images_fixture  # noqa: F401

pytestmark = pytest.mark.e2e

# Each pod-running test gets its own pod subnet and bridge (apart from support.shoal's).
_networks = itertools.count(1)


class Up:
    """One `shoal up` on `root`, with a bus client of its node and its CRI socket."""

    def __init__(self, root: Path, node: str, sets: list[str]) -> None:
        self.root, self.node = root, node
        self.port = free_port()
        self.sets = [f"nats.embedded.listen=127.0.0.1:{self.port}", "log.format=json",
                     *metrics_sets(), EVERY_SERVICE_AT_START, *sets]
        self.socket = root / "run" / "cri.sock"
        self.err = root / "up.err"
        self.proc: subprocess.Popen[bytes] | None = None
        self.bus: Bus | None = None
        self.bridge = ""  # the pods' bridge, if pods run: deleted once they are gone

    def start(self) -> subprocess.Popen[bytes]:
        """Start `shoal up`; its stderr (every child's log too) goes on in up.err."""
        self.out = self.root / f"up-{time.monotonic_ns()}.out"
        with open(self.out, "wb") as out, open(self.err, "ab") as err:
            self.proc = subprocess.Popen(shoal_up_argv(self.root, self.node, self.sets),
                                         stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        return self.proc

    async def ready(self, timeout: float = 60) -> None:
        assert self.proc is not None
        end = time.monotonic() + timeout
        while "Press Ctrl-C" not in self.out.read_text():
            assert self.proc.poll() is None, self.log()[-3000:]
            assert time.monotonic() < end, "shoal up not ready:\n" + self.log()[-3000:]
            await asyncio.sleep(0.1)
        if self.bus is None:
            cfg = load_config(env={}, flags={
                "node_id": self.node, "nats.url": f"nats://127.0.0.1:{self.port}",
                "state_root": str(self.root / "state"), "run_root": str(self.root / "run")})
            auth = self.root / "state" / "nats" / "auth"
            cfg.nats.user = nats_auth.ADMIN
            cfg.nats.password_file = str(nats_auth.password_file(auth, nats_auth.ADMIN))
            self.bus = Bus(cfg, service="test", replica="test")
            await self.bus.connect(wait=10)

    def log(self) -> str:
        return self.err.read_text(errors="replace")

    async def health(self) -> dict[str, HealthReply]:
        """replica id -> its health answer, of every replica that answers within 0.3 s."""
        assert self.bus is not None
        answers = await asyncio.gather(*(CLIENTS[s.subject](self.bus).health_of_all(wait=0.3)
                                         for s in SERVICES), return_exceptions=True)
        return {r.replica: r for replies in answers if isinstance(replies, list)
                for r in replies}

    def cli_status(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SHOAL, "status", "--node-id", self.node, "--state-root", str(self.root / "state"),
             "--run-root", str(self.root / "run"), "--nats-url",
             f"nats://127.0.0.1:{self.port}", "--wait", "0.3"],
            capture_output=True, text=True, timeout=30)

    async def stop(self) -> list[int]:
        """Remove every pod, stop `shoal up` as Ctrl-C does; kill and return the pids of
        any process left behind."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                await remove_all_pods(self.socket)
            finally:
                self.proc.send_signal(signal.SIGINT)
                await asyncio.to_thread(self.proc.wait, 60)
        if self.bus is not None:
            await self.bus.close()
        if self.bridge:
            subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True,
                           check=False)
        left = pids_mentioning(str(self.root))
        for pid in left:
            subprocess.run(["kill", "-9", str(pid)], check=False)
        return left


@pytest.fixture
async def up(tmp_path: Path) -> AsyncIterator[Up]:
    node = Up(tmp_path, f"r{uuid.uuid4().hex[:8]}", [])
    try:
        yield node
    finally:
        left = await node.stop()
    assert left == [], "processes left behind"


async def cri_status(sock: Path, timeout: float = 1.0) -> cri.StatusResponse:
    """A fresh channel per call: a kept one would retry on gRPC's own reconnect backoff."""
    async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
        return await cri_grpc.RuntimeServiceStub(channel).Status(cri.StatusRequest(),
                                                                 timeout=timeout)


async def until_runtime_ready(sock: Path, limit: float) -> float:
    """Seconds until CRI Status answers RuntimeReady on `sock` (fails after `limit`)."""
    start = time.monotonic()
    while True:
        try:
            status = await cri_status(sock)
            if all(c.status for c in status.status.conditions if c.type == "RuntimeReady"):
                return time.monotonic() - start
        except grpc.aio.AioRpcError:
            pass
        assert time.monotonic() - start < limit, f"CRI not ready within {limit} s"
        await asyncio.sleep(0.05)


async def until_all_healthy(up: Up, old: dict[str, int], limit: float) -> float:
    """Seconds until every replica answers health, those named in `old` with a new pid."""
    start = time.monotonic()
    while True:
        health = await up.health()
        expected = {f"{s.name}-0" for s in SERVICES}
        if expected <= health.keys() and all(health[r].pid != p for r, p in old.items()):
            return time.monotonic() - start
        assert time.monotonic() - start < limit, f"not all healthy within {limit} s: {health}"
        await asyncio.sleep(0.05)


async def until_respawned(up: Up, module: str, old: int, limit: float) -> float:
    """Seconds until the launcher has started a new `python -m <module>` in place of `old`."""
    start = time.monotonic()
    while True:
        if set(pids_mentioning(f"-m {module} --node-id {up.node} ")) - {old}:
            return time.monotonic() - start
        assert time.monotonic() - start < limit, f"{module} not restarted within {limit} s"
        await asyncio.sleep(0.01)


def restart_log(up: Up, child: str) -> list[float]:
    """backoff_s of each `child exited; restarting` the launcher logged for `child`."""
    return [float(m) for m in re.findall(
        rf'"child": "{re.escape(child)}".*?"backoff_s": ([\d.]+).*?"child exited; restarting"',
        up.log())]


def kill9(pid: int) -> None:
    subprocess.run(["kill", "-9", str(pid)], check=True)


# -- the policy ---------------------------------------------------------------------------

def test_policy_restarts_after_a_healthy_run_at_once_and_backs_off_a_crash_loop() -> None:
    policy = RestartPolicy(initial=0.5, maximum=30.0)
    assert [policy.delay(HEALTHY_AFTER + 1) for _ in range(10)] == [0.0] * 10  # killed
    assert not policy.crash_looping
    # Dying before it answers health (however long its start took), or right after.
    loop = [policy.delay(None if i % 2 else 0.5) for i in range(9)]
    assert loop == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert policy.crash_looping
    assert policy.delay(HEALTHY_AFTER) == 0.0  # it served long enough: the loop is over
    assert not policy.crash_looping
    assert [policy.delay(None) for _ in range(3)] == [0.0, 0.5, 1.0]


async def test_run_root_is_held_and_leftovers_of_a_killed_launcher_are_waited_for(
        tmp_path: Path) -> None:
    held = RunState(str(tmp_path))
    held.lock()
    with pytest.raises(SystemExit, match=rf"another shoal up \(pid {os.getpid()}\)"):
        RunState(str(tmp_path)).lock()
    # Left by a launcher that was killed: one stops on SIGTERM, one ignores it.
    ignores = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    stops = subprocess.Popen(["sleep", "60"])
    stubborn = subprocess.Popen([sys.executable, "-c", ignores])
    await asyncio.sleep(0.3)  # the SIGTERM handler is in place
    held.record([stops.pid, stubborn.pid, 999_999_999])  # the last one is long gone
    held.unlock()  # the kernel does this when the launcher dies

    after = RunState(str(tmp_path))
    after.lock()
    started = time.monotonic()
    await after.wait_for_leftovers(grace=1.0)
    assert 1.0 <= time.monotonic() - started < 3.0
    assert stops.wait(1) == -signal.SIGTERM and stubborn.wait(1) == -signal.SIGKILL
    assert not after.pids_path.exists()
    after.unlock()


# -- services -----------------------------------------------------------------------------

async def test_killed_service_restarts_at_once_every_time(up: Up) -> None:
    up.start()
    await up.ready()
    respawned: list[float] = []
    took: list[float] = []
    for _ in range(3):
        # Serving for a while (the launcher sees its health within ~0.5 s), as a service
        # killed from outside has.
        await asyncio.sleep(HEALTHY_AFTER + 1)
        old = (await up.health())["cri-gateway-0"].pid
        kill9(old)
        respawned.append(await until_respawned(up, "shoal_cri_gateway", old, 2))
        took.append(respawned[-1] + await until_runtime_ready(up.socket, 10))
        await until_all_healthy(up, {"cri-gateway-0": old}, 5)
    print(f"\nSIGKILL cri-gateway -> new process {[round(t, 3) for t in respawned]} s, "
          f"CRI Status RuntimeReady {[round(t, 2) for t in took]} s")
    assert max(respawned) < 1.0, respawned  # no backoff: the rest is the gateway's start
    assert max(took) < 6.0, took
    assert restart_log(up, "cri-gateway-0") == [0.0, 0.0, 0.0]

    # Any other service: the CRI socket keeps answering; RuntimeReady is back once the
    # service is (each one's own start time).
    for svc in ("puller", "snapshotter", "executor", "supervisor"):
        old = (await up.health())[f"{svc}-0"].pid
        kill9(old)
        start = time.monotonic()
        ready = await until_runtime_ready(up.socket, 10)
        await until_all_healthy(up, {f"{svc}-0": old}, 10)
        healthy = time.monotonic() - start
        print(f"SIGKILL {svc} -> RuntimeReady {ready:.2f} s, all healthy {healthy:.2f} s")
        assert healthy < 8.0
        assert restart_log(up, f"{svc}-0") == [0.0]


async def test_crash_loop_backs_off_and_fails_start(tmp_path: Path) -> None:
    # The puller's metrics port is taken: it exits at once every time it starts.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up = Up(tmp_path, "crashnode", ["launcher.restart_backoff_initial=0.2",
                                        f"services.puller.metrics_addr=127.0.0.1:{port}"])
        proc = up.start()
        try:
            code = await asyncio.to_thread(proc.wait, 60)
        finally:
            left = await up.stop()
    assert left == []
    assert code == 1
    assert "children keep exiting: puller-0" in up.log()
    # First quick death restarted at once, then the wait doubles (the launcher gives up
    # starting within a second of the third; a fourth may have come meanwhile).
    assert restart_log(up, "puller-0")[:3] == [0.0, 0.2, 0.4]


# -- NATS and the launcher itself ---------------------------------------------------------

async def remove_all_pods(sock: Path) -> None:
    async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
        runtime = cri_grpc.RuntimeServiceStub(channel)
        for pod in (await runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=20)).items:
            await runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id))
            await runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id))


async def run_pod(sock: Path, images: dict[str, str], logs: Path, name: str) -> str:
    """A pod with a busybox `sleep` container started in it; the container's id."""
    async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
        runtime = cri_grpc.RuntimeServiceStub(channel)
        await cri_grpc.ImageServiceStub(channel).PullImage(
            cri.PullImageRequest(image=cri.ImageSpec(image=images["busybox"])), timeout=60)
        logs.mkdir(exist_ok=True)
        config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(
            name=name, uid=uuid.uuid4().hex, namespace="default"), log_directory=str(logs))
        pod = (await runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config),
                                           timeout=30)).pod_sandbox_id
        cid = (await runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod, sandbox_config=config, config=cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name="c"),
                image=cri.ImageSpec(image=images["busybox"]), command=["sleep", "3600"])),
            timeout=30)).container_id
        await runtime.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=30)
        return cid


async def running_containers(sock: Path) -> dict[str, int]:
    """Running container id -> its process id (from verbose ContainerStatus)."""
    import json

    async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
        runtime = cri_grpc.RuntimeServiceStub(channel)
        listed = await runtime.ListContainers(cri.ListContainersRequest(filter=cri.ContainerFilter(
            state=cri.ContainerStateValue(state=cri.CONTAINER_RUNNING))), timeout=10)
        out = {}
        for c in listed.containers:
            status = await runtime.ContainerStatus(cri.ContainerStatusRequest(
                container_id=c.id, verbose=True), timeout=10)
            out[c.id] = int(json.loads(status.info.get("info", "{}")).get("pid", 0))
        return out


@pytest.fixture
def pod_network(up: Up, images: dict[str, str]) -> dict[str, str]:
    """`up` configured to run pods (the images they use)."""
    n = next(_networks)
    up.bridge = f"shoalr{n}"
    up.sets += [f'cri.sandbox_image="{images["pause"]}"',
                f'services.executor.pod_subnet="10.{230 + n}.0.0/24"',
                f'services.executor.cni_bridge="{up.bridge}"']
    return images


async def stream_messages(up: Up) -> int:
    assert up.bus is not None
    return (await up.bus.js.stream_info(up.bus.config.events.stream)).state.messages


async def test_killed_nats_server_comes_back_and_services_reconnect(
        up: Up, pod_network: dict[str, str], tmp_path: Path) -> None:
    up.start()
    await up.ready()
    cid = await run_pod(up.socket, pod_network, tmp_path / "logs", "before")
    before = await running_containers(up.socket)
    events = await stream_messages(up)
    assert cid in before and events > 0

    [nats_pid] = pids_mentioning(str(tmp_path / "run" / "nats" / "nats-server.conf"))
    kill9(nats_pid)
    start = time.monotonic()
    healthy = await until_all_healthy(up, {}, 10)
    ready = await until_runtime_ready(up.socket, 10)
    total = time.monotonic() - start
    print(f"\nSIGKILL nats-server -> all healthy {healthy:.2f} s, "
          f"CRI RuntimeReady {total:.2f} s")
    assert total < 10, (healthy, ready)
    status = up.cli_status()
    assert status.returncode == 0, status.stdout + status.stderr
    assert restart_log(up, "nats") == [0.0]
    [new_pid] = pids_mentioning(str(tmp_path / "run" / "nats" / "nats-server.conf"))
    assert new_pid != nats_pid

    # Nothing lost: the container ran on, JetStream kept its events, and pods can be made.
    assert (await running_containers(up.socket))[cid] == before[cid]
    assert await stream_messages(up) >= events
    second = await run_pod(up.socket, pod_network, tmp_path / "logs", "after")
    assert second in await running_containers(up.socket)


async def test_killed_launcher_is_replaced_on_the_same_roots(
        up: Up, pod_network: dict[str, str], tmp_path: Path) -> None:
    first = up.start()
    await up.ready()
    cid = await run_pod(up.socket, pod_network, tmp_path / "logs", "survivor")
    before = await running_containers(up.socket)
    events = await stream_messages(up)

    # A second launcher on the same run root is refused while the first one runs.
    second = subprocess.run(shoal_up_argv(tmp_path, up.node, up.sets), capture_output=True,
                            text=True, timeout=30)
    assert second.returncode != 0
    assert f"another shoal up (pid {first.pid}) is running" in second.stderr

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    # At once: the new launcher waits for the children the killed one left stopping.
    start = time.monotonic()
    up.start()
    await up.ready()
    print(f"\nSIGKILL shoal up -> new shoal up ready {time.monotonic() - start:.2f} s")
    assert "nats-server ready" in up.log()
    assert await running_containers(up.socket) == before
    assert cid in before
    assert await stream_messages(up) >= events  # the same JetStream store
    status = up.cli_status()
    assert status.returncode == 0, status.stdout + status.stderr
