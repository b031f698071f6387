"""Issue #14's table in one run: Shoal (`shoal up`, default settings) against containerd 1.6,
side by side, measurements interleaved (the order flipped every pod, round or repetition).

Real parts only: a registry (docker-registry) with the pause image (catatonit -P), busybox
and the pull images; `shoal up` as users run it (launcher, preloaded zygote, embedded
nats-server, every service forked from it) on its own state and run roots, its own NATS and
metrics ports, pod subnet and bridge, and the registry's pause image; a throwaway containerd
(Debian's 1.6, _harness.Containerd: own config, root, state and socket, CRI plugin with the
registry as a plain-HTTP mirror, the same pause image and CNI chain on its own subnet and
bridge). One plain CRI client (bench/pods.py) drives both:

1. warm-up pods (unmeasured), then PSS idle: every runtime process, from smaps_rollup;
2. `--pods` pods one after another per runtime: RunPodSandbox + CreateContainer +
   StartContainer of busybox `sleep 3600`; PSS with them all running; then teardown of each
   (StopContainer 0 + RemoveContainer + StopPodSandbox + RemovePodSandbox);
3. `--rounds` rounds of `--burst` concurrent pod starts per runtime: wall time;
4. `--pods` job pods per runtime: RunPodSandbox + CreateContainer + StartContainer of busybox
   `true`, then ContainerStatus every `--poll` seconds until it says EXITED;
5. `--repetitions` cold pulls per runtime, each of a new image (a nonce in every layer): the
   ~208 MB five-layer gzip image of host file trees of bench/pull_unpack.py, a static
   busybox in its top layer; PullImage + RunPodSandbox + CreateContainer + StartContainer of
   `/bin/busybox sleep 3600` in it, after an untimed `sync`.

Shoal's processes: the launcher, everything it started (zygote, nats-server, services and
their workers) and every conmon of its root; containerd's: containerd and its shims. The
containers themselves (pause, sleep) are the same for both and not counted.

Every pod is removed at the end (also after Ctrl-C), both runtimes stop, the two bridges are
deleted, and the script checks that no netns, mount or process of this run is left. One
state root per invocation (/tmp/shoal-bench-ab-<timestamp>); nothing deleted (the ext4 trap:
see docs/benchmarks.md), about 6 GB with the defaults.

    .venv/bin/python bench/ab.py                # about 7 minutes
    .venv/bin/python bench/ab.py --update-docs  # and rewrite its docs/benchmarks.md section
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import _harness as h
import pods
import pull_unpack
from cri_api.v1 import api_pb2 as cri
from footprint import children_of, label
from support.images import BUSYBOX_PATH, busybox_image, pause_image, push
from support.ports import free_port
from support.processes import metrics_sets, shoal_up_argv
from support.registry import Registry

SECTION = "A/B against containerd (issue #14's table)"
MiB = 1 << 20
SHOAL_NET = ("10.203.0.0/24", "shoalab")  # pod subnet, bridge
CONTAINERD_NET = ("10.204.0.0/24", "ctrdab")
SLEEP = ("/bin/busybox", "sleep", "3600")  # in the pull image (it has no /bin/sh applets)
SHOAL_UP_READY = 180.0  # seconds for every replica to answer health on a loaded machine


# --------------------------------------------------------------------------- Shoal


class ShoalUp:
    """`shoal up` with default settings except what must differ beside other nodes on this
    machine (ports, pod subnet and bridge) and the registry's pause image (as containerd's);
    its own state and run roots under `root`."""

    def __init__(self, root: Path, pause: str) -> None:
        self.root = root
        self.pause = pause
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "shoal-up.log"

    @property
    def cri_socket(self) -> Path:
        return self.root / "run" / "cri.sock"

    def start(self) -> None:
        """From the main thread (see _harness.spawn)."""
        argv = shoal_up_argv(self.root, "ab", [
            f"nats.embedded.listen=127.0.0.1:{free_port()}", *metrics_sets(),
            f'cri.sandbox_image="{self.pause}"',
            f'services.executor.pod_subnet="{SHOAL_NET[0]}"',
            f'services.executor.cni_bridge="{SHOAL_NET[1]}"'])
        self.proc = h.spawn(argv, self.log_path)
        targets = self.root / "run" / "prometheus-targets.json"  # written once all answer
        h.wait_until(targets.exists, SHOAL_UP_READY, f"shoal up ({self.log_path})", self.proc)

    def processes(self) -> dict[str, list[int]]:
        """Process group -> pids: the launcher, each child with its own descendants (the
        snapshotter's unpack workers), and the conmons (double-forked: not descendants)."""
        assert self.proc is not None
        out: dict[str, list[int]] = {"launcher": [self.proc.pid]}
        for child in children_of(self.proc.pid):
            name = label(child).removesuffix("-0").removeprefix("shoal_cli.")
            out[name] = [child, *descendants(child)]
        out["conmon (one per container)"] = h.pids_mentioning(str(self.root), comm="conmon")
        return out

    def memory(self) -> dict[str, pods.Mem]:
        return {group: pods.mem(pids) for group, pids in self.processes().items()}

    def stop(self) -> None:
        if self.proc is not None:
            h.stop_process(self.proc, 90)  # SIGTERM: what Ctrl-C does, services then NATS


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, except a conmon and what runs under it (containers)."""
    out = []
    for child in children_of(pid):
        if h.process_name(child).startswith("conmon"):
            continue
        out += [child, *descendants(child)]
    return out


# --------------------------------------------------------------------------- pull images


@dataclass
class PullImage:
    runtime: str
    rep: int
    ref: str
    gzip_bytes: int  # config + layers, as fetched
    tar_bytes: int
    files: int


def busybox_entries() -> list[h.TreeEntry]:
    return [h.TreeEntry("dir", "bin", 0o755),
            h.TreeEntry("file", "bin/busybox", 0o755, BUSYBOX_PATH.read_bytes())]


def collect_trees(scale: float) -> list[list[h.TreeEntry]]:
    """pull_unpack's five layers of host file trees, a static busybox added to the top one."""
    trees = [h.collect_tree(spec.sources, round(spec.budget_mb * h.MB * scale),
                            round(spec.max_file_mb * h.MB)) for spec in pull_unpack.LAYERS]
    trees[-1] = [*trees[-1], *busybox_entries()]
    return trees


def build_pull_image(registry: Registry, trees: list[list[h.TreeEntry]], runtime: str,
                     rep: int) -> PullImage:
    """Push a new image of `trees`: a nonce in every layer, so no blob is known to anyone."""
    tag = f"{runtime}-r{rep}"
    nonce = f"{tag}-{uuid.uuid4().hex[:8]}"
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        layers = list(pool.map(lambda e: h.tree_layer(e, nonce), trees))
    image = h.push_image(registry.url, "bench/ab-pull", tag, layers, cmd=list(SLEEP))
    return PullImage(runtime, rep, f"{registry.host}/bench/ab-pull:{tag}",
                     len(image.config_bytes) + sum(x.size for x in layers),
                     sum(len(x.tar) for x in layers),
                     sum(1 for tree in trees for e in tree if e.kind == "file"))


# --------------------------------------------------------------------------- the bench


@dataclass
class Job:
    runtime: str
    seconds: float  # RunPodSandbox until ContainerStatus said EXITED
    start: float  # of which RunPodSandbox + CreateContainer + StartContainer
    exit_code: int
    polls: int


@dataclass
class PullRun:
    runtime: str
    rep: int
    seconds: float  # PullImage + the pod's start
    pull: float
    start: float


class AB(pods.Bench):
    """pods.Bench's phases (warm-up, idle memory, sequential starts, memory, teardowns,
    bursts), then job pods and cold pulls to running."""

    def __init__(self, args: argparse.Namespace, root: Path,
                 pull_images: dict[str, list[PullImage]], warm_images: dict[str, str]) -> None:
        super().__init__(args, root)
        self.pull_images = pull_images
        self.warm_images = warm_images
        self.jobs: list[Job] = []
        self.pulls: list[PullRun] = []

    async def run(self) -> None:
        await super().run()
        print(f"{self.args.pods} job pods (busybox `true`) one after another", flush=True)
        for i in range(self.args.pods):
            for rt in self.alternating(i):
                job = await self.job(rt)
                self.jobs.append(job)
                print(f"  {i + 1:3} {rt.name:10} {job.seconds:6.3f} s (started in "
                      f"{job.start:.3f}, exit {job.exit_code}, {job.polls} polls)", flush=True)
        await self.pull_phase()

    async def job(self, rt: pods.Runtime) -> Job:
        p = await self.start_pod(rt, "job", command=("true",))
        t0 = time.perf_counter()
        polls = 0
        while True:
            polls += 1
            status = (await rt.rt.ContainerStatus(cri.ContainerStatusRequest(
                container_id=p.container_id), timeout=pods.CALL_TIMEOUT)).status
            if status.state == cri.CONTAINER_EXITED:
                break
            await asyncio.sleep(self.args.poll)
        seconds = p.total + time.perf_counter() - t0
        await self.stop_pod(rt, p.pod_id, p.container_id)  # untimed
        return Job(rt.name, seconds, p.total, status.exit_code, polls)

    async def pull_to_running(self, rt: pods.Runtime, ref: str, phase: str
                              ) -> tuple[float, pods.PodStart]:
        await asyncio.to_thread(os.sync)  # nobody pays for another's dirty pages
        t0 = time.perf_counter()
        await rt.img.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=ref)),
                               timeout=pods.CALL_TIMEOUT)
        pulled = time.perf_counter() - t0
        return pulled, await self.start_pod(rt, phase, image=ref, command=SLEEP)

    async def pull_phase(self) -> None:
        print("cold pull to running", flush=True)
        started: list[tuple[pods.Runtime, pods.PodStart]] = []
        for rt in self.runtimes:  # first-use paths of a pull of a new gzip image: unmeasured
            _, p = await self.pull_to_running(rt, self.warm_images[rt.name], "pull-warmup")
            await self.stop_pod(rt, p.pod_id, p.container_id)
        for r in range(1, self.args.repetitions + 1):
            for rt in self.alternating(r + 1):
                image = next(i for i in self.pull_images[rt.name] if i.rep == r)
                pulled, p = await self.pull_to_running(rt, image.ref, f"pull-{r}")
                self.starts.append(p)
                started.append((rt, p))
                run = PullRun(rt.name, r, pulled + p.total, pulled, p.total)
                self.pulls.append(run)
                print(f"  rep {r} {rt.name:10} {run.seconds:6.2f} s (PullImage "
                      f"{run.pull:.2f} s, pod start {run.start:.3f} s)", flush=True)
        for rt, p in started:  # all left running until the end of the phase: no deletes
            await self.stop_pod(rt, p.pod_id, p.container_id)


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Goal:
    limit: float
    absolute: bool = False  # a limit on Shoal's value (MiB), not on the ratio

    def met(self, shoal: float, ratio: float) -> bool:
        return (shoal if self.absolute else ratio) <= self.limit

    def __str__(self) -> str:
        return f"≤ {self.limit:g} MiB" if self.absolute else f"≤ {self.limit:g}"


