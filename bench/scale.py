"""Per-service scaling: one workload against `shoal up --replicas <service>=N`, N = 1, 2, 4.

Workloads (the service under test is given with --service, repeatable or comma-separated):

- `puller`: `--concurrency` concurrent CRI PullImage calls of distinct images (each
  `--layers` layers of random, incompressible bytes, `--image-mb` MB in all, freshly pushed
  to a local registry, so nothing is cached). By default the snapshotter does not unpack
  them (`services.snapshotter.consume_events=false`), so the pull measures the puller
  alone; `--unpack` lets it unpack and waits for the unpacks between rounds.
- `cri-gateway`, `executor`, `supervisor`, `all` (every service): `--concurrency`
  concurrent pod starts through the CRI socket (RunPodSandbox + CreateContainer +
  StartContainer of busybox `sleep 3600`, images present, as bench/pods.py does them).

For every (service, N) a fresh `shoal up` (embedded secured NATS on a free port, every
metrics port free, its own state and run roots) runs `--rounds` rounds of the workload after
a warm-up; pods are stopped and removed after each round (not measured). The sweep is run
`--repeat` times, the order of N reversed every other time, so drift in the machine's load
favours no N. Per (service, N): throughput (operations / wall time of the rounds), p50 and
p95 latency of one operation, what every replica handled and its CPU (its /metrics), the
CPU of nats-server, the registry, the executor's and supervisor's subprocesses (`ip`, CNI
plugins, runc), the conmons (with their `runc create`) and this client (/proc), and how busy
the machine was, all over the timed rounds only. It prints markdown tables, writes them to
<root>/report.md (raw data in <root>/runs.json) and a PNG plot of throughput and p95 latency
against replicas, one line per workload; `--replot DIR` redraws an earlier run's plot.

Everything lives under one /tmp/shoal-bench-scale-<timestamp>/ (one sub-directory per run)
and nothing is deleted (on this ext4, creating files soon after deleting many is much slower
for minutes): delete it by hand (about 6 GB for the puller runs with the defaults). Pods use
their own subnet and bridge (deleted at the end). After SIGINT, each `shoal up` must exit 0;
the script checks that no process, mount or netns of the run is left. `--code head` runs
Shoal from a copy of the last commit, so edits to the working tree during the run (other
sessions) change nothing.

Needs matplotlib beyond the project: `.venv/bin/pip install -r bench/requirements.txt`.

    .venv/bin/python bench/scale.py                   # puller and executor, about 4 minutes
    .venv/bin/python bench/scale.py --service all --replicas 1,2 --rounds 2
    .venv/bin/python bench/scale.py --code head --plot docs/scaling.png \\
        --service puller,executor,supervisor,cri-gateway,all   # about 10 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _harness as h
import grpc
import pods
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc
from support.images import busybox_image, pause_image, push
from support.ports import free_port
from support.processes import Node, metrics_sets, shoal_up_argv
from support.registry import Registry

POD_SERVICES = ("cri-gateway", "executor", "supervisor", "all")
SERVICES = ("puller", *POD_SERVICES)
POD_NET = ("10.190.0.0/24", "shoalscale0")  # pod subnet, bridge: this benchmark's own
NODE_ID = "scale"
START_TIMEOUT = 240.0  # `shoal up` until every replica answers health (loaded machine)
STOP_TIMEOUT = 90.0
CALL_TIMEOUT = 300.0
UNPACK_TIMEOUT = 300.0
PULL_ATTEMPTS = 3
# Per-replica histograms read from /metrics: (metric, label, what the entry is called).
PROFILED = (("shoal_cri_request_seconds", "rpc", "CRI"),
            ("shoal_bus_request_handle_seconds", "subject", "handles"),
            ("shoal_supervisor_runtime_seconds", "op", "runs"))
# Entries shown in the "where the time goes" table, per workload.
STEPS = {
    "pull": ("CRI PullImage", "handles images.pull"),
    "pod start": ("CRI RunPodSandbox", "handles tasks.sandbox.create", "CRI CreateContainer",
                  "handles tasks.container.create", "CRI StartContainer",
                  "handles tasks.container.start", "handles monitor.create", "runs create",
                  "handles monitor.start"),
}
# CPU table columns: services (own CPU, /metrics), then processes read from /proc.
COMPONENTS = ("nats-server", "registry", "puller", "snapshotter", "executor", "supervisor",
              "cri-gateway", "executor's subprocesses", "supervisor's subprocesses",
              "conmon + runc create", "client")


def workload_of(service: str) -> str:
    return "pull" if service == "puller" else "pod start"


# --------------------------------------------------------------------------- results


@dataclass
class Op:
    round: int
    seconds: float
    parts: dict[str, float] = field(default_factory=dict)  # pod start: run, create, start


@dataclass
class Replica:
    """What one replica did during the measured rounds (deltas of its /metrics)."""

    name: str  # e.g. executor-1
    service: str
    cpu: float  # process_cpu_seconds_total
    entries: dict[str, tuple[float, float]]  # "handles tasks.sandbox.create" -> (sum s, count)

    @property
    def handled(self) -> int:
        """Commands and CRI RPCs it served (health and ping excluded)."""
        return round(sum(c for k, (_, c) in self.entries.items()
                         if k.split(" ", 1)[0] in ("handles", "CRI")
                         and not k.endswith((".health", ".ping"))))


@dataclass
class Run:
    """One `shoal up` (or, merged, every repetition of one service and N): what was
    measured during the timed phases only (pod teardown between rounds is left out)."""

    service: str
    replicas: int
    workload: str
    root: str
    repeat: int = 0
    ops: list[Op] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)  # wall time of each measured round
    replica_stats: dict[str, Replica] = field(default_factory=dict)
    proc_cpu: dict[str, float] = field(default_factory=dict)  # component -> CPU s (/proc)
    client_cpu: float = 0.0
    window: float = 0.0  # seconds measured (sum over the rounds)
    busy: float = 0.0  # all CPUs' busy core-seconds over the window
    loads: list[float] = field(default_factory=list)  # 1-min load average at each round
    errors: list[str] = field(default_factory=list)  # failed operations (attempts)
    start_seconds: float = 0.0  # `shoal up` until ready
    exit_code: int | None = None  # of `shoal up` after SIGINT
    pod_ids: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.workload} ({self.service} x N)"

    @property
    def throughput(self) -> float:
        return len(self.ops) / sum(self.walls) if self.walls else 0.0

    @property
    def busy_cores(self) -> float:
        return self.busy / self.window if self.window else 0.0

    def latency(self, q: float) -> float:
        return h.percentile([o.seconds for o in self.ops], q) if self.ops else 0.0

    def cpu_of(self, component: str) -> float:
        if component in self.proc_cpu:
            return self.proc_cpu[component]
        if component == "client":
            return self.client_cpu
        return sum(r.cpu for r in self.replica_stats.values() if r.service == component)

    def mean_ms(self, entry: str) -> tuple[float, int]:
        stats = self.replica_stats.values()
        total = sum(r.entries.get(entry, (0.0, 0.0))[0] for r in stats)
        count = sum(r.entries.get(entry, (0.0, 0.0))[1] for r in stats)
        return (total / count * 1000 if count else 0.0), round(count)

    def add(self, replicas: list[Replica]) -> None:
        for r in replicas:
            mine = self.replica_stats.setdefault(r.name, Replica(r.name, r.service, 0.0, {}))
            mine.cpu += r.cpu
            for k, (total, count) in r.entries.items():
                t0, c0 = mine.entries.get(k, (0.0, 0.0))
                mine.entries[k] = (t0 + total, c0 + count)


def merge(runs: list[Run]) -> Run:
    """Every repetition of one (service, N) as one run: operations pooled, sums added."""
    first = runs[0]
    out = Run(first.service, first.replicas, first.workload, first.root)
    for r in runs:
        out.ops += r.ops
        out.walls += r.walls
        out.add(list(r.replica_stats.values()))
        for k, v in r.proc_cpu.items():
            out.proc_cpu[k] = out.proc_cpu.get(k, 0.0) + v
        out.client_cpu += r.client_cpu
        out.window += r.window
        out.busy += r.busy
        out.loads += r.loads
        out.errors += r.errors
    return out


# --------------------------------------------------------------------------- shoal up


class ShoalUp:
    """`shoal up` as a subprocess (own session, dies with this process), its files under
    `root`; ready once the launcher wrote its file-SD targets (after every replica answered
    health)."""

    def __init__(self, root: Path, replicas: dict[str, int], extra: Sequence[str],
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.replicas = replicas
        self.extra = list(extra)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.targets: dict[str, list[str]] = {}  # service -> metrics addr of replica i
        # Its roots and socket, where shoal_up_argv puts them (its NATS is its own).
        self.node = Node(NODE_ID, "", root)
        self.log_path = root / "shoal-up.log"

    def argv(self) -> list[str]:
        sets = [f"nats.embedded.listen=127.0.0.1:{free_port()}",
                f"launcher.ready_timeout={START_TIMEOUT}", "log.format=json",
                f'services.executor.pod_subnet="{POD_NET[0]}"',
                f'services.executor.cni_bridge="{POD_NET[1]}"', *metrics_sets(), *self.extra]
        replicas = [a for service, n in self.replicas.items()
                    for a in ("--replicas", f"{service}={n}")]
        return shoal_up_argv(self.root, NODE_ID, sets, *replicas)

    async def start(self) -> float:
        """Start (from the main thread: see h.spawn) and wait until ready; the seconds."""
        t0 = time.monotonic()
        self.proc = h.spawn(self.argv(), self.log_path, env=self.env)
        targets = self.node.run_root / "prometheus-targets.json"
        while not targets.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"shoal up exited {self.proc.returncode}; see "
                                   f"{self.log_path}")
            if time.monotonic() - t0 > START_TIMEOUT + 10:
                raise RuntimeError(f"shoal up not ready after {START_TIMEOUT:g} s; see "
                                   f"{self.log_path}")
            await asyncio.sleep(0.2)
        groups = json.loads(targets.read_text())
        self.targets = {g["labels"]["service"]: g["targets"] for g in groups}
        return time.monotonic() - t0

    def pid_of(self, comm: str) -> int | None:
        found = h.pids_mentioning(str(self.node.run_root), comm=comm)
        return found[0] if found else None

    async def stop(self) -> int | None:
        """SIGINT, as Ctrl-C would: the launcher stops every service, then NATS, and exits 0.
        Its exit code (None if it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGINT)
        try:
            return await asyncio.to_thread(self.proc.wait, STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"  shoal up did not exit within {STOP_TIMEOUT:g} s after SIGINT; killing",
                  file=sys.stderr)
            await asyncio.to_thread(h.stop_process, self.proc, 20)
            return None


