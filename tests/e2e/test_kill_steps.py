"""Crash boundaries: the gateway, the executor and the supervisor SIGKILLed
(shoal_common.faults) at each step of RunPodSandbox, CreateContainer, StopPodSandbox and
RemovePodSandbox, and restarted.
kubelet's retry of the call succeeds, and once the pod is removed nothing of it is left:
no process, mount, netns, cgroup, IP lease, bundle, pod directory or record.

One node per killed service, shared by its steps (support.kill_steps arms one step at a
time). The gateway's and the supervisor's steps run one after another. The executor's
scenarios start in the background with the module, its kills one at a time, and each
executor test awaits its own outcome: a create held by a killed executor is resent when
its successor announces its start (Bus: `started`), and only after 30 s of silence
(TasksClient.ATTEMPT) if that announcement were lost, so overlapping them bounds the
module's time either way."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cri_api.v1 import api_pb2 as cri
from support.kill_steps import LEASES, KillNode, kubelet_retry, pod_name
from support.shoal import Cri, images_fixture, pod_config  # noqa: F401

pytestmark = pytest.mark.e2e

RUN, CREATE, STOP, REMOVE = "RunPodSandbox", "CreateContainer", "StopPodSandbox", "RemovePodSandbox"
STEPS: dict[str, list[tuple[str, str]]] = {
    "cri-gateway": [
        ("cri.sandbox.recorded", RUN), ("cri.sandbox.created", RUN),
        ("cri.container.recorded", CREATE), ("cri.container.created", CREATE),
        ("cri.sandbox.stopping", STOP), ("cri.sandbox.removing", REMOVE)],
    # Stops and removes first: no create's resend is pending while they kill.
    "executor": [
        ("executor.sandbox.stopping", STOP), ("executor.sandbox.stopped", STOP),
        ("executor.sandbox.removing", REMOVE), ("executor.sandbox.removed", REMOVE),
        ("executor.sandbox.netns", RUN), ("executor.sandbox.pinned", RUN),
        ("executor.sandbox.rootfs", RUN), ("executor.sandbox.started", RUN),
        ("executor.sandbox.network", RUN),
        ("executor.container.rootfs", CREATE), ("executor.container.created", CREATE)],
    # The pause container's: made by conmon and runc but not yet recorded; started by runc
    # but not yet recorded (a retried start then found it running).
    "supervisor": [("supervisor.task.created", RUN), ("supervisor.task.started", RUN)],
}
CASES = [(service, step, call) for service, steps in STEPS.items() for step, call in steps]
# Steps of a pod's pause process: their pods share a PID namespace (the CRI's default), so
# they have one; the others ask for kubelet's CONTAINER and have none (their namespaces
# are pinned: executor.sandbox.pinned).
PAUSE_STEPS = {"executor.sandbox.rootfs", "executor.sandbox.started",
               "supervisor.task.created", "supervisor.task.started"}
# A stop or remove the killed executor never answers is given up after this and retried.
STOP_CALL = 5.0
# Kills are batched so that all of a batch's come before its first create is resent (30 s
# after its kill): a resend is then never cut short by a later kill (another 30 s).
KILL_WINDOW = 22.0


@dataclass
class Window:
    started: float | None = None
    pending: set[asyncio.Task[Any]] = field(default_factory=set)

    async def before_kill(self) -> None:
        now = time.monotonic()
        if self.started is not None and now - self.started > KILL_WINDOW:
            if self.pending:
                await asyncio.wait(self.pending)
            self.started = None
        if self.started is None:
            self.started = time.monotonic()


def container(image: str) -> cri.ContainerConfig:
    return cri.ContainerConfig(metadata=cri.ContainerMetadata(name="main"),
                               image=cri.ImageSpec(image=image), command=["sleep", "600"])


async def run_pod(api: Cri, config: cri.PodSandboxConfig) -> str:
    return (await kubelet_retry(lambda t: api.runtime.RunPodSandbox(
        cri.RunPodSandboxRequest(config=config), timeout=t))).pod_sandbox_id


async def create(api: Cri, pod_id: str, config: cri.PodSandboxConfig, image: str) -> str:
    return (await kubelet_retry(lambda t: api.runtime.CreateContainer(
        cri.CreateContainerRequest(pod_sandbox_id=pod_id, sandbox_config=config,
                                   config=container(image)), timeout=t))).container_id


async def stop_pod(api: Cri, pod_id: str) -> str:
    await kubelet_retry(lambda t: api.runtime.StopPodSandbox(
        cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=t), per_call=STOP_CALL)
    return pod_id


async def remove_pod(api: Cri, pod_id: str) -> str:
    await kubelet_retry(lambda t: api.runtime.RemovePodSandbox(
        cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=t), per_call=STOP_CALL)
    return pod_id


def the_call(call: str, api: Cri, config: cri.PodSandboxConfig, pod_id: str,
             image: str) -> Callable[[], Awaitable[str]]:
    return {RUN: lambda: run_pod(api, config),
            CREATE: lambda: create(api, pod_id, config, image),
            STOP: lambda: stop_pod(api, pod_id),
            REMOVE: lambda: remove_pod(api, pod_id)}[call]


async def pod_states(api: Cri) -> dict[str, int]:
    pods = (await api.runtime.ListPodSandbox(cri.ListPodSandboxRequest())).items
    return {p.id: p.state for p in pods}


async def check_outcome(api: Cri, call: str, pod_id: str, ctr_id: str) -> None:
    """What the call was for is done."""
    states = await pod_states(api)
    if call == REMOVE:
        assert pod_id not in states
        return
    assert states[pod_id] == (cri.SANDBOX_NOTREADY if call == STOP else cri.SANDBOX_READY)
    if call == CREATE:
        await api.runtime.StartContainer(cri.StartContainerRequest(container_id=ctr_id))
        status = (await api.runtime.ContainerStatus(cri.ContainerStatusRequest(
            container_id=ctr_id))).status
        assert status.state == cri.CONTAINER_RUNNING


async def prepare(api: Cri, call: str, config: cri.PodSandboxConfig,
                  image: str) -> tuple[str, str]:
    """The pod (and its running container) the call acts on, as kubelet would have it."""
    if call == RUN:
        return "", ""
    pod_id = await run_pod(api, config)
    if call == CREATE:
        return pod_id, ""
    ctr_id = await create(api, pod_id, config, image)
    await api.runtime.StartContainer(cri.StartContainerRequest(container_id=ctr_id))
    if call == REMOVE:
        await stop_pod(api, pod_id)
    return pod_id, ctr_id


async def scenario(node: KillNode, window: Window, step: str, call: str, tmp: Path,
                   image: str) -> list[str]:
    """`call` with `step` armed, retried as kubelet does while the killed service comes
    back; then the pod removed. Returns what is left of it."""
    assert node.api is not None
    api = node.api
    config = pod_config(tmp, pod_name(step))
    if step not in PAUSE_STEPS:
        config.linux.security_context.namespace_options.pid = cri.CONTAINER
    async with node.lock:  # setup and kill: nothing else of this node's in flight
        pod_id, ctr_id = await prepare(api, call, config, image)
        await window.before_kill()
        since = node.arm(step)
        attempt = asyncio.create_task(the_call(call, api, config, pod_id, image)())
        window.pending.add(attempt)
        try:
            await node.restarted(since, step)
            if call in (STOP, REMOVE):
                await attempt  # its retry reaches the restarted service at once
        except BaseException:
            attempt.cancel()
            raise
    made = await attempt  # a create waits out the gateway's resend to a killed executor
    async with node.lock:
        pod_id = pod_id or made
        ctr_id = made if call == CREATE else ctr_id
        await check_outcome(api, call, pod_id, ctr_id)
        if call != REMOVE:
            await stop_pod(api, pod_id)
            await remove_pod(api, pod_id)
        assert pod_id not in await pod_states(api)
        return node.leftovers_of([pod_id, ctr_id])


@pytest.fixture(scope="module", autouse=True, name="nodes")
async def nodes_fixture(nats_url: str, tmp_path_factory: pytest.TempPathFactory,
                        images: dict[str, str]) -> AsyncIterator[dict[str, KillNode]]:
    """One node per killed service, started side by side, busybox pulled on each."""
    made = {service: KillNode.at(nats_url, tmp_path_factory.mktemp(f"kill-{service}"),
                                 f"t{os.getpid()}-kill-{service}", service,
                                 [step for step, _ in steps])
            for service, steps in STEPS.items()}
    try:
        await asyncio.gather(*(node.start(images) for node in made.values()))
        for node in made.values():
            assert node.api is not None
            await node.api.images.PullImage(cri.PullImageRequest(
                image=cri.ImageSpec(image=images["busybox"])))
        yield made
    finally:
        await asyncio.gather(*(node.close() for node in made.values()))


@pytest.fixture(scope="module", autouse=True, name="executor_outcomes")
async def executor_outcomes_fixture(nodes: dict[str, KillNode],
                                    tmp_path_factory: pytest.TempPathFactory,
                                    images: dict[str, str]
                                    ) -> AsyncIterator[dict[str, asyncio.Task[list[str]]]]:
    """The executor's scenarios, started at once: they take its lock in this order."""
    tmp, window = tmp_path_factory.mktemp("kill-executor-pods"), Window()
    tasks = {step: asyncio.create_task(scenario(nodes["executor"], window, step, call, tmp,
                                                images["busybox"]))
             for step, call in STEPS["executor"]}
    yield tasks
    for task in tasks.values():
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)