@dataclass
class Row:
    measure: str
    values: dict[str, list[float]]  # runtime -> samples (seconds or bytes)
    unit: str  # "ms", "s" or "MiB"
    goal: Goal

    def median(self, runtime: str) -> float:
        return statistics.median(self.values[runtime])

    def show(self, x: float) -> str:
        if self.unit == "ms":
            return f"{x * 1000:.0f} ms"
        if self.unit == "MiB":
            return f"{x / MiB:.0f} MiB"
        return f"{x:.2f} s"


def pss(bench: AB, when: str, runtime: str) -> list[float]:
    return [float(sum(m.pss for m in bench.memory.get(when, {}).get(runtime, {}).values()))]


def rows(args: argparse.Namespace, bench: AB) -> list[Row]:
    names = [rt.name for rt in bench.runtimes]

    def per(samples: Callable[[str], list[float]]) -> dict[str, list[float]]:
        return {n: samples(n) for n in names}

    seq = f"{args.pods} pods (sequential)"
    gzip_mb = statistics.median(i.gzip_bytes for v in bench.pull_images.values()
                                for i in v) / h.MB
    return [
        Row("pod start (RunPodSandbox + CreateContainer + StartContainer), median",
            per(lambda n: [s.total for s in bench.starts
                           if s.runtime == n and s.phase == "sequential"]), "ms", Goal(0.65)),
        Row("job pod: start of `true` until ContainerStatus says EXITED, median",
            per(lambda n: [j.seconds for j in bench.jobs if j.runtime == n]), "ms", Goal(0.6)),
        Row("teardown (StopContainer 0 + RemoveContainer + StopPodSandbox + "
            "RemovePodSandbox), median",
            per(lambda n: [s.seconds for s in bench.stops
                           if s.runtime == n and s.phase == "sequential"]), "ms", Goal(0.7)),
        Row(f"{args.burst} pod starts at once, wall (median of {args.rounds} rounds)",
            per(lambda n: [b.seconds for b in bench.bursts if b.runtime == n]), "s", Goal(0.7)),
        Row(f"PSS of the runtime with {args.pods} pods running (every runtime process, "
            "monitors included)", per(lambda n: pss(bench, seq, n)), "MiB", Goal(1.0)),
        Row("PSS idle (every runtime process, no pods)",
            per(lambda n: pss(bench, "idle", n)), "MiB", Goal(100, absolute=True)),
        Row(f"cold {gzip_mb:.0f} MB / 5-layer gzip image: PullImage until a container of it "
            "runs, median",
            per(lambda n: [p.seconds for p in bench.pulls if p.runtime == n]), "s", Goal(0.4)),
    ]


