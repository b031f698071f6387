"""Crash boundaries of a whole node: pod lives driven through the CRI as kubelet drives
them, while a random Shoal process is SIGKILLed every few seconds and `shoal up` restarts
it; then what every life saw, whether long-lived containers kept their processes, and what
was left on the host (chaos_nodes.py: on what). tests/e2e/test_chaos.py runs it small;
bench/churn.py runs it big.

A life: RunPodSandbox -> CreateContainer -> StartContainer of busybox `sh -c 'sleep S;
echo LINE; exit CODE'` -> wait for its exit (ContainerStatus, as kubelet's PLEG polls) ->
check the exit code and the CRI log line -> StopPodSandbox -> RemovePodSandbox -> remove
any other pod of the same uid still listed (kubelet's sandbox GC). As kubelet does, an
UNAVAILABLE or DEADLINE_EXCEEDED answer is tried again (for `retry_budget` seconds), and a
create that failed otherwise is made anew with the next attempt number. Any call that still
fails is a failed call: what kubelet would report as an error event. Each call has
kubelet's deadline (`--runtime-request-timeout`, 2 min; twice that for RunPodSandbox), so a
call that answers late is slow, not failed: calls slower than SLOW are listed apart. A
stop or remove that failed is tried again until it works (kubelet's next pod sync), so
what the runtime still lists at the end is what it really leaked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc

from support import chaos_nodes as nodes
from support.chaos_nodes import SERVICES, ChaosNode, Spawn

T = TypeVar("T")

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
MAX_ATTEMPTS = 3  # creates of one object, each with the next attempt number
RETRY_PAUSE = 0.5  # between kubelet's tries of one call
EXIT_WAIT = 90.0  # beyond its sleep, how long a container may take to be seen exited
SLOW = 20.0  # a call (with its retries) slower than this is listed as slow
TEARDOWN_AGAIN = 120.0  # how long a failed stop/remove is tried again, as later syncs do
POLL_TIMEOUT = 10.0  # ContainerStatus while waiting for an exit
LABEL = "shoal-chaos-life"

# kubelet's CRI connection (k8s.io/cri-client): grpc-go reconnect backoff from 100 ms up to
# 3 s. gRPC's defaults (1 s, up to 120 s) would leave a client idle long after the
# gateway is back.
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 3000)]


@dataclass
class ChaosSettings:
    lives: int = 60  # at least this many
    concurrency: int = 6
    min_churn: float = 0.0  # more lives are started until the churn lasted this long
    kill_every: float = 10.0  # seconds between kills; 0: never
    targets: tuple[str, ...] = SERVICES  # a random one of these per kill (NATS: the server)
    seed: int = 1
    survivors: int = 5  # long-lived containers started before the churn
    call_timeout: float = 120.0  # each CRI call's deadline (RunPodSandbox: twice this)
    retry_budget: float = 60.0  # how long kubelet keeps trying one call
    deadline: float | None = None  # the lives still running then are cut short (a test's bound)


@dataclass
class Failure:
    life: int
    call: str
    code: str
    details: str
    at: float  # seconds into the churn


@dataclass
class Kill:
    at: float
    target: str
    pid: int  # 0: nothing of it was running (still being restarted)


@dataclass
class ChaosReport:
    settings: ChaosSettings
    lives_done: int = 0
    failures: list[Failure] = field(default_factory=list)
    retried: Counter[str] = field(default_factory=Counter)  # "RPC CODE" -> tries again
    slow: list[str] = field(default_factory=list)  # calls slower than SLOW (retries in)
    exits: list[str] = field(default_factory=list)  # lost/wrong exits, missing log lines
    ghosts: list[str] = field(default_factory=list)  # other pods of a life, GC'd
    survivors: list[str] = field(default_factory=list)  # problems of the long-lived ones
    leaks: list[str] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    life_seconds: list[float] = field(default_factory=list)
    churn_seconds: float = 0.0
    restarts: int = 0  # restarts of what was killed ("child exited; restarting" of shoal up)
    up_exit: int | None = None  # the runtime's exit code when stopped (None: it was killed)
    runtime: str = "shoal up"

    @property
    def clean(self) -> bool:
        return not (self.failures or self.exits or self.survivors or self.leaks) \
            and self.up_exit == 0

    def summary(self) -> str:
        s = self.settings
        kills = Counter(k.target for k in self.kills if k.pid)
        return (f"seed {s.seed}: {self.lives_done} lives (of {s.lives}+) in "
                f"{self.churn_seconds:.0f} s, {len(self.kills)} kills "
                f"({', '.join(f'{t} {n}' for t, n in sorted(kills.items())) or 'none'}), "
                f"{self.restarts} restarts; failed calls {len(self.failures)}, slow calls "
                f"{len(self.slow)}, "
                f"lost/wrong exits {len(self.exits)}, survivors lost {len(self.survivors)}, "
                f"leaked {len(self.leaks)}, ghosts {len(self.ghosts)}, {self.runtime} exit "
                f"{self.up_exit}")

    def as_json(self) -> dict[str, object]:
        # Not dataclasses.asdict: it would rebuild the Counter from (key, value) pairs.
        out = {k: v for k, v in vars(self).items() if k not in ("settings", "retried")}
        return {**out, "settings": vars(self.settings), "retried": dict(self.retried),
                "failures": [vars(f) for f in self.failures],
                "kills": [vars(k) for k in self.kills], "clean": self.clean}

    def details(self) -> list[str]:
        out = [f"failed: life {f.life} {f.call} at {f.at:.1f} s: {f.code} {f.details}"
               for f in self.failures]
        out += [f"exit: {e}" for e in self.exits]
        out += [f"survivor: {e}" for e in self.survivors]
        out += [f"leak: {e}" for e in self.leaks]
        out += [f"ghost: {e}" for e in self.ghosts]
        out += [f"slow: {e}" for e in self.slow]
        return out


class CallFailed(Exception):
    """A CRI call that still failed after kubelet's retries (already recorded)."""


