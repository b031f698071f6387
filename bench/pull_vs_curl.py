"""A cold pull through Shoal's puller against plain curl fetching the same blobs.

Real parts only: a real nats-server, a real registry (docker-registry) and a real puller
process; the pull is sent over the bus exactly as the CRI gateway sends PullImage. Each
repetition pushes a distinct image of random bytes (uncompressed tar layers, so the wire
size is the layer size), then, in a rotating order:

- `shoal`: `images.pull` over the bus (manifest, config, layers; digests checked, blobs
  fsynced and committed, the image recorded, events published), reply included;
- `curl sequential`: one curl process fetching the config and layer blobs one after
  another on one connection;
- `curl parallel`: one curl with `--parallel`, every blob at once (the ceiling);
- `curl parallel + fsync`: the parallel fetch plus `sync FILE...` of what it wrote (the
  puller makes each blob durable before committing it; curl does not).

`sync` runs (untimed) before each method, so none pays for another's dirty pages. One state
root per invocation (/tmp/shoal-bench-pull-vs-curl-<timestamp>); nothing is deleted (about
1 GB per repetition with the defaults: registry, puller store, curl's files).

    .venv/bin/python bench/pull_vs_curl.py                # about 2 minutes
    .venv/bin/python bench/pull_vs_curl.py --update-docs  # and rewrite docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import _harness as h
from shoal_common.messages.images import PullReply
from support.images import Image
from support.registry import Registry

MB = h.MB
SECTION = "Cold pull vs curl (puller)"
TARGET = 1.2  # Shoal's median within this factor of the parallel-curl median
METHODS = ("shoal", "curl sequential", "curl parallel", "curl parallel + fsync")


@dataclass
class Run:
    method: str
    rep: int
    seconds: float
    blob_bytes: int  # config + layers
    cpu: float  # CPU seconds of the puller (shoal) or of curl (+ sync)
    load: float  # 1-minute load average when it started


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path, nats_url: str,
                 registry: Registry) -> None:
        self.args = args
        self.root = root
        self.registry = registry
        self.node = h.shoal_node(root / "node", nats_url)
        self.services = h.ShoalServices(self.node)
        self.bus = h.bench_bus(self.node)
        self.runs: list[Run] = []

    def blob_urls(self, image: Image, repository: str) -> list[tuple[str, int]]:
        base = f"{self.registry.url}/v2/{repository}/blobs"
        return [(f"{base}/{digest}", len(data)) for digest, data in image.blobs()]

    async def pull(self, ref: str) -> PullReply:
        return await h.pull(self.bus, ref)

    async def curl(self, blobs: list[tuple[str, int]], out: Path, parallel: bool,
                   fsync: bool) -> tuple[float, float]:
        """(seconds, CPU seconds) of one curl fetching `blobs` into `out`."""
        out.mkdir(parents=True)
        argv = ["curl", "--silent", "--show-error", "--fail", "--noproxy", "*"]
        if parallel:
            argv += ["--parallel", "--parallel-immediate", "--parallel-max", "16"]
        files = [out / f"blob{i}" for i in range(len(blobs))]
        for (url, _), path in zip(blobs, files, strict=True):
            argv += ["-o", str(path), url]
        timed = await asyncio.to_thread(h.run_timed, argv)
        seconds, cpu = timed.seconds, timed.cpu
        if fsync:
            synced = await asyncio.to_thread(h.run_timed, ["sync", *map(str, files)])
            seconds, cpu = seconds + synced.seconds, cpu + synced.cpu
        for (url, size), path in zip(blobs, files, strict=True):
            if path.stat().st_size != size:
                raise RuntimeError(f"curl fetched {path.stat().st_size} bytes of {url}, "
                                   f"expected {size}")
        return seconds, cpu

    async def measure(self, method: str, rep: int, ref: str,
                      blobs: list[tuple[str, int]], puller_pid: int) -> Run:
        await asyncio.to_thread(os.sync)  # nobody pays for another's dirty pages
        load = os.getloadavg()[0]
        size = sum(s for _, s in blobs)
        if method == "shoal":
            cpu0, started = h.process_cpu(puller_pid), time.perf_counter()
            await self.pull(ref)
            seconds = time.perf_counter() - started
            cpu = h.process_cpu(puller_pid) - cpu0
        else:
            out = self.root / "curl" / f"r{rep}-{method.replace(' ', '-').replace('+', 'and')}"
            seconds, cpu = await self.curl(blobs, out, parallel="parallel" in method,
                                           fsync="fsync" in method)
        run = Run(method, rep, seconds, size, cpu, load)
        print(f"  rep {rep} {method:22} {seconds:6.3f} s  {size / MB / seconds:7.1f} MB/s",
              flush=True)
        return run

    async def run(self) -> None:
        sp = self.services.start("puller")
        await asyncio.to_thread(self.services.wait_serving, sp, 60)
        await self.bus.connect(wait=15)
        sizes = [round(mb * MB) for mb in self.args.sizes]
        # Warm-up (unmeasured): first-use code paths, connections, curl's binary.
        warm = await asyncio.to_thread(h.push_image, self.registry.url, "bench/warmup", "1",
                                       h.random_layers([64 << 10]))
        await self.pull(f"{self.registry.host}/bench/warmup:1")
        await self.curl(self.blob_urls(warm, "bench/warmup"), self.root / "curl" / "warmup",
                        parallel=True, fsync=False)
        for rep in range(1, self.args.repetitions + 1):
            repository, tag = "bench/pull", f"r{rep}"
            image = await asyncio.to_thread(h.push_image, self.registry.url, repository, tag,
                                            h.random_layers(sizes))
            blobs = self.blob_urls(image, repository)
            ref = f"{self.registry.host}/{repository}:{tag}"
            order = METHODS[rep % len(METHODS):] + METHODS[:rep % len(METHODS)]
            for method in order:
                self.runs.append(await self.measure(method, rep, ref, blobs, sp.proc.pid))

    async def close(self) -> None:
        try:
            await asyncio.to_thread(self.services.stop_all)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.bus.close(), 5)


def report(args: argparse.Namespace, runs: list[Run], command: str, meter: h.LoadMeter
           ) -> tuple[str, bool]:
    medians = {m: statistics.median(r.seconds for r in runs if r.method == m)
               for m in METHODS}
    ceiling = medians["curl parallel"]
    rows = []
    for m in METHODS:
        mine = [r for r in runs if r.method == m]
        times = [r.seconds for r in mine]
        size = mine[0].blob_bytes
        rows.append((m, f"{medians[m]:.3f}", f"{min(times):.3f}", f"{max(times):.3f}",
                     f"{size / MB / medians[m]:.0f}", f"{medians[m] / ceiling:.2f}x",
                     f"{statistics.median(r.cpu for r in mine):.2f}"))
    ratio = medians["shoal"] / ceiling
    met = ratio <= TARGET
    per_rep = {r.rep: r.seconds for r in runs if r.method == "shoal"}
    rep_ratios = [per_rep[r.rep] / r.seconds for r in runs if r.method == "curl parallel"]
    sizes = " + ".join(f"{s:g}" for s in args.sizes)
    total = sum(args.sizes)
    out = [f"## {SECTION}", "",
           f"Command: `{command}`  ",
           f"Run: {meter.started:%Y-%m-%d %H:%M} UTC, {meter.minutes:.1f} min.  ",
           f"Machine: {h.machine()}.  ",
           f"Load: {meter.result}.", "",
           f"Real nats-server, registry (docker-registry, filesystem storage on this disk) "
           f"and puller process (default settings: 6 concurrent layer downloads). Each of "
           f"{args.repetitions} repetitions pushes a distinct image of {len(args.sizes)} "
           f"random-byte layers ({sizes} MB = {total:g} MB, uncompressed tar, so wire size = "
           "layer size) and fetches it with every method, in an order rotating per "
           "repetition; `sync` (untimed) before each. `shoal` = `images.pull` over the bus "
           "as the CRI gateway sends it (manifest, config and layers; sha256 checked, every "
           "blob fsynced and committed, image recorded, events published), reply included. "
           "curl fetches the config and layer blobs (not the manifest) to files: "
           "`sequential` one after another on one connection, `parallel` all at once "
           "(`--parallel`), `+ fsync` adds `sync FILE...` of what it wrote. MB/s over "
           "config + layer bytes, MB = 10^6 bytes. CPU = puller process (shoal) or curl and "
           "sync.", "",
           h.table(["method", "median s", "min s", "max s", "MB/s (median)",
                    "÷ curl parallel", "CPU s"], rows, "lrrrrrr"), "",
           "Shoal ÷ curl parallel per repetition: "
           + ", ".join(f"{x:.2f}" for x in rep_ratios) + ".", "",
           f"**Conclusion.** Target: Shoal's cold pull within {TARGET}x of the parallel-curl "
           f"ceiling. Measured: {ratio:.2f}x (median {medians['shoal']:.3f} s against "
           f"{ceiling:.3f} s) — **target {'met' if met else 'not met'}**.", ""]
    return "\n".join(out), met


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Cold pull of a multi-layer image through Shoal's puller (over the bus, "
                    "as the CRI gateway does) against curl fetching the same blobs one after "
                    "another and in parallel, from a real local registry. MB = 10^6 bytes.")
    p.add_argument("--sizes", type=lambda s: [float(x) for x in s.split(",")],
                   default="80,60,40,15,5", metavar="MB,MB,...",
                   help="layer sizes in MB, random bytes (default: %(default)s)")
    h.number(p, "--repetitions", 5, "distinct images, each fetched by every method")
    args = h.parse(p, argv, root="shoal-bench-pull-vs-curl")
    if args.repetitions < 1 or not args.sizes or min(args.sizes) <= 0:
        p.error("repetitions must be >= 1 and sizes positive")
    return args


async def bench_main(args: argparse.Namespace, root: Path, nats_url: str,
                     registry: Registry) -> list[Run]:
    bench = Bench(args, root, nats_url, registry)
    await h.run_then_close(bench.run(), bench.close)
    return bench.runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    meter, root, command = h.begin(__file__, args.root, argv)
    try:
        with h.sigterm_as_interrupt(), h.NatsServer(root / "nats") as nats, \
                Registry(root / "registry") as registry:
            runs = h.run_loop(bench_main(args, root, nats.url, registry))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"\ninterrupted; every process stopped; files left in {root}", file=sys.stderr)
        return 130
    meter.stop()
    (root / "runs.json").write_text(json.dumps([asdict(r) for r in runs], indent=1))
    section, met = report(args, runs, command, meter)
    h.publish(section, met, heading=SECTION, root=root, update_docs=args.update_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