def main_table(table_rows: list[Row]) -> tuple[str, bool]:
    out, all_met = [], True
    for row in table_rows:
        s, c = row.median("shoal"), row.median("containerd")
        ratio = s / c
        met = row.goal.met(s, ratio)
        all_met &= met
        out.append((row.measure, row.show(s), row.show(c), f"{ratio:.2f}", str(row.goal),
                    "yes" if met else "**no**"))
    return h.table(["measure", "Shoal", "containerd", "ratio", "goal", "met"], out,
                   "lrrrrl"), all_met


def spread_table(table_rows: list[Row]) -> str:
    out = []
    for row in table_rows:
        if row.unit == "MiB":
            continue
        for n, values in row.values.items():
            out.append((row.measure.split(" (")[0].split(":")[0].removesuffix(", median"), n,
                        len(values), row.show(statistics.median(values)),
                        row.show(min(values)), row.show(h.percentile(values, 95)),
                        row.show(max(values))))
    return h.table(["measure", "runtime", "n", "median", "min", "p95", "max"], out, "llrrrrr")


def memory_table(bench: AB) -> str:
    whens = list(bench.memory)
    out = []
    for rt in bench.runtimes:
        groups = list(next((bench.memory[w][rt.name] for w in whens
                            if rt.name in bench.memory[w]), {}))
        for g in groups:
            cells = []
            for w in whens:
                m = bench.memory[w].get(rt.name, {}).get(g, pods.Mem(0, 0, 0))
                cells.append(f"{m.pss / MiB:.1f}" + (f" ({m.count})" if "one per" in g else ""))
            out.append((rt.name, g, *cells))
        totals = [sum(m.pss for m in bench.memory[w].get(rt.name, {}).values()) / MiB
                  for w in whens]
        out.append((rt.name, "**total**", *(f"**{t:.1f}**" for t in totals)))
    return h.table(["runtime", "process", *whens], out, "ll" + "r" * len(whens))


