"""Pod start latency, concurrent start throughput, stop+remove latency and memory, through
the CRI: Shoal against containerd 1.6's CRI plugin, in the same run.

A plain CRI client (the generated `runtime.v1` stubs, nothing of Shoal's) that can be
pointed at any CRI socket. By default it starts everything itself: a real nats-server,
registry (docker-registry, pause image from catatonit and busybox image pushed to it), the
five Shoal services (as tests/e2e/test_pods.py starts them) and a throwaway containerd
(Debian's 1.6: own config, root, state and socket under the benchmark's root, in a private
mount namespace; CRI plugin with the same registry as a plain-HTTP mirror, the same pause
image, the same CNI plugin chain on its own subnet and bridge, cgroupfs, see
_harness.Containerd). Both runtimes run side by side and are measured alternately, so drift
in the machine's load affects both alike:

1. warm-up: a few pods per runtime, started and removed (unmeasured), images present;
2. idle memory (RSS);
3. `--pods` pods started one after another, alternating runtimes (order flipped every
   pod): RunPodSandbox + CreateContainer + StartContainer of busybox `sleep 3600`;
   memory with them all running; then each stopped and removed (StopContainer with
   timeout 0, RemoveContainer, StopPodSandbox, RemovePodSandbox), alternating again;
4. `--rounds` rounds of `--burst` concurrent pod starts per runtime (order alternating):
   wall time, memory with them running, then all removed concurrently.

Every pod is removed at the end (also after Ctrl-C), then both runtimes stop; the script
checks that no netns, mount or process of this run is left and deletes the two bridges it
made. One state root per invocation (/tmp/shoal-bench-pods-<timestamp>); nothing deleted.

    .venv/bin/python bench/pods.py                # about 5 minutes
    .venv/bin/python bench/pods.py --update-docs  # and rewrite docs/benchmarks.md
    .venv/bin/python bench/pods.py --socket crio=/run/crio/crio.sock --image busybox
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _harness as h
import grpc
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc
from support.images import busybox_image, pause_image, push
from support.registry import Registry

SECTION = "Pod start through the CRI: Shoal vs containerd"
MiB = 1 << 20
CALL_TIMEOUT = 300.0
LABEL = "shoal-bench"  # every pod this script makes carries this label
SHOAL_NET = ("10.201.0.0/24", "shoalbench")  # pod subnet, bridge
CONTAINERD_NET = ("10.202.0.0/24", "ctrdbench")  # a different subnet and bridge


@dataclass
class PodStart:
    runtime: str
    phase: str  # "sequential" or "burst-<round>"
    run: float  # RunPodSandbox seconds
    create: float
    start: float
    pod_id: str = ""
    container_id: str = ""

    @property
    def total(self) -> float:
        return self.run + self.create + self.start


@dataclass
class PodStop:
    runtime: str
    phase: str
    seconds: float  # StopContainer + RemoveContainer + StopPodSandbox + RemovePodSandbox


@dataclass
class Burst:
    runtime: str
    round: int
    pods: int
    seconds: float  # wall time of all concurrent starts
    teardown: float  # wall time of removing them all concurrently


@dataclass
class Mem:
    count: int  # processes
    rss: int  # bytes, summed
    pss: int


@dataclass
class Runtime:
    """One CRI endpoint under test, and how to read its processes' memory (if we run it)."""

    name: str
    socket: str
    image: str
    rss: Callable[[], dict[str, Mem]] | None = None  # process group -> memory
    profile: Callable[[], dict[str, tuple[float, float]]] | None = None  # -> (sum s, count)
    channel: grpc.aio.Channel | None = None
    version: str = ""
    pods: set[str] = field(default_factory=set)  # pod ids not yet removed

    @property
    def rt(self) -> cri_grpc.RuntimeServiceStub:
        assert self.channel is not None
        return cri_grpc.RuntimeServiceStub(self.channel)

    @property
    def img(self) -> cri_grpc.ImageServiceStub:
        assert self.channel is not None
        return cri_grpc.ImageServiceStub(self.channel)


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.runtimes: list[Runtime] = []
        self.starts: list[PodStart] = []
        self.stops: list[PodStop] = []
        self.bursts: list[Burst] = []
        self.memory: dict[str, dict[str, dict[str, Mem]]] = {}  # when -> runtime -> group
        self.profiles: dict[str, dict[str, dict[str, tuple[float, float]]]] = {}  # phase->rt
        self._seq = 0
        self.run_id = uuid.uuid4().hex[:6]  # pod names never collide with an earlier run's

    # -- pods ------------------------------------------------------------------------------

    def pod_config(self, rt: Runtime, phase: str) -> cri.PodSandboxConfig:
        self._seq += 1
        name = f"bench-{self.run_id}-{phase}-{self._seq}"
        logs = self.root / "pod-logs" / rt.name / name
        logs.mkdir(parents=True)
        config = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex,
                                            namespace="bench"),
            hostname=name, log_directory=str(logs),
            dns_config=cri.DNSConfig(servers=["10.96.0.10"], searches=["bench.svc"]),
            labels={LABEL: "1"})
        # What kubelet sends for a pod without shareProcessNamespace (the CRI's default,
        # POD, would share one PID namespace among the pod's containers).
        config.linux.security_context.namespace_options.pid = cri.CONTAINER
        return config

    async def start_pod(self, rt: Runtime, phase: str, image: str = "",
                        command: Sequence[str] = ("sleep", "3600")) -> PodStart:
        """One pod and its container (`image`: rt.image unless given), started."""
        config = self.pod_config(rt, phase)
        t0 = time.perf_counter()
        pod_id = (await rt.rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config),
                                            timeout=CALL_TIMEOUT)).pod_sandbox_id
        rt.pods.add(pod_id)
        t1 = time.perf_counter()
        container = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="main"),
            image=cri.ImageSpec(image=image or rt.image),
            command=list(command), log_path="main.log", labels={LABEL: "1"})
        container.linux.security_context.namespace_options.CopyFrom(  # as kubelet does
            config.linux.security_context.namespace_options)
        cid = (await rt.rt.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=container, sandbox_config=config),
            timeout=CALL_TIMEOUT)).container_id
        t2 = time.perf_counter()
        await rt.rt.StartContainer(cri.StartContainerRequest(container_id=cid),
                                   timeout=CALL_TIMEOUT)
        t3 = time.perf_counter()
        return PodStart(rt.name, phase, t1 - t0, t2 - t1, t3 - t2, pod_id, cid)

    async def stop_pod(self, rt: Runtime, pod_id: str, container_id: str = "") -> float:
        t0 = time.perf_counter()
        if container_id:
            await rt.rt.StopContainer(cri.StopContainerRequest(container_id=container_id,
                                                               timeout=0), timeout=CALL_TIMEOUT)
            await rt.rt.RemoveContainer(cri.RemoveContainerRequest(container_id=container_id),
                                        timeout=CALL_TIMEOUT)
        await rt.rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                                   timeout=CALL_TIMEOUT)
        await rt.rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                     timeout=CALL_TIMEOUT)
        rt.pods.discard(pod_id)
        return time.perf_counter() - t0

    async def remove_all(self, rt: Runtime) -> None:
        """Every pod of this script on `rt` (by label, and those we know of), best effort."""
        if rt.channel is None:
            return
        ids = set(rt.pods)
        with contextlib.suppress(grpc.aio.AioRpcError):
            listed = await rt.rt.ListPodSandbox(cri.ListPodSandboxRequest(
                filter=cri.PodSandboxFilter(label_selector={LABEL: "1"})), timeout=60)
            ids |= {p.id for p in listed.items}
        for pod_id in ids:
            try:
                await self.stop_pod(rt, pod_id)
            except grpc.aio.AioRpcError as exc:
                print(f"  could not remove pod {pod_id[:12]} on {rt.name}: {exc.details()}",
                      file=sys.stderr)

    # -- phases ----------------------------------------------------------------------------

    async def connect(self, rt: Runtime) -> None:
        rt.channel = grpc.aio.insecure_channel(f"unix://{rt.socket}")
        version = await rt.rt.Version(cri.VersionRequest(), timeout=30)
        rt.version = f"{version.runtime_name} {version.runtime_version}"
        await rt.img.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=rt.image)),
                               timeout=CALL_TIMEOUT)

    def sample_memory(self, when: str) -> None:
        self.memory[when] = {rt.name: rt.rss() for rt in self.runtimes if rt.rss is not None}

    async def profile(self, phase: str, begin: bool = False) -> None:
        """Per-command time of the runtimes that expose it, over a phase (begin, then end)."""
        for rt in self.runtimes:
            if rt.profile is None:
                continue
            now = await asyncio.to_thread(rt.profile)
            slot = self.profiles.setdefault(phase, {})
            if begin:
                slot[rt.name] = now
            else:
                before = slot.get(rt.name, {})
                slot[rt.name] = {k: (v[0] - before.get(k, (0.0, 0.0))[0],
                                     v[1] - before.get(k, (0.0, 0.0))[1])
                                 for k, v in now.items()}

    def alternating(self, i: int) -> list[Runtime]:
        return self.runtimes if i % 2 == 0 else self.runtimes[::-1]

    async def run(self) -> None:
        for rt in self.runtimes:
            await self.connect(rt)
            print(f"{rt.name}: {rt.version} on {rt.socket}", flush=True)
        print("warm-up", flush=True)
        for i in range(self.args.warmup):
            for rt in self.alternating(i):
                p = await self.start_pod(rt, "warmup")
                await self.stop_pod(rt, p.pod_id, p.container_id)
        await asyncio.sleep(3)  # let background work (GC, event consumers) settle
        self.sample_memory("idle")

        print(f"{self.args.pods} pods one after another", flush=True)
        await self.profile("start", begin=True)
        started: list[PodStart] = []
        for i in range(self.args.pods):
            for rt in self.alternating(i):
                p = await self.start_pod(rt, "sequential")
                started.append(p)
                print(f"  {i + 1:3} {rt.name:10} {p.total:6.3f} s (run {p.run:.3f}, create "
                      f"{p.create:.3f}, start {p.start:.3f})", flush=True)
        self.starts += started
        await self.profile("start")
        await asyncio.sleep(1)
        self.sample_memory(f"{self.args.pods} pods (sequential)")
        await self.profile("stop+remove", begin=True)
        for i in range(self.args.pods):
            for rt in self.alternating(i):
                p = next(s for s in started if s.runtime == rt.name and s.pod_id in rt.pods)
                seconds = await self.stop_pod(rt, p.pod_id, p.container_id)
                self.stops.append(PodStop(rt.name, "sequential", seconds))
        await self.profile("stop+remove")
        for rt in self.runtimes:
            stops = [s.seconds for s in self.stops if s.runtime == rt.name]
            print(f"  {rt.name}: stop+remove median {statistics.median(stops):.3f} s",
                  flush=True)

        print(f"{self.args.rounds} rounds of {self.args.burst} concurrent pod starts",
              flush=True)
        for r in range(1, self.args.rounds + 1):
            for rt in self.alternating(r + 1):
                await self.burst(rt, r)

    async def burst(self, rt: Runtime, r: int) -> None:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(self.start_pod(rt, f"burst-{r}")
                                         for _ in range(self.args.burst)))
        wall = time.perf_counter() - t0
        self.starts += results
        await asyncio.sleep(1)
        if r == self.args.rounds:
            when = f"{self.args.burst} pods (concurrent)"
            if rt.rss is not None:
                self.memory.setdefault(when, {})[rt.name] = rt.rss()
        t1 = time.perf_counter()
        times = await asyncio.gather(*(self.stop_pod(rt, p.pod_id, p.container_id)
                                       for p in results))
        teardown = time.perf_counter() - t1
        self.stops += [PodStop(rt.name, f"burst-{r}", s) for s in times]
        self.bursts.append(Burst(rt.name, r, len(results), wall, teardown))
        print(f"  round {r} {rt.name:10} {len(results)} pods in {wall:.2f} s "
              f"({len(results) / wall:.1f} pods/s), removed in {teardown:.2f} s", flush=True)

    async def close(self) -> None:
        for rt in self.runtimes:
            await self.remove_all(rt)
            if rt.channel is not None:
                await rt.channel.close()