# --------------------------------------------------------------------------- kubelet


class Kubelet:
    """The CRI calls of the churn, with kubelet's retries; every outcome is recorded."""

    def __init__(self, channel: grpc.aio.Channel, settings: ChaosSettings,
                 report: ChaosReport) -> None:
        self.rt = cri_grpc.RuntimeServiceStub(channel)
        self.img = cri_grpc.ImageServiceStub(channel)
        self.s = settings
        self.report = report
        self.t0 = time.monotonic()

    async def call(self, life: int, name: str, send: Callable[[float], Awaitable[T]]) -> T:
        """`send(timeout)` until it answers, retrying what kubelet retries for as long."""
        start = time.monotonic()
        timeout = self.s.call_timeout * (2 if name == "RunPodSandbox" else 1)
        while True:
            try:
                reply = await send(timeout)
            except grpc.aio.AioRpcError as err:
                code = err.code()
                if code in RETRYABLE and time.monotonic() - start < self.s.retry_budget:
                    self.report.retried[f"{name} {code.name}"] += 1
                    await asyncio.sleep(RETRY_PAUSE)
                    continue
                self.report.failures.append(Failure(
                    life, name, code.name, err.details() or "",
                    round(time.monotonic() - self.t0, 1)))
                raise CallFailed(name) from err
            took = time.monotonic() - start
            if took > SLOW:
                self.report.slow.append(f"life {life} {name} took {took:.0f} s (from "
                                        f"{start - self.t0:.0f} s)")
            return reply


def _image(images: dict[str, str]) -> cri.ImageSpec:
    return cri.ImageSpec(image=images["busybox"])


def pod_config(root: Path, life: int, uid: str, attempt: int) -> cri.PodSandboxConfig:
    name = f"chaos-{life}"
    logs = root / "pod-logs" / f"{name}-{attempt}"
    logs.mkdir(parents=True, exist_ok=True)
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace="chaos",
                                        attempt=attempt),
        hostname=name, log_directory=str(logs),
        labels={LABEL: str(life), "io.kubernetes.pod.uid": uid})