def pull_table(bench: AB) -> str:
    out = []
    for rt in bench.runtimes:
        mine = [p for p in bench.pulls if p.runtime == rt.name]
        out.append((rt.name, len(mine), f"{statistics.median(p.pull for p in mine):.2f}",
                    f"{statistics.median(p.start for p in mine):.3f}",
                    f"{statistics.median(p.seconds for p in mine):.2f}"))
    return h.table(["runtime", "repetitions", "PullImage s", "then pod start s", "total s"],
                   out, "lrrrr")


def report(args: argparse.Namespace, bench: AB, command: str, meter: h.LoadMeter,
           leftovers: str) -> tuple[str, bool]:
    table_rows = rows(args, bench)
    table, met = main_table(table_rows)
    images = [i for v in bench.pull_images.values() for i in v]
    versions = "; ".join(f"{rt.name}: {rt.version}" for rt in bench.runtimes)
    idle_shoal = bench.memory.get("idle", {}).get("shoal", {})
    docker_gw = idle_shoal.get("docker-gateway", pods.Mem(0, 0, 0)).pss / MiB
    out = [f"## {SECTION}", "",
           f"Command: `{command}`  ",
           f"Run: {meter.started:%Y-%m-%d %H:%M} UTC, {meter.minutes:.1f} min.  ",
           f"Machine: {h.machine()}; runc {pods.runc_version()}, CNI plugins from "
           "containernetworking-plugins (bridge + host-local + portmap).  ",
           f"Runtimes: {versions}.  ",
           f"Load: {meter.result}.", "",
           "One run, both runtimes up side by side, one plain CRI client (bench/pods.py's), "
           "measurements interleaved (order flipped every pod, round and repetition). Shoal: "
           "`shoal up` with default settings (launcher, preloaded zygote, embedded "
           "nats-server, the services forked from the zygote; the docker gateway only once "
           "a client connects to its socket, which none does here) on its own roots; only "
           "its ports, pod subnet and bridge and the pause image (the registry's catatonit "
           "`-P` image, also containerd's) set. containerd 1.6 (Debian) with its own config, "
           "root, state and socket, CRI plugin with the same local registry as a plain-HTTP "
           "mirror, the same CNI chain on its own subnet and bridge, cgroupfs. Images "
           f"present for the pod rows (warmed up with {args.warmup} pods each). Pod start: "
           f"{args.pods} busybox `sleep 3600` pods one after another per runtime, all left "
           f"running (the PSS row is taken then), then torn down one by one. Job pod: "
           f"{args.pods} per runtime, RunPodSandbox + CreateContainer + StartContainer of "
           f"busybox `true`, then ContainerStatus every {args.poll * 1000:g} ms until EXITED. "
           f"PSS: from `/proc/<pid>/smaps_rollup` of every runtime process (Shoal: the "
           "launcher, zygote, nats-server, services and their workers, conmons; containerd: "
           "containerd and its shims), idle = after the warm-up, no pods. Cold pull: "
           f"{args.repetitions} repetitions per runtime, each a new image (a nonce in every "
           f"layer) of bench/pull_unpack.py's five gzip layers of host file trees "
           f"({statistics.median(i.gzip_bytes for i in images) / h.MB:.0f} MB gzip, "
           f"{statistics.median(i.tar_bytes for i in images) / h.MB:.0f} MB tar, "
           f"{images[0].files} files) with a static busybox in the top layer: after an "
           "untimed `sync`, PullImage, then RunPodSandbox + CreateContainer + StartContainer "
           "of `/bin/busybox sleep 3600` in it (one unmeasured pull of a small new image "
           "first). Ratio = Shoal / containerd; goals from issue #14.", "",
           table, "",
           "Spread (p95 nearest-rank)." + (
               f" Shoal's PSS includes the docker gateway ({docker_gw:.1f} MiB idle), which "
               "the issue's \"five services\" did not have." if docker_gw else
               " Shoal's docker gateway did not run (no Docker client connected)."),
           "",
           spread_table(table_rows), "",
           "PSS by process, MiB ((n) = how many processes):", "",
           memory_table(bench), "",
           "Cold pull to running, split (medians):", "",
           pull_table(bench), "",
           f"After the run: {leftovers}.", ""]
    return "\n".join(out), met