# replica -> (CPU seconds, {entry: (sum s, count)})
Profile = dict[str, tuple[float, dict[str, tuple[float, float]]]]
# A measurement window's start: monotonic time, CPU ticks, own CPU, profile, nats CPU.
Mark = tuple[float, tuple[int, int], float, Profile, dict[tuple[str, int], float]]


def profile(up: ShoalUp) -> Profile:
    """Every replica's CPU seconds and (sum, count) of its PROFILED histograms, by replica."""
    out: Profile = {}
    for service, addrs in up.targets.items():
        if service == "launcher":
            continue
        for i, addr in enumerate(addrs):
            page = h.scrape(addr)
            entries: dict[str, list[float]] = {}
            for key, value in page.items():
                for name, label, verb in PROFILED:
                    for suffix, slot in (("_sum{", 0), ("_count{", 1)):
                        if key.startswith(name + suffix) and f'{label}="' in key:
                            what = key.split(f'{label}="', 1)[1].split('"', 1)[0]
                            entries.setdefault(f"{verb} {what}", [0.0, 0.0])[slot] += value
            out[f"{service}-{i}"] = (h.metric(page, "process_cpu_seconds_total"),
                                     {k: (v[0], v[1]) for k, v in entries.items()})
    return out


def delta(before: Profile, after: Profile) -> list[Replica]:
    out = []
    for name, (cpu, entries) in after.items():
        cpu0, entries0 = before.get(name, (0.0, {}))
        diff = {k: (v[0] - entries0.get(k, (0.0, 0.0))[0], v[1] - entries0.get(k, (0.0, 0.0))[1])
                for k, v in entries.items()}
        out.append(Replica(name, name.rsplit("-", 1)[0], cpu - cpu0,
                           {k: v for k, v in diff.items() if v[1] > 0}))
    return out


