"""Cold pull + unpack: Shoal against containerd 1.6 and the parallel `tar -xzf` ceiling.

Real parts only: a real nats-server, registry (docker-registry), Shoal puller and
snapshotter processes, and a throwaway containerd (Debian's package) with its own config,
root, state and socket under the benchmark's root (see _harness.Containerd). The image has
five gzip layers of real file trees copied from this host (shared libraries and binaries,
/usr/share, a Python SDK, the Python stdlib, headers and node modules), so gzip ratios and
file counts look like a real image's. Every repetition builds a new image (a small nonce
file per layer: new digests and chain IDs, same content), pushes it, and then, in an order
rotating per repetition, with an untimed `sync` before each:

- `shoal`: `images.pull` over the bus (as the CRI gateway's PullImage does), then until the
  snapshotter announces `snapshots.commit` of the image's top chain ID (the snapshotter
  starts on the puller's `images.fetching` and applies each layer as it downloads); fetch
  and unpack split with the puller's and snapshotter's /metrics and the snapshotter's
  per-layer log lines;
- `containerd`: `ctr images pull --plain-http` (fetch, then unpack into its overlayfs
  snapshotter; ctr prints the unpack time);
- `tar parallel` / `tar sequential`: GNU `tar -xzf` of the same blobs (straight from the
  registry's storage) into fresh directories, all at once / one after another; the
  parallel one is also reported with `sync -f` (syncfs) after it (Shoal flushes the layers
  it commits with one syncfs in the background after the last commit, not before each one;
  containerd 1.6 does not sync).

One state root per invocation (/tmp/shoal-bench-pull-unpack-<timestamp>); nothing is
deleted (about 3.5 GB per repetition with the defaults: the registry, both runtimes' stores
and snapshots, and the tar trees).

    .venv/bin/python bench/pull_unpack.py                # about 6 minutes
    .venv/bin/python bench/pull_unpack.py --update-docs  # and rewrite docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _harness as h
from nats.aio.msg import Msg
from shoal_common import codec, subjects
from shoal_common.messages.snapshots import SnapshotCommitted
from shoal_common.oci import chain_ids
from support.images import Image, Layer
from support.registry import Registry

MB = h.MB
SECTION = "Cold pull + unpack (puller + snapshotter) vs containerd"
TARGET = 0.6  # Shoal's median at most this fraction of containerd's
METHODS = ("shoal", "containerd", "tar parallel", "tar sequential")
NAMESPACE = "k8s.io"


@dataclass(frozen=True)
class LayerSpec:
    name: str
    sources: tuple[str, ...]
    budget_mb: float  # uncompressed file bytes to copy
    max_file_mb: float = 4.0  # skip bigger files (more, smaller files: like real images)


# About 200 MB of gzip in five layers, biggest first, like a language runtime image.
LAYERS = (
    LayerSpec("libs+bin", ("/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/sbin"), 240),
    LayerSpec("share", ("/usr/share",), 140),
    LayerSpec("sdk", ("/usr/lib/google-cloud-sdk", "/usr/lib/jvm"), 130),
    LayerSpec("python", ("/usr/lib/python3", "/usr/lib/python3.11"), 50),
    LayerSpec("headers+node", ("/usr/lib/node_modules", "/usr/include"), 20),
)


@dataclass
class BuiltImage:
    rep: int
    ref: str
    blob_bytes: int  # config + layers (compressed)
    tar_bytes: int  # uncompressed layers
    layer_digests: list[str]
    layer_sizes: list[int]
    layer_tar_sizes: list[int]
    chains: list[str]


@dataclass
class Run:
    method: str
    rep: int
    seconds: float  # cold pull + unpack
    fetch: float  # until the content was fetched (shoal: pull reply; containerd: ctr's fetch)
    unpack: float  # shoal: pull reply to the top commit; containerd: ctr's "done" time
    cpu: float  # CPU seconds: puller + snapshotter (+ its unpack workers) / containerd +
    # ctr / tar + gzip
    syncfs: float = 0.0  # tar parallel: the syncfs after it
    load: float = 0.0
    first_commit: float = 0.0  # shoal: when the first layer was committed
    fetch_layers: float = 0.0  # shoal: the puller's layer fetch time (metric)
    snapshotter_cpu: float = 0.0  # shoal: the snapshotter's (and its workers') share
    layer_seconds: list[float] = field(default_factory=list)  # shoal, from its log


def go_duration(text: str) -> float:
    """Seconds of a Go duration as ctr prints it (1.2345s, 842.1ms, 1m2.5s)."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"([\d.]+)(ms|µs|us|ns|h|m|s)", text)
    if not parts:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path, nats_url: str,
                 registry: Registry) -> None:
        self.args = args
        self.root = root
        self.registry = registry
        self.node = h.shoal_node(root / "node", nats_url)
        self.services = h.ShoalServices(self.node)
        self.containerd = h.Containerd(root / "containerd")
        self.bus = h.bench_bus(self.node)
        self.commits: dict[str, float] = {}  # chain ID -> perf_counter when announced
        self._committed = asyncio.Event()
        self.runs: list[Run] = []
        self.images: list[BuiltImage] = []
        self.layer_facts: list[tuple[str, int, int, int]] = []  # name, gz, tar, files
        self.pids: dict[str, int] = {}
        self.metrics: dict[str, str] = {}

    # -- setup ---------------------------------------------------------------------------

    def start_processes(self) -> None:
        """From the main thread: PR_SET_PDEATHSIG is per forking thread."""
        for name in ("puller", "snapshotter"):
            sp = self.services.start(name)
            self.pids[name] = sp.proc.pid
        self.containerd.start()

    async def setup(self) -> None:
        for sp in self.services:
            await asyncio.to_thread(self.services.wait_serving, sp, 60)
            self.metrics[sp.service] = sp.metrics_addr
        await self.bus.connect(wait=15)

        async def on_commit(msg: Msg) -> None:
            event = codec.decode(msg.data, SnapshotCommitted)
            self.commits[event.key] = time.perf_counter()
            self._committed.set()

        await self.bus.nc.subscribe(subjects.event_filter(self.node.node_id, None,
                                                          SnapshotCommitted.TOPIC),
                                    cb=on_commit)

    def blob_path(self, digest: str) -> Path:
        hexa = digest.split(":", 1)[1]
        return (self.registry.storage_dir / "docker" / "registry" / "v2" / "blobs" /
                "sha256" / hexa[:2] / hexa / "data")

    def build(self, entries: list[list[h.TreeEntry]], rep: int, tag: str) -> BuiltImage:
        """Build and push one image of the collected trees (layers gzipped in parallel)."""
        nonce = f"{tag}-{uuid.uuid4().hex[:8]}"
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
            layers: list[Layer] = list(pool.map(lambda e: h.tree_layer(e, nonce), entries))
        image: Image = h.push_image(self.registry.url, "bench/unpack", tag, layers,
                                    cmd=["/bin/sh"])
        chains = chain_ids([layer.diff_id for layer in layers])
        return BuiltImage(rep, f"{self.registry.host}/bench/unpack:{tag}",
                          len(image.config_bytes) + sum(x.size for x in layers),
                          sum(len(x.tar) for x in layers), [x.digest for x in layers],
                          [x.size for x in layers], [len(x.tar) for x in layers], chains)

    # -- methods ---------------------------------------------------------------------------

    async def scrape(self) -> float:
        """The puller's layer fetch seconds so far, from its /metrics."""
        puller = await asyncio.to_thread(h.scrape, self.metrics["puller"])
        return h.metric(puller, "shoal_puller_fetch_seconds_sum")

    def shoal_cpu(self) -> float:
        # The snapshotter's unpack workers are children it reaps: counted with it.
        return sum(h.process_cpu(pid, children=True) for pid in self.pids.values())

    async def shoal(self, image: BuiltImage) -> Run:
        fetch0 = await self.scrape()
        cpu0 = self.shoal_cpu()
        snap0 = h.process_cpu(self.pids["snapshotter"], children=True)
        top = image.chains[-1]
        started = time.perf_counter()
        await h.pull(self.bus, image.ref, NAMESPACE)
        fetched = time.perf_counter() - started
        deadline = time.monotonic() + self.args.unpack_timeout
        while top not in self.commits:
            self._committed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"Shoal did not commit {top} in {self.args.unpack_timeout} "
                                   f"s; see {self.node.root / 'logs'}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._committed.wait(), min(left, 1.0))
        seconds = self.commits[top] - started
        cpu = self.shoal_cpu() - cpu0
        snap_cpu = h.process_cpu(self.pids["snapshotter"], children=True) - snap0
        fetch1 = await self.scrape()
        first = min(self.commits[c] for c in image.chains if c in self.commits) - started
        # Layers unpack side by side (each one's metric spans most of the run), so the
        # unpack is timed from the pull's reply to the top commit, not summed per layer.
        return Run("shoal", image.rep, seconds, fetched, seconds - fetched, cpu,
                   first_commit=first, fetch_layers=fetch1 - fetch0,
                   snapshotter_cpu=snap_cpu)

    async def containerd_pull(self, image: BuiltImage) -> Run:
        cpu0 = h.process_cpu(self.containerd.pid)
        timed = await asyncio.to_thread(
            h.run_timed, [h.CTR, "-a", str(self.containerd.socket), "-n", "bench", "images",
                          "pull", "--plain-http", image.ref],
            output=self.root / "containerd" / f"ctr-pull-r{image.rep}.log")
        cpu = timed.cpu + h.process_cpu(self.containerd.pid) - cpu0
        done = re.findall(r"^done: (\S+)", timed.output, re.M)
        unpack = go_duration(done[-1]) if done else float("nan")
        return Run("containerd", image.rep, timed.seconds, timed.seconds - unpack, unpack, cpu)

    async def tar(self, image: BuiltImage, parallel: bool) -> Run:
        base = self.root / "tar" / f"r{image.rep}-{'parallel' if parallel else 'sequential'}"
        commands = []
        for i, digest in enumerate(image.layer_digests):
            target = base / f"layer{i}"
            target.mkdir(parents=True)
            commands.append(["tar", "-xzf", str(self.blob_path(digest)), "-C", str(target)])
        if parallel:
            timed = await asyncio.to_thread(h.run_parallel_timed, commands)
            seconds, cpu = timed.seconds, timed.cpu
            synced = await asyncio.to_thread(h.run_timed, ["sync", "-f", str(base)])
            return Run("tar parallel", image.rep, seconds, 0.0, seconds, cpu,
                       syncfs=synced.seconds)
        seconds = cpu = 0.0
        for argv in commands:
            timed = await asyncio.to_thread(h.run_timed, argv)
            seconds, cpu = seconds + timed.seconds, cpu + timed.cpu
        return Run("tar sequential", image.rep, seconds, 0.0, seconds, cpu)

    async def measure(self, method: str, image: BuiltImage) -> Run:
        await asyncio.to_thread(os.sync)  # nobody pays for another's dirty pages
        load = os.getloadavg()[0]
        if method == "shoal":
            run = await self.shoal(image)
        elif method == "containerd":
            run = await self.containerd_pull(image)
        else:
            run = await self.tar(image, parallel=method == "tar parallel")
        run.load = load
        extra = (f" (fetch {run.fetch:.2f} s, unpack {run.unpack:.2f} s)"
                 if method in ("shoal", "containerd") else
                 f" (+ syncfs {run.syncfs:.2f} s)" if run.syncfs else "")
        print(f"  rep {image.rep} {method:15} {run.seconds:6.2f} s{extra}", flush=True)
        return run

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> None:
        await self.setup()
        print("collecting file trees", flush=True)
        entries = []
        for spec in LAYERS:
            tree = await asyncio.to_thread(h.collect_tree, spec.sources,
                                           round(spec.budget_mb * MB * self.args.scale),
                                           round(spec.max_file_mb * MB))
            entries.append(tree)
        # Warm-up (unmeasured): first-use code paths on both runtimes.
        warm_entries = [[e for e in entries[-1] if e.kind != "file"][:50]]
        warm = await asyncio.to_thread(self.build, warm_entries, 0, "warmup")
        await self.shoal(warm)
        await self.containerd_pull(warm)
        print("building images", flush=True)
        for rep in range(1, self.args.repetitions + 1):
            started = time.perf_counter()
            image = await asyncio.to_thread(self.build, entries, rep, f"r{rep}")
            self.images.append(image)
            print(f"  r{rep}: {image.blob_bytes / MB:.1f} MB gzip, {image.tar_bytes / MB:.1f} "
                  f"MB tar, built and pushed in {time.perf_counter() - started:.0f} s",
                  flush=True)
        first = self.images[0]
        self.layer_facts = [
            (spec.name, gz, tar, sum(1 for e in tree if e.kind == "file"))
            for spec, gz, tar, tree in zip(LAYERS, first.layer_sizes, first.layer_tar_sizes,
                                           entries, strict=True)]
        del entries
        print("measuring", flush=True)
        for image in self.images:
            k = image.rep % len(METHODS)
            for method in METHODS[k:] + METHODS[:k]:
                self.runs.append(await self.measure(method, image))
        self.attach_layer_times()

    def attach_layer_times(self) -> None:
        """Per-layer unpack seconds of each Shoal run, from the snapshotter's log."""
        seconds: dict[str, float] = {}
        for sp in self.services:
            if sp.service != "snapshotter":
                continue
            for line in sp.log_text().splitlines():
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if rec.get("event") == "layer unpacked":
                        seconds[rec["chain_id"]] = float(rec["seconds"])
        for run in self.runs:
            if run.method == "shoal":
                image = next(i for i in self.images if i.rep == run.rep)
                run.layer_seconds = [seconds.get(c, float("nan")) for c in image.chains]

    async def close(self) -> None:
        try:
            await asyncio.to_thread(self.services.stop_all)
            await asyncio.to_thread(self.containerd.stop)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.bus.close(), 5)