# --------------------------------------------------------------------------- setup, main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Every row of issue #14's table, Shoal (`shoal up`) against containerd "
                    "1.6, in one run: pod start, job pod, teardown, concurrent starts, PSS "
                    "with pods and idle, cold pull to running.")
    h.number(p, "--pods", 20, "sequential pods and job pods per runtime")
    h.number(p, "--burst", 10, "pods started at once per round")
    h.number(p, "--rounds", 5, "concurrent rounds per runtime")
    h.number(p, "--warmup", 3, "unmeasured pods per runtime first")
    h.number(p, "--repetitions", 3, "cold pulls per runtime (each its own new image)")
    h.number(p, "--scale", 1.0, "multiply the pull image's content (1: about 208 MB gzip)")
    h.number(p, "--poll", 0.005, "seconds between ContainerStatus polls of a job pod")
    args = h.parse(p, argv, root="shoal-bench-ab")
    if min(args.pods, args.burst, args.rounds, args.repetitions) < 1 or args.warmup < 0:
        p.error("--pods, --burst, --rounds and --repetitions must be >= 1")
    if args.scale <= 0 or args.poll <= 0:
        p.error("--scale and --poll must be positive")
    args.socket = []  # pods.Bench reads it
    return args


def build_images(args: argparse.Namespace, registry: Registry
                 ) -> tuple[dict[str, list[PullImage]], dict[str, str]]:
    """Every pull image, before any runtime runs (gzip would load the machine); the
    warm-up ones are just the busybox top layer."""
    print("collecting file trees", flush=True)
    trees = collect_trees(args.scale)
    images: dict[str, list[PullImage]] = {"shoal": [], "containerd": []}
    warm: dict[str, str] = {}
    for name in images:
        warm[name] = build_pull_image(registry, [busybox_entries()], f"{name}-warmup", 0).ref
        for rep in range(1, args.repetitions + 1):
            t0 = time.perf_counter()
            image = build_pull_image(registry, trees, name, rep)
            images[name].append(image)
            print(f"  {image.ref}: {image.gzip_bytes / h.MB:.1f} MB gzip, "
                  f"{image.tar_bytes / h.MB:.1f} MB tar, {image.files} files, built and "
                  f"pushed in {time.perf_counter() - t0:.0f} s", flush=True)
    return images, warm