# --------------------------------------------------------------------------- memory


def mem(pids: Sequence[int]) -> Mem:
    return Mem(len(pids), sum(h.process_rss(p) for p in pids),
               sum(h.process_pss(p) for p in pids))


def shoal_rss(services: h.ShoalServices, nats_pid: int, node_root: Path
              ) -> Callable[[], dict[str, Mem]]:
    def sample() -> dict[str, Mem]:
        out = {f"{sp.service} (python)": mem([sp.proc.pid]) for sp in services}
        out["nats-server"] = mem([nats_pid])
        out["conmon (one per container)"] = mem(h.pids_mentioning(str(node_root),
                                                                  comm="conmon"))
        return out
    return sample


def containerd_rss(ctrd: h.Containerd) -> Callable[[], dict[str, Mem]]:
    def sample() -> dict[str, Mem]:
        return {"containerd": mem([ctrd.pid]),
                "containerd-shim-runc-v2 (one per pod)": mem(ctrd.shims())}
    return sample


PROFILED = (("shoal_cri_request_seconds", "rpc", "CRI"),
            ("shoal_bus_request_handle_seconds", "subject", "handles"),
            ("shoal_supervisor_runtime_seconds", "op", "runs"))


def shoal_profile(services: h.ShoalServices) -> Callable[[], dict[str, tuple[float, float]]]:
    """(sum of seconds, count) of every CRI RPC, bus command handled and conmon/runc run,
    per service, from their /metrics."""
    def sample() -> dict[str, tuple[float, float]]:
        out: dict[str, tuple[float, float]] = {}
        for sp in services:
            page = h.scrape(sp.metrics_addr)
            for key, value in page.items():
                for name, label, verb in PROFILED:
                    for suffix, slot in (("_sum{", 0), ("_count{", 1)):
                        if key.startswith(name + suffix):
                            what = key.split(f'{label}="', 1)[1].split('"', 1)[0]
                            k = f"{sp.service}|{verb} {what}"
                            cur = list(out.get(k, (0.0, 0.0)))
                            cur[slot] = value
                            out[k] = (cur[0], cur[1])
        return out
    return sample