@dataclass(frozen=True)
class Plan:
    """What one life's container does, drawn from the seed."""

    uid: str
    sleep: float
    code: int
    line: str

    @classmethod
    def draw(cls, seed: int, life: int) -> Plan:
        rng = random.Random(f"{seed}:life:{life}")
        uid = f"{rng.getrandbits(128):032x}"
        return cls(uid, round(rng.uniform(0.2, 2.0), 2), rng.randrange(0, 200),
                   f"chaos life {life} uid {uid[:8]}")

    def container(self, images: dict[str, str], attempt: int) -> cri.ContainerConfig:
        script = f"sleep {self.sleep}; echo '{self.line}'; exit {self.code}"
        return cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="main", attempt=attempt), image=_image(images),
            command=["sh", "-c", script], log_path=f"main_{attempt}.log",
            labels={LABEL: "main"})


class Churn:
    """The pod lives of one run, `settings.concurrency` at a time."""

    def __init__(self, kubelet: Kubelet, images: dict[str, str], root: Path) -> None:
        self.k = kubelet
        self.images = images
        self.root = root
        self.report = kubelet.report

    async def run(self) -> None:
        """`concurrency` workers, each living one life after another until `lives` were
        begun and `min_churn` seconds have passed."""
        s = self.k.s
        end = time.monotonic() + s.min_churn
        begun = iter(range(1 << 30))

        async def worker() -> None:
            for life in begun:
                if life >= s.lives and time.monotonic() >= end:
                    return
                await self.life(life)

        await asyncio.gather(*(worker() for _ in range(s.concurrency)))

    async def life(self, i: int) -> None:
        plan = Plan.draw(self.k.s.seed, i)
        start = time.monotonic()
        pod_id = ""
        try:
            pod_id, config = await self.run_pod(i, plan)
            cid = await self.create_container(i, pod_id, config, plan)
            await self.k.call(i, "StartContainer", lambda t: self.k.rt.StartContainer(
                cri.StartContainerRequest(container_id=cid), timeout=t))
            await self.check_exit(i, cid, config, plan)
        except CallFailed:
            pass  # recorded; kubelet would tear the pod down all the same
        with contextlib.suppress(CallFailed):
            await self.teardown(i, pod_id, plan)
        self.report.lives_done += 1
        self.report.life_seconds.append(round(time.monotonic() - start, 2))

    async def run_pod(self, i: int, plan: Plan) -> tuple[str, cri.PodSandboxConfig]:
        for attempt in range(MAX_ATTEMPTS):
            config = pod_config(self.root, i, plan.uid, attempt)
            with contextlib.suppress(CallFailed):
                reply = await self.k.call(i, "RunPodSandbox", lambda t, c=config: (
                    self.k.rt.RunPodSandbox(cri.RunPodSandboxRequest(config=c), timeout=t)))
                return reply.pod_sandbox_id, config
        raise CallFailed("RunPodSandbox")

    async def create_container(self, i: int, pod_id: str, config: cri.PodSandboxConfig,
                               plan: Plan) -> str:
        for attempt in range(MAX_ATTEMPTS):
            request = cri.CreateContainerRequest(pod_sandbox_id=pod_id, sandbox_config=config,
                                                 config=plan.container(self.images, attempt))
            with contextlib.suppress(CallFailed):
                reply = await self.k.call(i, "CreateContainer", lambda t, r=request: (
                    self.k.rt.CreateContainer(r, timeout=t)))
                return reply.container_id
        raise CallFailed("CreateContainer")

    async def exited(self, i: int, cid: str, plan: Plan) -> cri.ContainerStatus | None:
        """Its status once it exited, polled as kubelet's PLEG does; None (recorded) if it
        is never seen exited."""
        end = time.monotonic() + plan.sleep + EXIT_WAIT
        state = "?"
        while time.monotonic() < end:
            try:
                status = (await self.k.rt.ContainerStatus(cri.ContainerStatusRequest(
                    container_id=cid), timeout=POLL_TIMEOUT)).status
            except grpc.aio.AioRpcError as err:
                if err.code() not in RETRYABLE:
                    self.report.exits.append(f"life {i}: ContainerStatus {err.code().name} "
                                             f"{err.details()}")
                    return None
                state = err.code().name
            else:
                if status.state == cri.CONTAINER_EXITED:
                    return status
                state = cri.ContainerState.Name(status.state)
            await asyncio.sleep(0.5)
        self.report.exits.append(f"life {i}: not seen exited after {EXIT_WAIT:g} s "
                                 f"(last: {state})")
        return None

    async def check_exit(self, i: int, cid: str, config: cri.PodSandboxConfig,
                         plan: Plan) -> None:
        status = await self.exited(i, cid, plan)
        if status is None:
            return
        if status.exit_code != plan.code:
            self.report.exits.append(f"life {i} ({cid[:12]}): exit code {status.exit_code} "
                                     f"({status.reason} {status.message!r}), expected "
                                     f"{plan.code}")
        log = Path(config.log_directory) / f"main_{status.metadata.attempt}.log"
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError as exc:
            self.report.exits.append(f"life {i} ({cid[:12]}): no CRI log: {exc}")
            return
        if not any(line.split(" ", 3)[1:] == ["stdout", "F", plan.line] for line in lines):
            self.report.exits.append(f"life {i} ({cid[:12]}): log line {plan.line!r} "
                                     f"missing from {log}: {lines[-3:]}")

    async def teardown(self, i: int, pod_id: str, plan: Plan) -> None:
        """Stop and remove the pod, then every other pod of its uid still listed (a failed
        attempt's NOTREADY one), as kubelet's garbage collector does."""
        if pod_id:
            await self.remove_pod(i, pod_id)
        listed = await self.k.call(i, "ListPodSandbox", lambda t: self.k.rt.ListPodSandbox(
            cri.ListPodSandboxRequest(filter=cri.PodSandboxFilter(
                label_selector={"io.kubernetes.pod.uid": plan.uid})), timeout=t))
        for pod in listed.items:
            self.report.ghosts.append(f"life {i}: pod {pod.id[:12]} attempt "
                                      f"{pod.metadata.attempt} "
                                      f"{cri.PodSandboxState.Name(pod.state)}")
            await self.remove_pod(i, pod.id)

    async def remove_pod(self, i: int, pod_id: str) -> None:
        """Stop and remove; a failure (recorded) is tried again until it works, as
        kubelet's later syncs do, for TEARDOWN_AGAIN seconds."""
        end = time.monotonic() + TEARDOWN_AGAIN
        while True:
            try:
                await self.k.call(i, "StopPodSandbox", lambda t: self.k.rt.StopPodSandbox(
                    cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=t))
                await self.k.call(i, "RemovePodSandbox", lambda t: self.k.rt.RemovePodSandbox(
                    cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=t))
                return
            except CallFailed:
                if time.monotonic() > end:
                    raise
            await asyncio.sleep(1.0)