def start_runtimes(stack: contextlib.ExitStack, root: Path, registry: Registry
                   ) -> tuple[ShoalUp, h.Containerd, str]:
    pause = f"{registry.host}/bench/pause:1"
    push(registry.url, "bench/pause", "1", pause_image())
    push(registry.url, "bench/busybox", "1", busybox_image())
    ctrd = h.Containerd(root / "containerd", h.CriSettings(
        sandbox_image=pause, registry_host=registry.host,
        subnet=CONTAINERD_NET[0], bridge=CONTAINERD_NET[1]))
    stack.callback(ctrd.stop)
    ctrd.start()
    shoal = ShoalUp(root / "shoal", pause)
    stack.callback(shoal.stop)
    print("starting shoal up", flush=True)
    shoal.start()
    return shoal, ctrd, f"{registry.host}/bench/busybox:1"


def write_runs(root: Path, bench: AB) -> None:
    (root / "runs.json").write_text(json.dumps({
        "starts": [asdict(s) for s in bench.starts], "stops": [asdict(s) for s in bench.stops],
        "bursts": [asdict(b) for b in bench.bursts], "jobs": [asdict(j) for j in bench.jobs],
        "pulls": [asdict(p) for p in bench.pulls],
        "images": {n: [asdict(i) for i in v] for n, v in bench.pull_images.items()},
        "memory": {w: {n: {g: asdict(m) for g, m in groups.items()} for n, groups in rts.items()}
                   for w, rts in bench.memory.items()}}, indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    meter, root, command = h.begin(__file__, args.root, argv)
    bench: AB | None = None
    all_pods: set[str] = set()
    with pods.session(root, (SHOAL_NET[1], CONTAINERD_NET[1])), \
            contextlib.ExitStack() as stack:
        registry = stack.enter_context(Registry(root / "registry"))
        images, warm = build_images(args, registry)
        shoal, ctrd, busybox = start_runtimes(stack, root, registry)
        bench = AB(args, root, images, warm)
        bench.runtimes = [
            pods.Runtime("shoal", str(shoal.cri_socket), busybox, shoal.memory),
            pods.Runtime("containerd", str(ctrd.socket), busybox, pods.containerd_rss(ctrd))]
        pods.measure(bench, all_pods)
    meter.stop()
    left = pods.leftovers(root, all_pods)
    print(left)
    assert bench is not None
    write_runs(root, bench)
    section, met = report(args, bench, command, meter, left)
    h.publish(section, met, heading=SECTION, root=root, update_docs=args.update_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