# --------------------------------------------------------------------------- report


def fmt(x: float) -> str:
    return f"{x:.3f}"


def report(args: argparse.Namespace, bench: Bench, command: str, meter: h.LoadMeter,
           leftovers: str) -> tuple[str, bool | None]:
    names = [rt.name for rt in bench.runtimes]
    seq = {n: [s for s in bench.starts if s.runtime == n and s.phase == "sequential"]
           for n in names}
    start_rows = []
    for n in names:
        totals = [s.total for s in seq[n]]
        start_rows.append((n, len(totals), fmt(statistics.median(totals)),
                           fmt(h.percentile(totals, 95)), fmt(min(totals)), fmt(max(totals)),
                           fmt(statistics.median(s.run for s in seq[n])),
                           fmt(statistics.median(s.create for s in seq[n])),
                           fmt(statistics.median(s.start for s in seq[n]))))
    stop_rows = []
    for n in names:
        stops = [s.seconds for s in bench.stops if s.runtime == n and s.phase == "sequential"]
        stop_rows.append((n, len(stops), fmt(statistics.median(stops)),
                          fmt(h.percentile(stops, 95)), fmt(max(stops))))
    burst_rows = []
    for n in names:
        mine = [b for b in bench.bursts if b.runtime == n]
        walls = [b.seconds for b in mine]
        lat = [s.total for s in bench.starts if s.runtime == n and s.phase.startswith("burst")]
        burst_rows.append((n, len(mine), f"{statistics.median(walls):.2f}",
                           f"{args.burst / statistics.median(walls):.1f}",
                           f"{args.burst / max(walls):.1f}", fmt(statistics.median(lat)),
                           fmt(h.percentile(lat, 95)),
                           f"{statistics.median(b.teardown for b in mine):.2f}"))
    medians = {n: statistics.median(s.total for s in seq[n]) for n in names}
    met: bool | None = None
    conclusion = ""
    if "shoal" in medians and "containerd" in medians:
        ratio = medians["shoal"] / medians["containerd"]
        met = ratio <= 1.0
        conclusion = (f"**Conclusion.** Target: Shoal's median pod start no slower than "
                      f"containerd's. Measured: {medians['shoal']:.3f} s against "
                      f"{medians['containerd']:.3f} s ({ratio:.2f} x) — **target "
                      f"{'met' if met else 'not met'}**.")
    memory = []
    whens = list(bench.memory)
    for n in names:
        groups = list(next((bench.memory[w][n] for w in whens if n in bench.memory[w]), {}))
        for g in groups:
            cells = []
            for w in whens:
                m = bench.memory[w].get(n, {}).get(g, Mem(0, 0, 0))
                cells.append(f"{m.rss / MiB:.0f}" + (f" ({m.count})" if "one per" in g else ""))
            memory.append((n, g, *cells))
        if groups:
            for what in ("rss", "pss"):
                totals = [sum(getattr(m, what) for m in bench.memory[w].get(n, {}).values())
                          / MiB for w in whens]
                memory.append((n, f"**total {what.upper()}**",
                               *(f"**{t:.0f}**" for t in totals)))
    versions = "; ".join(f"{rt.name}: {rt.version} (`{rt.socket}`)" for rt in bench.runtimes)
    out = [f"## {SECTION}", "",
           f"Command: `{command}`  ",
           f"Run: {meter.started:%Y-%m-%d %H:%M} UTC, {meter.minutes:.1f} min.  ",
           f"Machine: {h.machine()}; runc {runc_version()}, CNI plugins from "
           "containernetworking-plugins (bridge + host-local + portmap).  ",
           f"Runtimes: {versions}.  ",
           f"Load: {meter.result}.", "",
           "A plain CRI client (generated `runtime.v1` stubs) on each runtime's socket. "
           + (f"Runtimes already running, given with `--socket`; image `{args.image}`. "
              if args.socket else
              "Shoal: real nats-server and the five services as separate processes; "
              "containerd 1.6 (Debian) with its own config, root, state and socket, CRI "
              "plugin with the same local registry as a plain-HTTP mirror, the same pause "
              "image (catatonit -P), the same CNI chain on its own subnet and bridge, "
              "cgroupfs, `restrict_oom_score_adj` (root here lacks CAP_SYS_RESOURCE). ")
           + "All run side by side; measurements alternate between them (order flipped "
           "every pod or round). Images present (pulled and warmed up with "
           f"{args.warmup} pod(s) each). Pod start = RunPodSandbox + CreateContainer + "
           "StartContainer of busybox `sleep 3600` (no cgroup parent, default security "
           "context); stop+remove = StopContainer (timeout 0) + RemoveContainer + "
           "StopPodSandbox + RemovePodSandbox. p95 is nearest-rank.", "",
           f"### Pod start, {args.pods} pods one after another (all left running)", "",
           h.table(["runtime", "pods", "median s", "p95 s", "min s", "max s",
                    "RunPodSandbox s", "CreateContainer s", "StartContainer s"],
                   start_rows, "lrrrrrrrr"), "",
           "The last three columns are medians of each call.", "",
           f"### Stop + remove, the same {args.pods} pods one after another", "",
           h.table(["runtime", "pods", "median s", "p95 s", "max s"], stop_rows, "lrrrr"), "",
           f"### {args.burst} concurrent pod starts ({args.rounds} rounds per runtime)", "",
           h.table(["runtime", "rounds", "wall s (median)", "pods/s (median)",
                    "pods/s (worst)", "pod start median s", "pod start p95 s",
                    "concurrent stop+remove wall s"], burst_rows, "lrrrrrrr"), ""]
    if memory:
        out += ["### Memory (RSS, MiB)", "",
                f"VmRSS from /proc of each process: idle = no pods, after the warm-up; "
                f"sequential = all {args.pods} sequential pods running; concurrent = the "
                f"{args.burst} pods of the last concurrent round running. Shared pages "
                "count in every process's RSS. (n) = how many processes. The containers "
                "themselves (pause, sleep) are the same for both and not counted. PSS "
                "(from smaps_rollup) divides shared pages among their sharers: the fairer "
                "total when many copies of one binary run (shims, conmons).", "",
                h.table(["runtime", "process", *whens], memory, "ll" + "r" * len(whens)), ""]
    profile_rows = []
    for phase, per_rt in bench.profiles.items():
        for n, entries in per_rt.items():
            for key, (total, count) in sorted(entries.items(), key=lambda kv: -kv[1][0]):
                if count < 1 or total / count < 0.002:
                    continue  # not on this path, or negligible
                service, what = key.split("|", 1)
                profile_rows.append((phase, n, service, f"`{what}`", f"{count:.0f}",
                                     f"{total / count * 1000:.1f}"))
    if profile_rows:
        out += ["### Where Shoal's time goes (sequential phase)", "",
                "Means from the services' own /metrics over the sequential starts and over "
                "the sequential stop+removes: CRI RPCs in the gateway "
                "(`shoal_cri_request_seconds`), bus commands handled by each service "
                "(`shoal_bus_request_handle_seconds`) and conmon/runc runs in the supervisor "
                "(`shoal_supervisor_runtime_seconds`). Nested: a CRI RPC includes the "
                "commands it sends, which include their runc runs. Entries under 2 ms "
                "left out.", "",
                h.table(["phase", "runtime", "service", "what", "calls", "mean ms"],
                        profile_rows, "lllllr"), ""]
    out += [f"After the run: {leftovers}.", ""]
    if conclusion:
        out += [conclusion, ""]
    return "\n".join(out), met