# --------------------------------------------------------------------------- report


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def report(args: argparse.Namespace, bench: Bench, command: str, meter: h.LoadMeter
           ) -> tuple[str, bool]:
    runs, images = bench.runs, bench.images
    by = {m: [r for r in runs if r.method == m] for m in METHODS}
    medians = {m: med([r.seconds for r in by[m]]) for m in METHODS}
    gz = med([i.blob_bytes for i in images])
    ctrd = medians["containerd"]
    rows = []
    for m in METHODS:
        times = [r.seconds for r in by[m]]
        rows.append((m, f"{medians[m]:.2f}", f"{min(times):.2f}", f"{max(times):.2f}",
                     f"{gz / MB / medians[m]:.0f}", f"{medians[m] / ctrd:.2f}",
                     f"{med([r.cpu for r in by[m]]):.1f}"))
    par_sync = med([r.seconds + r.syncfs for r in by["tar parallel"]])
    rows.append(("tar parallel + syncfs", f"{par_sync:.2f}",
                 f"{min(r.seconds + r.syncfs for r in by['tar parallel']):.2f}",
                 f"{max(r.seconds + r.syncfs for r in by['tar parallel']):.2f}",
                 f"{gz / MB / par_sync:.0f}", f"{par_sync / ctrd:.2f}", "-"))
    ratio = medians["shoal"] / ctrd
    met = ratio <= TARGET
    shoal, ctr = by["shoal"], by["containerd"]
    split = [
        ("Shoal", f"{med([r.fetch for r in shoal]):.2f}",
         f"{med([r.fetch_layers for r in shoal]):.2f}",
         f"{med([r.first_commit for r in shoal]):.2f}", f"{med([r.unpack for r in shoal]):.2f}",
         f"{med([r.seconds for r in shoal]):.2f}",
         f"{med([r.cpu / r.seconds for r in shoal]) * 100:.0f} %"),
        ("containerd (ctr)", f"{med([r.fetch for r in ctr]):.2f}", "-", "-",
         f"{med([r.unpack for r in ctr]):.2f}", f"{med([r.seconds for r in ctr]):.2f}",
         f"{med([r.cpu / r.seconds for r in ctr]) * 100:.0f} %"),
    ]
    layer_rows = []
    for i, (name, lgz, ltar, files) in enumerate(bench.layer_facts):
        secs = [r.layer_seconds[i] for r in shoal if i < len(r.layer_seconds)]
        s = med(secs) if secs else float("nan")
        layer_rows.append((i, name, f"{lgz / MB:.1f}", f"{ltar / MB:.1f}", files,
                           f"{s:.2f}", f"{ltar / MB / s:.0f}"))
    total_files = sum(f[3] for f in bench.layer_facts)
    unpack_share = med([r.unpack / r.seconds for r in shoal])
    snap_busy = med([r.cpu / r.seconds for r in shoal])
    snap_only = med([r.snapshotter_cpu / r.unpack for r in shoal])
    snap_cpu = med([r.snapshotter_cpu for r in shoal])
    out = [f"## {SECTION}", "",
           f"Command: `{command}`  ",
           f"Run: {meter.started:%Y-%m-%d %H:%M} UTC, {meter.minutes:.1f} min.  ",
           f"Machine: {h.machine()}; containerd {h.containerd_version()} (Debian).  ",
           f"Load: {meter.result}.", "",
           f"Real nats-server, registry (docker-registry), Shoal puller and snapshotter "
           "(default settings; overlayfs driver) and a throwaway containerd with its own "
           "config, root, state and socket (overlayfs snapshotter, CRI plugin off). Image: "
           f"five gzip layers of file trees copied from this host, {gz / MB:.0f} MB "
           f"compressed, {med([i.tar_bytes for i in images]) / MB:.0f} MB of tar, "
           f"{total_files} files (table below); each of {args.repetitions} repetitions "
           "pushes a new image (a nonce file per layer: new digests and chain IDs), and every "
           "method handles it, in an order rotating per repetition, after an untimed `sync`. "
           "`shoal`: `images.pull` over the bus, then until `snapshots.commit` of the top "
           "chain ID arrives (the snapshotter starts on `images.fetching` and applies each "
           "layer while it downloads). "
           "`containerd`: `ctr images pull --plain-http` (fetch, then unpack; process start "
           "included). `tar`: GNU `tar -xzf` of the same blobs into fresh directories; "
           "`+ syncfs` adds `sync -f` after the parallel one (Shoal flushes its layers with "
           "one syncfs in the background after the last commit, outside this time; "
           "containerd 1.6 does not sync). MB/s = compressed image bytes / time. CPU = "
           "puller + snapshotter, containerd + ctr, or tar + gzip.", "",
           h.table(["method", "median s", "min s", "max s", "MB/s", "÷ containerd",
                    "CPU s"], rows, "lrrrrrr"), "",
           "Where the time goes (medians): fetch = until the pull replied (Shoal) or ctr's "
           "fetch ended; layers fetch = the puller's own layer download time "
           "(`shoal_puller_fetch_seconds`); first layer = until Shoal's first "
           "`snapshots.commit`; unpack = from the pull's reply to the top layer's commit "
           "(Shoal: what is left after the fetch, the layers applied side by side and "
           "while they download) or ctr's unpack time; "
           "CPU = share of one core used over the whole pull+unpack.", "",
           h.table(["runtime", "fetch s", "layers fetch s", "first layer s", "unpack s",
                    "total s", "CPU"], split, "lrrrrrr"), "",
           "Shoal's unpack per layer (medians, from the snapshotter's `layer unpacked` log "
           "lines; tar MB/s = uncompressed bytes / unpack time):", "",
           h.table(["layer", "content", "gzip MB", "tar MB", "files", "unpack s",
                    "tar MB/s"], layer_rows, "rlrrrrr"), "",
           f"**Conclusion.** Target: Shoal's cold pull+unpack <= {TARGET} x containerd's. "
           f"Measured: {ratio:.2f} x (median {medians['shoal']:.2f} s against "
           f"{ctrd:.2f} s) — **target {'met' if met else 'not met'}**. The parallel "
           f"`tar -xzf` ceiling is {medians['tar parallel']:.2f} s "
           f"({par_sync:.2f} s with syncfs). In Shoal, {unpack_share:.0%} of the time "
           f"comes after the fetch (the layers applied side by side, each from its first "
           f"downloaded bytes); the puller + snapshotter (with its "
           f"unpack workers) used {snap_busy:.0%}"
           f" of one core over the run, the snapshotter and its workers {snap_cpu:.1f} CPU "
           f"s, {snap_only:.0%} of one core while unpacking.", ""]
    return "\n".join(out), met


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Cold pull + unpack of a ~200 MB image of five gzip layers of real file "
                    "trees: Shoal (puller + snapshotter, over the bus) against containerd 1.6 "
                    "(ctr pull, own root and socket) and parallel `tar -xzf`. "
                    "MB = 10^6 bytes.")
    h.number(p, "--repetitions", 5, "distinct images, each handled by every method")
    h.number(p, "--scale", 1.0, "multiply every layer's content budget")
    h.number(p, "--unpack-timeout", 600.0, "give up on a Shoal unpack after this many seconds")
    args = h.parse(p, argv, root="shoal-bench-pull-unpack")
    if args.repetitions < 1 or args.scale <= 0:
        p.error("repetitions must be >= 1 and scale positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    meter, root, command = h.begin(__file__, args.root, argv)
    try:
        with h.sigterm_as_interrupt(), h.NatsServer(root / "nats") as nats, \
                Registry(root / "registry") as registry:
            bench = Bench(args, root, nats.url, registry)
            try:
                bench.start_processes()
                h.run_loop(h.run_then_close(bench.run(), bench.close))
            finally:
                bench.services.stop_all()
                bench.containerd.stop()
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"\ninterrupted; every process stopped; files left in {root}", file=sys.stderr)
        return 130
    meter.stop()
    (root / "runs.json").write_text(json.dumps(
        {"images": [asdict(i) for i in bench.images], "runs": [asdict(r) for r in bench.runs]},
        indent=1))
    section, met = report(args, bench, command, meter)
    h.publish(section, met, heading=SECTION, root=root, update_docs=args.update_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