def stat_cpu(pid: int) -> tuple[float, float]:
    """(own, reaped children's) user + system CPU seconds of a process, from /proc."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0, 0.0
    tck = os.sysconf("SC_CLK_TCK")
    return (int(f[11]) + int(f[12])) / tck, (int(f[13]) + int(f[14])) / tck


def replica_of(pid: int) -> str:
    """The --replica-id of a Shoal service process ("" if not one)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return ""
    return argv[argv.index("--replica-id") + 1] if "--replica-id" in argv else ""


def proc_sample(up: ShoalUp, registry: Registry | None) -> dict[tuple[str, int], float]:
    """CPU seconds so far by (component, pid), from /proc: nats-server, the registry, the
    subprocesses the executor and supervisor ran and reaped (ip, mount, CNI plugins; runc
    start/state/kill...), and every conmon with the `runc create` it ran."""
    out: dict[tuple[str, int], float] = {}
    nats = up.pid_of("nats-server")
    if nats:
        out[("nats-server", nats)] = sum(stat_cpu(nats))
    if registry is not None and registry.log_path is not None:
        for pid in h.pids_mentioning(str(registry.log_path.parent)):
            out[("registry", pid)] = sum(stat_cpu(pid))
    for pid in h.pids_mentioning(str(up.node.run_root)):
        comm = h.process_name(pid)
        if comm.startswith("conmon"):
            out[("conmon + runc create", pid)] = sum(stat_cpu(pid))
            continue
        service = replica_of(pid).rsplit("-", 1)[0]
        if service in ("executor", "supervisor"):
            out[(f"{service}'s subprocesses", pid)] = stat_cpu(pid)[1]
    return out


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------- workloads