def runc_version() -> str:
    out = subprocess.run(["runc", "--version"], capture_output=True, text=True, check=False)
    return out.stdout.split("\n", 1)[0].replace("runc version ", "") or "?"


# --------------------------------------------------------------------------- setup, main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Pod start latency (median, p95), concurrent pod start throughput, "
                    "stop+remove latency and memory through the CRI: by default Shoal "
                    "against containerd 1.6 (both started by this script), or any CRI "
                    "sockets given with --socket.")
    h.number(p, "--pods", 50, "pods started one after another per runtime")
    h.number(p, "--burst", 20, "pods started at once per round")
    h.number(p, "--rounds", 3, "concurrent rounds per runtime")
    h.number(p, "--warmup", 3, "unmeasured pods per runtime first")
    p.add_argument("--socket", action="append", default=[], metavar="NAME=PATH",
                   help="measure this running CRI endpoint instead of starting Shoal and "
                        "containerd; repeatable; needs --image; no memory figures")
    p.add_argument("--image", default="",
                   help="with --socket: the container image (the runtime pulls it first)")
    args = h.parse(p, argv, root="shoal-bench-pods")
    if min(args.pods, args.burst, args.rounds) < 1 or args.warmup < 0:
        p.error("--pods, --burst and --rounds must be >= 1")
    if args.socket and not args.image:
        p.error("--socket needs --image")
    for s in args.socket:
        if "=" not in s:
            p.error(f"--socket {s}: expected NAME=PATH")
    return args