@pytest.mark.parametrize(("service", "step", "call"), CASES,
                         ids=[f"{service}:{step}" for service, step, _ in CASES])
async def test_a_service_killed_at_a_step_loses_nothing(
        nodes: dict[str, KillNode], executor_outcomes: dict[str, asyncio.Task[list[str]]],
        tmp_path: Path, images: dict[str, str], service: str, step: str, call: str) -> None:
    node = nodes[service]
    if service == "executor":
        assert await executor_outcomes[step] == []
        return
    assert await scenario(node, Window(), step, call, tmp_path, images["busybox"]) == []
    # The gateway's scenarios run alone on their node: anything left, whoever's, is a leak
    # (an id the killed gateway made and its successor undid included).
    assert node.leftovers() == []


async def test_the_executor_sweeps_only_what_its_records_claim(
        nodes: dict[str, KillNode],
        executor_outcomes: dict[str, asyncio.Task[list[str]]]) -> None:
    """What no record claims (as a crash of an older version could leave it) goes at the
    next start: a claimed netns with its IP lease, bundle and pod directories with mounts
    below. A `shoal-*` namespace nobody here claimed (another node's) stays."""
    await asyncio.gather(*executor_outcomes.values(), return_exceptions=True)  # quiet now
    node = nodes["executor"]
    orphan, foreign = (uuid.uuid4().hex + uuid.uuid4().hex for _ in range(2))
    names = {i: f"shoal-{i[:32]}" for i in (orphan, foreign)}
    run = node.services.node.run_root / "executor"
    with sqlite3.connect(node.services.node.state_root / "executor" / "executor.db") as db:
        db.execute("INSERT INTO netns(name, sandbox_id, path, runtime_config, attached) "
                   "VALUES (?,?,?,'{}',1)",
                   (names[orphan], orphan, f"/var/run/netns/{names[orphan]}"))
    lease = LEASES / f"{node.services.subnet_prefix}0.253"
    try:
        for name in names.values():
            subprocess.run(["ip", "netns", "add", name], check=True)
        lease.write_text(f"{orphan}\r\neth0")
        planted = [run / "bundles" / orphan / "rootfs", run / "sandboxes" / orphan / "shm"]
        for point in planted:
            point.mkdir(parents=True)
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(point)], check=True)
        async with node.lock:
            assert node.proc is not None
            since = node.restarts
            node.proc.kill9()
            await node.restarted(since, "a kill by the test")
        assert not Path(f"/var/run/netns/{names[orphan]}").exists()
        assert not lease.exists()
        assert not (run / "bundles" / orphan).exists()
        assert not (run / "sandboxes" / orphan).exists()
        assert Path(f"/var/run/netns/{names[foreign]}").exists()
        assert node.leftovers_of([orphan]) == []
    finally:
        subprocess.run(["ip", "netns", "delete", names[foreign]], check=False)


async def test_nothing_is_left_on_either_node(
        nodes: dict[str, KillNode],
        executor_outcomes: dict[str, asyncio.Task[list[str]]]) -> None:
    await asyncio.gather(*executor_outcomes.values(), return_exceptions=True)
    for node in nodes.values():
        assert node.api is not None
        assert await pod_states(node.api) == {}
        assert node.leftovers() == []