class Scale:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.registry: Registry | None = None
        self.runs: list[Run] = []
        self.pause = ""
        self.busybox = ""
        self.current: ShoalUp | None = None
        self.env: dict[str, str] | None = None  # for `shoal up`: PYTHONPATH with --code head
        self.code = "working tree"

    @property
    def reg(self) -> Registry:
        assert self.registry is not None
        return self.registry

    async def run_all(self) -> None:
        self.pause = f"{self.reg.host}/scale/pause:1"
        self.busybox = f"{self.reg.host}/scale/busybox:1"
        await asyncio.to_thread(push, self.reg.url, "scale/pause", "1", pause_image())
        await asyncio.to_thread(push, self.reg.url, "scale/busybox", "1", busybox_image())
        # Repetitions alternate the order of N (1,2,4 then 4,2,1), so a drift in the
        # machine's load (other sessions) does not favour one end.
        for rep in range(self.args.repeat):
            order = self.args.replicas if rep % 2 == 0 else self.args.replicas[::-1]
            for service in self.args.service:
                for n in order:
                    await self.run_one(service, n, rep)

    def use_head(self) -> None:
        """Run Shoal from a copy of the last commit's libs/ and services/ (PYTHONPATH puts
        it before the editable installs): edits made to the working tree while the benchmark
        runs (other sessions) then change nothing."""
        commit = subprocess.run(["git", "-C", str(h.REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        code = self.root / "code"
        code.mkdir()
        archive = subprocess.run(["git", "-C", str(h.REPO), "archive", "HEAD", "libs",
                                  "services"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
        paths = sorted(str(p) for p in code.glob("*/*/src"))
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        self.code = f"commit {commit} (`git archive HEAD`, working-tree edits left out)"

    async def push_images(self, prefix: str, count: int) -> list[str]:
        """`count` distinct images of random layers; their references."""
        size = round(self.args.image_mb * h.MB / self.args.layers)
        refs = []
        for i in range(count):
            repo = f"scale/{prefix}-{i}"
            layers = await asyncio.to_thread(h.random_layers, [size] * self.args.layers)
            await asyncio.to_thread(h.push_image, self.reg.url, repo, "1", layers)
            refs.append(f"{self.reg.host}/{repo}:1")
        return refs

    async def run_one(self, service: str, n: int, rep: int) -> None:
        args = self.args
        run = Run(service, n, workload_of(service),
                  str(self.root / f"{service}-n{n}-rep{rep + 1}"), rep)
        self.runs.append(run)
        replicas = ({s: n for s in h.SHOAL_SERVICES} if service == "all" else {service: n})
        extra = [f'cri.sandbox_image="{self.pause}"']
        images: list[str] = []
        if service == "puller":
            print(f"{service} x{n}: pushing {args.rounds * args.concurrency + 1} images",
                  flush=True)
            images = await self.push_images(f"n{n}-rep{rep + 1}-{uuid.uuid4().hex[:6]}",
                                            args.rounds * args.concurrency + 1)
            if not args.unpack:
                extra.append("services.snapshotter.consume_events=false")
        up = ShoalUp(Path(run.root), replicas, extra, self.env)
        self.current = up
        try:
            run.start_seconds = await up.start()
            print(f"{service} x{n}: shoal up ready in {run.start_seconds:.1f} s "
                  f"({sum(len(a) for s, a in up.targets.items() if s != 'launcher')} "
                  "service processes)", flush=True)
            if service == "puller":
                await self.pull_rounds(run, up, images)
            else:
                await self.pod_rounds(run, up)
        finally:
            self.current = None
            run.exit_code = await up.stop()
            print(f"{service} x{n}: shoal up exited {run.exit_code}", flush=True)
        if run.ops:
            print(f"{service} x{n}: {len(run.ops)} ops, {run.throughput:.2f} ops/s, "
                  f"p50 {run.latency(50):.3f} s, p95 {run.latency(95):.3f} s", flush=True)

    def begin(self, up: ShoalUp) -> Mark:
        return (time.monotonic(), h.cpu_ticks(), own_cpu(), profile(up),
                proc_sample(up, self.registry))

    def end(self, run: Run, up: ShoalUp, start: Mark) -> None:
        """Add what happened since `start` (a timed phase) to the run."""
        t0, ticks0, cpu0, prof0, procs0 = start
        elapsed = time.monotonic() - t0
        ticks = h.cpu_ticks()
        share = (ticks[0] - ticks0[0]) / max(1, ticks[1] - ticks0[1])
        run.window += elapsed
        run.busy += share * (os.cpu_count() or 1) * elapsed
        run.client_cpu += own_cpu() - cpu0
        for (group, pid), cpu in proc_sample(up, self.registry).items():
            # A process that is new since `start` (a conmon) counts from zero.
            used = cpu - procs0.get((group, pid), 0.0)
            run.proc_cpu[group] = run.proc_cpu.get(group, 0.0) + used
        run.add(delta(prof0, profile(up)))

    async def pull_rounds(self, run: Run, up: ShoalUp, images: list[str]) -> None:
        args = self.args
        channel = grpc.aio.insecure_channel(f"unix://{up.node.cri_socket}")
        img = cri_grpc.ImageServiceStub(channel)
        unpacked_layers = 0

        async def pull(ref: str) -> float | None:
            """Seconds until the image is pulled, retries included (as kubelet retries);
            None if every attempt failed. Each failed attempt is counted."""
            t0 = time.perf_counter()
            for _ in range(PULL_ATTEMPTS):
                try:
                    await img.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=ref)),
                                        timeout=CALL_TIMEOUT)
                    return time.perf_counter() - t0
                except grpc.aio.AioRpcError as exc:
                    run.errors.append(f"PullImage: {exc.code().name}: {exc.details()}")
            return None

        async def wait_unpacked() -> None:
            if not args.unpack:
                return
            end = time.monotonic() + UNPACK_TIMEOUT
            while time.monotonic() < end:
                pages = await asyncio.to_thread(lambda: [h.scrape(a) for a in
                                                         up.targets["snapshotter"]])
                if sum(h.metric(p, "shoal_snapshotter_layers_unpacked_total")
                       for p in pages) >= unpacked_layers:
                    return
                await asyncio.sleep(0.5)
            raise RuntimeError(f"unpacks not done within {UNPACK_TIMEOUT:g} s")

        try:
            if await pull(images[0]) is None:  # warm-up: connections, first round trips
                raise RuntimeError(f"warm-up pull failed: {run.errors[-1]}")
            run.errors.clear()
            unpacked_layers += args.layers
            await wait_unpacked()
            for r in range(args.rounds):
                batch = images[1 + r * args.concurrency:1 + (r + 1) * args.concurrency]
                run.loads.append(os.getloadavg()[0])
                mark = await asyncio.to_thread(self.begin, up)
                t0 = time.perf_counter()
                times = await asyncio.gather(*(pull(ref) for ref in batch))
                run.walls.append(time.perf_counter() - t0)
                await asyncio.to_thread(self.end, run, up, mark)
                run.ops += [Op(r, s) for s in times if s is not None]
                print(f"  round {r + 1}: {len(batch)} pulls in {run.walls[-1]:.2f} s "
                      f"({len(run.errors)} failed attempts so far)", flush=True)
                unpacked_layers += args.layers * len(batch)
                await wait_unpacked()
        finally:
            await channel.close()

    async def pod_rounds(self, run: Run, up: ShoalUp) -> None:
        args = self.args
        bench = pods.Bench(argparse.Namespace(), Path(run.root))
        rt = pods.Runtime("shoal", str(up.node.cri_socket), self.busybox)
        try:
            await bench.connect(rt)  # pulls busybox; the first pod pulls the pause image
            for _ in range(args.warmup):
                p = await bench.start_pod(rt, "warmup")
                await bench.stop_pod(rt, p.pod_id, p.container_id)
            await asyncio.sleep(1)  # let the warm-up's unpack and exit events settle
            for r in range(args.rounds):
                run.loads.append(os.getloadavg()[0])
                mark = await asyncio.to_thread(self.begin, up)
                t0 = time.perf_counter()
                results = await asyncio.gather(*(bench.start_pod(rt, f"r{r}")
                                                 for _ in range(args.concurrency)),
                                               return_exceptions=True)
                run.walls.append(time.perf_counter() - t0)
                await asyncio.to_thread(self.end, run, up, mark)
                started = [p for p in results if isinstance(p, pods.PodStart)]
                for exc in results:
                    if isinstance(exc, grpc.aio.AioRpcError):  # counted; removed at close
                        run.errors.append(f"pod start: {exc.code().name}: {exc.details()}")
                    elif isinstance(exc, BaseException):
                        raise exc
                run.ops += [Op(r, p.total, {"run": p.run, "create": p.create,
                                            "start": p.start}) for p in started]
                run.pod_ids += [p.pod_id for p in started]
                t1 = time.perf_counter()
                await asyncio.gather(*(bench.stop_pod(rt, p.pod_id, p.container_id)
                                       for p in started))
                teardown = time.perf_counter() - t1
                print(f"  round {r + 1}: {len(started)} pods in {run.walls[-1]:.2f} s, "
                      f"removed in {teardown:.2f} s", flush=True)
        finally:
            run.pod_ids += list(rt.pods)
            await bench.close()  # removes whatever pod of ours is left


# --------------------------------------------------------------------------- report


def merged(scale: Scale) -> list[Run]:
    """One run per (service, N), repetitions pooled, in the order of the arguments."""
    out = []
    for service in scale.args.service:
        for n in sorted(scale.args.replicas):
            runs = [r for r in scale.runs if r.service == service and r.replicas == n and r.ops]
            if runs:
                out.append(merge(runs))
    return out


def errors_summary(runs: list[Run]) -> list[str]:
    counts: dict[str, int] = {}
    for r in runs:
        for e in r.errors:
            counts[f"{r.service} x{r.replicas}: {e}"] = counts.get(
                f"{r.service} x{r.replicas}: {e}", 0) + 1
    if not counts:
        return ["No operation failed.", ""]
    return ["Failed attempts:", "", *(f"- {n} x {e}" for e, n in sorted(counts.items())), ""]


def steps_tables(runs: list[Run]) -> list[str]:
    """Mean ms per call of each STEPS entry: one table per workload, a row per (service, N)."""
    out = []
    for workload, entries in STEPS.items():
        rows = [(r.service, r.replicas, *(f"{r.mean_ms(e)[0]:.0f}" for e in entries))
                for r in runs if r.workload == workload]
        if rows:
            out += [h.table(["under test", "N", *(f"`{e}`" for e in entries)], rows,
                            "lr" + "r" * len(entries)), ""]
    return out


def header(command: str, meter: h.LoadMeter, code: str) -> list[str]:
    return [f"Command: `{command}`  ",
            f"Run: {meter.started:%Y-%m-%d %H:%M} UTC, {meter.minutes:.1f} min.  ",
            f"Machine: {h.machine()}; runc {pods.runc_version()}.  ",
            f"Code: {code}.  ",
            f"Load: {meter.result}.", ""]


def report(args: argparse.Namespace, scale: Scale, head: list[str], leftovers: str) -> str:
    runs = merged(scale)
    size = f"{args.layers} layers of {args.image_mb / args.layers:g} MB"
    main_rows = []
    for r in runs:
        base = next((b for b in runs if b.service == r.service and b.replicas == 1), None)
        per_rep = [x.throughput for x in scale.runs
                   if x.service == r.service and x.replicas == r.replicas and x.ops]
        main_rows.append((r.workload, r.service, r.replicas, len(r.ops), len(r.errors),
                          f"{r.throughput:.2f}", " / ".join(f"{t:.2f}" for t in per_rep),
                          f"{r.throughput / base.throughput:.2f}" if base else "-",
                          f"{r.latency(50):.3f}", f"{r.latency(95):.3f}",
                          f"{r.busy_cores:.2f}", f"{statistics.mean(r.loads):.1f}"))
    dist_rows = []
    for r in runs:
        tested = h.SHOAL_SERVICES if r.service == "all" else (r.service,)
        for svc in tested:
            mine = sorted((x for x in r.replica_stats.values() if x.service == svc),
                          key=lambda x: x.name)
            reps = [sorted((x for x in one.replica_stats.values() if x.service == svc),
                           key=lambda x: x.name)
                    for one in scale.runs if (one.service, one.replicas) == (r.service,
                                                                          r.replicas)]
            dist_rows.append((r.service, r.replicas, svc,
                              " · ".join(" / ".join(str(x.handled) for x in rep)
                                         for rep in reps),
                              " / ".join(f"{x.cpu:.2f}" for x in mine),
                              f"{sum(x.cpu for x in mine) / r.window:.0%}"))
    cpu_rows = []
    for r in runs:
        known = sum(r.cpu_of(c) for c in COMPONENTS)
        cells = [f"{r.cpu_of(c) / r.window:.0%}" for c in COMPONENTS]
        other = max(0.0, r.busy - known)
        cpu_rows.append((r.service, r.replicas, f"{r.window:.1f}", *cells,
                         f"{other / r.window:.0%}", f"{r.busy_cores:.0%}"))
    exits = sorted({r.exit_code for r in scale.runs}, key=str)
    starts = [r.start_seconds for r in scale.runs if r.start_seconds]
    out = [
        *head,
        f"Workloads, at a concurrency of {args.concurrency}: {args.repeat} repetition(s) of "
        f"the sweep (order of N alternating), each (service, N) a fresh `shoal up "
        f"--replicas <service>=N` ({len(scale.runs)} in all, ready in "
        f"{min(starts, default=0):.0f}-{max(starts, default=0):.0f} s), {args.rounds} measured "
        f"round(s) of {args.concurrency} operations each after a warm-up. **pull** = CRI "
        f"PullImage of distinct images ({size}, random bytes, uncompressed tar, from a local "
        "registry; unpack "
        + ("included: the next round waits for the snapshotter" if args.unpack else
           "off: `services.snapshotter.consume_events=false`")
        + "); **pod start** = RunPodSandbox + CreateContainer + StartContainer of busybox "
        "`sleep 3600` through the CRI socket, images present (pods removed after each round, "
        "not measured). `all` = every service at N replicas. Throughput = operations / wall "
        "time of the rounds; latency of one operation, p50 and p95 nearest-rank over all "
        "repetitions.", "",
        h.table(["workload", "under test", "N", "ops", "failed", "ops/s", "ops/s per repetition",
                 "÷ N=1", "p50 s", "p95 s", "busy cores", "load"], main_rows,
                "llrrrrrrrrrr"), "",
        "Failed = failed attempts: a failed pull is retried (up to "
        f"{PULL_ATTEMPTS} attempts, its latency includes them, as kubelet retries); a failed "
        "pod start is not retried and not counted in ops. "
        "Busy cores = all CPUs' busy time during the measured rounds / their wall time (2.00 = "
        "the whole machine, other sessions' work included); load = mean 1-minute load "
        "average at the start of the rounds.",
        "",
        "### How the work spread over the replicas",
        "",
        "Commands and CRI RPCs each replica handled (health excluded; replica 0 first, one "
        "group per repetition, separated by ·) and its CPU seconds "
        "(process_cpu_seconds_total, repetitions added) during the measured rounds; the last "
        "column is the service's CPU as a share of one core.", "",
        h.table(["under test", "N", "service", "handled per replica", "CPU s per replica",
                 "CPU (one core)"], dist_rows, "lrllll"), "",
        "### CPU by component during the measured rounds (share of one core)", "",
        "Services: their own CPU summed over their replicas (/metrics). From /proc: "
        "nats-server, the registry, the subprocesses the executor and the supervisor ran and "
        "reaped (`ip netns`, `mount`, CNI plugins; `runc start`, `runc state`...), every "
        "conmon with the `runc create` it ran, and this client. Other = the rest of the "
        "machine's busy time: the kernel's own work (loopback, file systems), processes not "
        "yet reaped, and other sessions' work. Machine = all CPUs' busy time (200% = both "
        "cores).", "",
        h.table(["under test", "N", "measured s", *COMPONENTS, "other", "machine"],
                cpu_rows, "lr" + "r" * (len(COMPONENTS) + 3)), "",
        "### Where the time goes", "",
        "Mean per call over the measured rounds, from every replica's /metrics "
        "(`shoal_cri_request_seconds`, `shoal_bus_request_handle_seconds`, "
        "`shoal_supervisor_runtime_seconds`). Nested: an RPC includes the commands it sends; a "
        "pod start sends `monitor.create` and `monitor.start` twice (pause and container).",
        "",
        *steps_tables(runs),
        *errors_summary(scale.runs),
        f"`shoal up` exit codes after SIGINT: {', '.join(map(str, exits))}. After the run: "
        f"{leftovers}.", ""]
    return "\n".join(out)


def plot(scale: Scale, path: Path, concurrency: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = merged(scale)
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    labels = list(dict.fromkeys(r.label for r in runs))
    for i, label in enumerate(labels):
        mine = sorted((r for r in runs if r.label == label), key=lambda r: r.replicas)
        # Lines side by side (log x: a factor), so the range bars do not hide each other.
        xs = [r.replicas * 1.04 ** (i - (len(labels) - 1) / 2) for r in mine]
        ys = [r.throughput for r in mine]
        # Bars: the lowest and highest throughput of a single repetition.
        reps = [[x.throughput for x in scale.runs
                 if (x.service, x.replicas) == (r.service, r.replicas) and x.ops] for r in mine]
        yerr = [[y - min(t) for y, t in zip(ys, reps, strict=True)],
                [max(t) - y for y, t in zip(ys, reps, strict=True)]]
        ax_t.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, label=label)
        ax_l.plot(xs, [r.latency(95) for r in mine], marker="o", label=label)
    replicas = sorted({r.replicas for r in runs})
    for ax, title in ((ax_t, f"throughput (ops/s), {concurrency} concurrent; bars: "
                             "repetitions' range"),
                      (ax_l, "p95 latency of one operation (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(replicas, [str(n) for n in replicas])
        ax.set_xlabel("replicas of the service under test")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def _list(text: str, allowed: Sequence[str] | None = None) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    for item in items:
        if allowed is not None and item not in allowed:
            raise argparse.ArgumentTypeError(f"{item!r} is not one of {', '.join(allowed)}")
    return items


def _replicas(text: str) -> list[int]:
    try:
        values = [int(v) for v in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError("expected numbers, e.g. 1,2,4") from None
    if not values or not all(1 <= v <= 16 for v in values):
        raise argparse.ArgumentTypeError("replica counts are 1..16")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Throughput and p50/p95 latency of a workload against 1, 2, 4 replicas "
                    "of one Shoal service (a fresh `shoal up --replicas` each); a table and a "
                    "PNG plot. Needs matplotlib (pip install -r bench/requirements.txt).")
    p.add_argument("--service", action="append", type=lambda s: _list(s, SERVICES),
                   metavar="NAME",
                   help="service under test: puller (concurrent pulls) or cri-gateway, "
                        "executor, supervisor, all (concurrent pod starts); repeatable or "
                        "comma-separated (default: puller,executor)")
    p.add_argument("--replicas", type=_replicas, default=[1, 2, 4],
                   help="replica counts (default: 1,2,4)")
    h.number(p, "--concurrency", 8, "operations in flight at once")
    h.number(p, "--rounds", 3, "measured rounds of --concurrency operations per run")
    h.number(p, "--repeat", 2, "repetitions of the whole sweep, each with a fresh `shoal up` "
             "per service and N, in alternating order of N")
    h.number(p, "--warmup", 2, "unmeasured pods started and removed first")
    h.number(p, "--image-mb", 20.0, "pull workload: size of each image in MB")
    h.number(p, "--layers", 4, "pull workload: layers per image")
    p.add_argument("--unpack", action="store_true",
                   help="pull workload: let the snapshotter unpack (waited for between rounds)")
    p.add_argument("--code", choices=("tree", "head"), default="tree",
                   help="run Shoal from the working tree (default) or from a copy of the "
                        "last commit, immune to edits made while it runs")
    p.add_argument("--root", type=Path, default=None,
                   help="where state goes (default: /tmp/shoal-bench-scale-<timestamp>); "
                        "never deleted")
    p.add_argument("--replot", type=Path, default=None, metavar="DIR",
                   help="run nothing: redraw the plot and print the tables of an earlier "
                        "run's directory (its runs.json and report.md)")
    p.add_argument("--plot", type=Path, default=None,
                   help="PNG to write (default: <root>/scaling.png)")
    args = p.parse_args(argv)
    args.service = [s for group in (args.service or [["puller", "executor"]]) for s in group]
    if min(args.concurrency, args.rounds, args.layers, args.repeat) < 1 or args.warmup < 0:
        p.error("--concurrency, --rounds, --repeat, --layers must be >= 1, --warmup >= 0")
    if args.image_mb <= 0:
        p.error("--image-mb must be > 0")
    return args


async def scale_main(scale: Scale) -> None:
    async def stop_current() -> None:
        if scale.current is not None:  # interrupted: stop the `shoal up` in flight
            await asyncio.shield(scale.current.stop())

    await h.run_then_close(scale.run_all(), stop_current)


def load_runs(path: Path) -> list[Run]:
    """The runs a benchmark wrote to runs.json."""
    runs = []
    for d in json.loads(path.read_text()):
        d["ops"] = [Op(**o) for o in d["ops"]]
        d["replica_stats"] = {k: Replica(v["name"], v["service"], v["cpu"], {
            e: (x[0], x[1]) for e, x in v["entries"].items()})
            for k, v in d["replica_stats"].items()}
        runs.append(Run(**d))
    return runs


def replot(directory: Path, plot_path: Path | None) -> int:
    """Redraw the plot and print the tables of an earlier run (its runs.json, and its
    settings from the command recorded in its report.md)."""
    head = (directory / "report.md").read_text().split("\n\n", 1)[0].splitlines()
    command = shlex.split(head[0].removeprefix("Command: ").strip(" `"))
    args = parse_args(command[2:])
    scale = Scale(args, directory)
    scale.runs = load_runs(directory / "runs.json")
    print(report(args, scale, [*head, "", f"(Re-rendered from {directory}/runs.json.)", ""],
                 "see the original report"))
    png = plot_path or directory / "scaling.png"
    plot(scale, png, args.concurrency)
    print(f"plot in {png}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        return replot(args.replot, args.plot)
    meter, root, command = h.begin(__file__, args.root, argv)
    scale = Scale(args, root)
    if args.code == "head":
        scale.use_head()
    try:
        with h.sigterm_as_interrupt(), Registry(root / "registry") as registry:
            scale.registry = registry
            h.run_loop(scale_main(scale))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"\ninterrupted; pods removed, shoal up stopped; files left in {root}",
              file=sys.stderr)
        return 130
    finally:
        subprocess.run(["ip", "link", "delete", POD_NET[1]], capture_output=True, check=False)
    meter.stop()
    left = pods.leftovers(root, {p for r in scale.runs for p in r.pod_ids})
    print(left)
    (root / "runs.json").write_text(json.dumps([asdict(r) for r in scale.runs], indent=1))
    text = report(args, scale, header(command, meter, scale.code), left)
    (root / "report.md").write_text(text)
    print("\n" + text)
    png = args.plot or root / "scaling.png"
    plot(scale, png, args.concurrency)
    print(f"plot in {png}; report in {root / 'report.md'}; raw results in "
          f"{root / 'runs.json'}; state left in {root} (delete it by hand)")
    bad = [f"{r.service}x{r.replicas}" for r in scale.runs if r.exit_code != 0]
    if bad:
        print(f"shoal up did not exit 0 for {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