def leftovers(root: Path, pod_ids: set[str]) -> str:
    """What this run left behind: processes, mounts (host namespace), netns of its pods."""
    found = []
    ancestors = set()
    pid = os.getpid()
    while pid > 1:  # whatever started this script (a shell, timeout) may name the root too
        ancestors.add(pid)
        pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    procs = [f"{h.process_name(p)}[{p}]" for p in h.pids_mentioning(str(root))
             if p not in ancestors]
    if procs:
        found.append("processes " + ", ".join(procs))
    mounts = h.mounts_under(root)
    if mounts:
        found.append("mounts " + ", ".join(mounts))
    netns = [n for n in os.listdir("/var/run/netns") if any(
        n == f"shoal-{pid[:32]}" for pid in pod_ids)] if os.path.isdir("/var/run/netns") else []
    if netns:
        found.append("netns " + ", ".join(netns))
    return ("left " + "; ".join(found)) if found else (
        "no process, mount or netns of this run left (checked /proc, /proc/self/mounts, "
        "/var/run/netns; containerd's netns and mounts lived in its private mount namespace)")


def measure(bench: Bench, made: set[str]) -> None:
    """Run `bench`, then close it (also when interrupted); every pod id it made goes into
    `made` whatever happened, for the leftover check."""
    try:
        h.run_loop(h.run_then_close(bench.run(), bench.close))
    finally:
        made.update(s.pod_id for s in bench.starts)
        for rt in bench.runtimes:
            made.update(rt.pods)