# --------------------------------------------------------------------------- survivors


@dataclass
class Survivor:
    pod_id: str
    container_id: str
    pid: int
    started: int  # the process's start time (clock ticks since boot), against pid reuse


def start_ticks(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


async def container_pid(k: Kubelet, cid: str) -> tuple[int, int]:
    """(CRI state, pid) from verbose ContainerStatus."""
    reply = await k.call(-1, "ContainerStatus", lambda t: k.rt.ContainerStatus(
        cri.ContainerStatusRequest(container_id=cid, verbose=True), timeout=t))
    return reply.status.state, int(json.loads(reply.info.get("info", "{}")).get("pid", 0))


async def start_survivors(k: Kubelet, images: dict[str, str], root: Path,
                          count: int) -> list[Survivor]:
    """Long-lived pods (busybox `sleep 3600`), started before the churn and its kills."""
    rng = random.Random(f"{k.s.seed}:survivors")
    out = []
    for n in range(count):
        config = pod_config(root, 1000 + n, f"{rng.getrandbits(128):032x}", 0)
        pod = (await k.rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config),
                                        timeout=60)).pod_sandbox_id
        cid = (await k.rt.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod, sandbox_config=config, config=cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name="survivor"), image=_image(images),
                command=["sleep", "3600"])), timeout=60)).container_id
        await k.rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=60)
        _, pid = await container_pid(k, cid)
        out.append(Survivor(pod, cid, pid, start_ticks(pid) or 0))
    return out