@contextlib.contextmanager
def session(root: Path, bridges: Sequence[str]) -> Iterator[None]:
    """SIGTERM as Ctrl-C; either ends the benchmark with 130, once what it started has
    stopped (the ExitStack inside); the CNI bridges it made are deleted in any case."""
    try:
        with h.sigterm_as_interrupt():
            yield
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"\ninterrupted; pods removed, every process stopped; files left in {root}",
              file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        for bridge in bridges:
            subprocess.run(["ip", "link", "delete", bridge], capture_output=True, check=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    meter, root, command = h.begin(__file__, args.root, argv)
    bench = Bench(args, root)
    all_pods: set[str] = set()
    with session(root, () if args.socket else (SHOAL_NET[1], CONTAINERD_NET[1])):
        with contextlib.ExitStack() as stack:
            services: h.ShoalServices | None = None
            ctrd: h.Containerd | None = None
            if args.socket:
                for s in args.socket:
                    name, _, path = s.partition("=")
                    bench.runtimes.append(Runtime(name, path, args.image))
            else:
                nats = stack.enter_context(h.NatsServer(root / "nats"))
                registry = stack.enter_context(Registry(root / "registry"))
                pause = f"{registry.host}/bench/pause:1"
                image = f"{registry.host}/bench/busybox:1"
                push(registry.url, "bench/pause", "1", pause_image())
                push(registry.url, "bench/busybox", "1", busybox_image())
                node = h.shoal_node(root / "shoal", nats.url)
                services = h.ShoalServices(node)
                stack.callback(services.stop_all)
                services.start_all(h.SHOAL_SERVICES, extra=[
                    "--set", f'cri.sandbox_image="{pause}"',
                    "--set", f'services.executor.pod_subnet="{SHOAL_NET[0]}"',
                    "--set", f'services.executor.cni_bridge="{SHOAL_NET[1]}"'])
                ctrd = h.Containerd(root / "containerd", h.CriSettings(
                    sandbox_image=pause, registry_host=registry.host,
                    subnet=CONTAINERD_NET[0], bridge=CONTAINERD_NET[1]))
                stack.callback(ctrd.stop)
                ctrd.start()
                assert nats.proc is not None
                bench.runtimes = [
                    Runtime("shoal", str(node.cri_socket), image,
                            shoal_rss(services, nats.proc.pid, node.root),
                            shoal_profile(services)),
                    Runtime("containerd", str(ctrd.socket), image, containerd_rss(ctrd))]
            measure(bench, all_pods)
    meter.stop()
    left = leftovers(root, all_pods) if not args.socket else "not checked (external runtimes)"
    print(left)
    (root / "runs.json").write_text(json.dumps({
        "starts": [asdict(s) for s in bench.starts], "stops": [asdict(s) for s in bench.stops],
        "bursts": [asdict(b) for b in bench.bursts],
        "memory": {w: {n: {g: asdict(m) for g, m in groups.items()} for n, groups in rts.items()}
                   for w, rts in bench.memory.items()},
        "profiles": bench.profiles}, indent=1))
    section, met = report(args, bench, command, meter, left)
    h.publish(section, met, heading=SECTION, root=root, update_docs=args.update_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