async def check_survivors(k: Kubelet, survivors: Sequence[Survivor]) -> list[str]:
    """Each still running with the process it started with."""
    problems = []
    for s in survivors:
        try:
            state, pid = await container_pid(k, s.container_id)
        except CallFailed:
            problems.append(f"{s.container_id[:12]}: ContainerStatus failed")
            continue
        if state != cri.CONTAINER_RUNNING or pid != s.pid or start_ticks(pid) != s.started:
            problems.append(f"{s.container_id[:12]}: {cri.ContainerState.Name(state)} pid "
                            f"{pid} (started with pid {s.pid})")
    return problems


# --------------------------------------------------------------------------- a run


async def killer(up: ChaosNode, settings: ChaosSettings, report: ChaosReport) -> None:
    """SIGKILL a random target every `kill_every` seconds, whatever it is doing."""
    rng = random.Random(f"{settings.seed}:kill")
    t0 = time.monotonic()
    while True:
        await asyncio.sleep(settings.kill_every)
        target = rng.choice(settings.targets)
        pids = up.pids_of(target)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        report.kills.append(Kill(round(time.monotonic() - t0, 1), target,
                                 pids[0] if pids else 0))


async def listed_leftovers(k: Kubelet, survivors: Sequence[Survivor]) -> list[str]:
    """Pods and containers the CRI still lists besides the survivors'."""
    keep = {s.pod_id for s in survivors} | {s.container_id for s in survivors}
    pods = await k.call(-1, "ListPodSandbox", lambda t: k.rt.ListPodSandbox(
        cri.ListPodSandboxRequest(), timeout=t))
    ctrs = await k.call(-1, "ListContainers", lambda t: k.rt.ListContainers(
        cri.ListContainersRequest(), timeout=t))
    return ([f"listed pod {p.id[:12]} {p.metadata.name} attempt {p.metadata.attempt}"
             for p in pods.items if p.id not in keep]
            + [f"listed container {c.id[:12]} of pod {c.pod_sandbox_id[:12]}"
               for c in ctrs.containers if c.id not in keep])


async def churn_on(up: ChaosNode, settings: ChaosSettings, report: ChaosReport) -> None:
    """Survivors, then the churn under kills, then the checks that need the node up."""
    async with grpc.aio.insecure_channel(f"unix://{up.cri_socket}",
                                         options=CHANNEL_OPTIONS) as channel:
        k = Kubelet(channel, settings, report)
        await k.img.PullImage(cri.PullImageRequest(image=_image(up.images)), timeout=120)
        survivors = await start_survivors(k, up.images, up.root, settings.survivors)
        kills = (asyncio.create_task(killer(up, settings, report))
                 if settings.kill_every > 0 else None)
        start = time.monotonic()
        try:
            async with asyncio.timeout(settings.deadline):
                await Churn(k, up.images, up.root).run()
        except TimeoutError:
            report.failures.append(Failure(-1, "churn", "TIMEOUT", f"lives not done within "
                                           f"{settings.deadline:g} s", settings.deadline or 0))
        finally:
            if kills is not None:
                kills.cancel()
                await asyncio.gather(kills, return_exceptions=True)
        report.churn_seconds = round(time.monotonic() - start, 1)
        # Whatever was killed last is back before anything is judged.
        await nodes.until_runtime_ready(up.cri_socket, 60)
        report.survivors = await check_survivors(k, survivors)
        report.leaks += await listed_leftovers(k, survivors)
        for s in survivors:
            await Churn(k, up.images, up.root).remove_pod(-1, s.pod_id)


async def run_chaos(up: ChaosNode, settings: ChaosSettings, before: set[str],
                    spawn: Spawn = nodes.popen, ours: set[int] | None = None) -> ChaosReport:
    """One run on a fresh node (a `shoal up`, or another ChaosNode): start it, churn, stop
    it (`shoal up`: SIGINT) and list what is left. `before`: host_names() before it
    started; `ours`: pids that may name its root and are not the node's (the caller's
    ancestors)."""
    report = ChaosReport(settings, runtime=up.name)
    await up.start(spawn)
    try:
        await churn_on(up, settings, report)
    finally:
        # What is still listed was counted already: remove it, so that a run cut short
        # leaves no container running either.
        await nodes.remove_every_pod(up.cri_socket)
        report.up_exit = await up.stop()
        report.restarts = up.restarts()
    report.leaks += up.leftovers(before, ours or set())
    up.scrub(report.leaks, ours or set())
    return report
