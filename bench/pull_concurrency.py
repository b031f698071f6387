"""Choose `services.puller.max_concurrent_downloads` by measurement.

Real parts only: a real nats-server, a real registry (docker-registry), a real puller process
(restarted for each concurrency N, since config is read at start), and pulls sent over the
bus like the CRI gateway sends them. Every run pulls a distinct, freshly pushed image of
random bytes, so nothing is cached.

Loopback has no latency and no per-connection bandwidth limit, so concurrency barely matters
there; real registries do. The pulls therefore go through a throttling proxy (in this
process): a first-byte latency per request and a throughput cap per connection. The
unthrottled loopback case is measured too, for reference.

One state root per invocation (/tmp/shoal-bench-<timestamp>); nothing is deleted, not even
at the end: on ext4 without a journal, creating files soon after deleting many is far slower
for minutes, which would skew every later run. Delete the printed directory by hand (about
4.5 GB with the defaults: every image is in the registry and in the puller's store).

    .venv/bin/python bench/pull_concurrency.py                # about 3 minutes
    .venv/bin/python bench/pull_concurrency.py --update-docs  # and rewrite docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import _harness
import aiohttp
from _harness import DOC, MB, cpu_ticks, interrupt, machine, process_cpu
from aiohttp import web
from shoal_common.messages.images import PullReply
from shoal_puller.config import PullerConfig
from support.faulty_registry import serve_locally
from support.nats import nats_server
from support.processes import Node, ServiceProcess, ServiceSet
from support.registry import Registry

SECTION = "Layer download concurrency (puller)"
CHUNK = 64 << 10
TOLERANCE = 0.05  # "as good as the best": a median within 5 % of the best median
DEFAULT_SHAPES = ("big=30,12,6,3,1,0.3", "small=12x1")
# Headers the puller needs from the registry (Content-Length is set from the upstream's).
PROXIED_HEADERS = ("Content-Type", "Docker-Content-Digest", "Content-Range", "Location",
                   "Accept-Ranges", "Docker-Distribution-Api-Version", "WWW-Authenticate",
                   "Retry-After", "ETag")


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Shape:
    name: str
    sizes: tuple[int, ...]  # layer sizes in bytes

    def describe(self) -> str:
        mbs = [f"{s / MB:g}" for s in self.sizes]
        if len(set(mbs)) == 1:
            return f"{len(mbs)} layers of {mbs[0]} MB"
        return f"{len(mbs)} layers of {' + '.join(mbs)} MB"


def parse_shape(text: str) -> Shape:
    """`name=30,12,6` (MB each) or `name=12x1` (12 layers of 1 MB); terms can be mixed."""
    name, sep, spec = text.partition("=")
    if not sep or not re.fullmatch(r"[a-z0-9-]+", name):
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected NAME=SIZES, e.g. big=30,12")
    sizes: list[int] = []
    try:
        for term in spec.split(","):
            count, _, size = term.rpartition("x")
            sizes += [round(float(size) * MB)] * (int(count) if count else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: sizes are MB numbers, "
                                         "comma-separated, optionally COUNTxMB") from None
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"shape {text!r}: needs layers of positive size")
    return Shape(name, tuple(sizes))


def push_random_image(registry_url: str, repository: str, tag: str,
                      sizes: Sequence[int]) -> None:
    """Push an image whose layers are tars of one random (incompressible) file each.
    Uncompressed tar media type, so a layer is as big on the wire as it says (a gzip of
    random bytes would be no smaller)."""
    _harness.push_image(registry_url, repository, tag, _harness.random_layers(sizes))


# --------------------------------------------------------------------------- proxy


class Pacer:
    """Lets bytes through at `rate` bytes/s along one timeline (rate 0: unlimited). A pacer
    that falls behind (a busy event loop) may catch up by at most `slack` seconds."""

    def __init__(self, rate: float, slack: float = float("inf")) -> None:
        self.rate = rate
        self.slack = slack
        self._next = time.monotonic()

    async def take(self, nbytes: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        start = max(self._next, now - self.slack)
        self._next = start + nbytes / self.rate
        if start > now:
            await asyncio.sleep(start - now)


class ThrottlingProxy:
    """An HTTP proxy in front of the registry that behaves like a distant one: every request
    waits `latency` seconds before its first byte, and every response body is paced to
    `per_connection` bytes/s (HTTP/1.1 carries one response at a time, so that is a cap per
    connection), and optionally all bodies together to `total` bytes/s."""

    def __init__(self, upstream: str, *, latency: float, per_connection: float,
                 total: float) -> None:
        self.upstream = upstream.rstrip("/")
        self.latency = latency
        self.per_connection = per_connection
        self.total = Pacer(total, slack=0.05)
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._runner, self.port = await serve_locally(self._handle)
        self._session = aiohttp.ClientSession(auto_decompress=False, trust_env=False)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(self.latency)
        try:
            return await self._forward(request)
        except aiohttp.ClientError as exc:
            # The registry went away (e.g. Ctrl-C reached it first); the pull fails with this.
            return web.Response(status=502, text=f"proxy: {exc}")

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: request.headers[k] for k in ("Accept", "Range", "Authorization")
                   if k in request.headers}
        url = self.upstream + str(request.rel_url)
        async with self._session.request(request.method, url, headers=headers,
                                         data=await request.read() or None,
                                         allow_redirects=False) as upstream:
            resp = web.StreamResponse(status=upstream.status)
            for name in PROXIED_HEADERS:
                if name in upstream.headers:
                    resp.headers[name] = upstream.headers[name]
            if upstream.content_length is not None:
                resp.content_length = upstream.content_length
            await resp.prepare(request)
            pace = Pacer(self.per_connection)
            try:
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    await pace.take(len(chunk))
                    await self.total.take(len(chunk))
                    await resp.write(chunk)
                await resp.write_eof()
            except (ConnectionError, aiohttp.ClientError):
                # Either side hung up mid-body; the puller sees a short body and says so.
                if request.transport is not None:
                    request.transport.abort()
            return resp


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    network: str  # "throttled" or "loopback"
    shape: str
    n: int
    rep: int
    seconds: float
    image_bytes: int  # manifest + config + layers, as the puller reports
    puller_cpu: float  # CPU seconds the puller used during the pull
    bench_cpu: float  # CPU seconds this process (the proxy, mostly) used during the pull


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path, nats_url: str,
                 registry: Registry) -> None:
        self.args = args
        self.registry = registry
        self.node = Node("bench", nats_url, root / "node")
        self.services = ServiceSet(self.node)
        self.proxy = ThrottlingProxy(registry.url, latency=args.latency_ms / 1000,
                                     per_connection=args.bandwidth * MB,
                                     total=args.total_bandwidth * MB)
        self.bus = _harness.bench_bus(self.node)
        self.runs: list[Run] = []
        self._images = 0

    def networks(self) -> list[str]:
        return ["throttled"] + ([] if self.args.no_loopback else ["loopback"])

    def host(self, network: str) -> str:
        return self.proxy.host if network == "throttled" else self.registry.host

    async def new_image(self, network: str, shape: str, sizes: Sequence[int]) -> str:
        """Push a fresh image; returns the reference the puller should pull it by."""
        self._images += 1
        repository, tag = f"bench/{shape}", f"{network}-{self._images}"
        await asyncio.to_thread(push_random_image, self.registry.url, repository, tag, sizes)
        return f"{self.host(network)}/{repository}:{tag}"

    async def pull(self, ref: str) -> PullReply:
        return await _harness.pull(self.bus, ref)

    async def start_puller(self, n: int, rep: int) -> ServiceProcess:
        sp = self.services.start(
            "puller", replica=f"puller-r{rep}-n{n}",
            extra=["--set", f"services.puller.max_concurrent_downloads={n}"])
        await asyncio.to_thread(self.services.wait_serving, sp)
        # Warm up (unmeasured): first-use code paths and one connection per endpoint.
        for network in self.networks():
            await self.pull(await self.new_image(network, "warmup", [64 << 10]))
        return sp

    async def measure(self, sp: ServiceProcess, network: str, shape: Shape, n: int,
                      rep: int) -> Run:
        ref = await self.new_image(network, shape.name, shape.sizes)
        cpu0, bench0 = process_cpu(sp.proc.pid), time.process_time()
        started = time.perf_counter()
        reply = await self.pull(ref)
        seconds = time.perf_counter() - started
        run = Run(network, shape.name, n, rep, seconds, reply.image.size,
                  process_cpu(sp.proc.pid) - cpu0, time.process_time() - bench0)
        print(f"  {network:9} {shape.name:6} N={n:<2} rep {rep}: {seconds:6.2f} s  "
              f"{run.image_bytes / MB / seconds:6.1f} MB/s", flush=True)
        return run

    async def run(self) -> None:
        await self.proxy.start()
        await self.bus.connect(wait=15)
        # Repetitions outermost: slow drift (page cache, disk writeback) spreads over every
        # N instead of landing on the last ones.
        for rep in range(1, self.args.repetitions + 1):
            for n in self.args.concurrency:
                sp = await self.start_puller(n, rep)
                try:
                    for network in self.networks():
                        for shape in self.args.shapes:
                            self.runs.append(await self.measure(sp, network, shape, n, rep))
                finally:
                    await asyncio.to_thread(sp.terminate)

    async def close(self) -> None:
        try:
            await asyncio.to_thread(self.services.stop_all)
            await self.proxy.stop()
        finally:
            # NATS may be gone already (Ctrl-C reaches the whole process group), and closing
            # a reconnecting client can hang: bound it.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.bus.close(), 5)


# --------------------------------------------------------------------------- report


@dataclass
class Row:
    n: int
    median: float
    low: float
    high: float
    mbps: float  # image bytes / median seconds
    puller_cpu: float  # median share of one core the puller used
    ideal: float | None  # the proxy model's lower bound (throttled only)


def ideal_seconds(sizes: Sequence[int], n: int, latency: float, rate: float,
                  total_rate: float) -> float:
    """The least time the throttled pull can take: manifest and config one after the other
    (small, so latency only), then layers started in manifest order on n connections, each
    taking latency + size / rate; no less than all bytes at the total rate."""
    free = [0.0] * n  # when each connection is free again
    for size in sizes:
        i = free.index(min(free))
        free[i] += latency + (size / rate if rate > 0 else 0.0)
    layers = max(free)
    if total_rate > 0:
        layers = max(layers, sum(sizes) / total_rate)
    return 2 * latency + layers


def summarize(args: argparse.Namespace, runs: list[Run], network: str,
              shape: Shape) -> list[Row]:
    rows = []
    for n in sorted({r.n for r in runs}):
        mine = [r for r in runs if (r.network, r.shape, r.n) == (network, shape.name, n)]
        if not mine:
            continue
        times = [r.seconds for r in mine]
        median = statistics.median(times)
        size = statistics.median(r.image_bytes for r in mine)
        ideal = (ideal_seconds(shape.sizes, n, args.latency_ms / 1000, args.bandwidth * MB,
                               args.total_bandwidth * MB) if network == "throttled" else None)
        rows.append(Row(n, median, min(times), max(times), size / MB / median,
                        statistics.median(r.puller_cpu / r.seconds for r in mine), ideal))
    return rows


def choose(rows: list[Row]) -> int:
    """The smallest N whose median is within TOLERANCE of the best median."""
    best = min(row.median for row in rows)
    return min(row.n for row in rows if row.median <= best * (1 + TOLERANCE))


def table(rows: list[Row]) -> str:
    best = min(row.median for row in rows)
    ideal = rows[0].ideal is not None
    lines = ["| N | median s | min s | max s | MB/s (median) | vs best | puller CPU |"
             + (" ideal s |" if ideal else ""),
             "|--:|--:|--:|--:|--:|--:|--:|" + ("--:|" if ideal else "")]
    for r in rows:
        lines.append(f"| {r.n} | {r.median:.2f} | {r.low:.2f} | {r.high:.2f} | {r.mbps:.1f} "
                     f"| {(r.median / best - 1) * 100:+.0f} % | {r.puller_cpu * 100:.0f} % |"
                     + (f" {r.ideal:.2f} |" if r.ideal is not None else ""))
    return "\n".join(lines)


def report(args: argparse.Namespace, bench: Bench, command: str, started: datetime,
           minutes: float, load: str) -> tuple[str, int]:
    """The markdown section for docs/benchmarks.md, and the chosen N."""
    runs = bench.runs
    total = ("no cap on all connections together" if args.total_bandwidth <= 0
             else f"at most {args.total_bandwidth:g} MB/s for all connections together")
    out = [f"## {SECTION}", "",
           f"Command: `{command}`  ",
           f"Run: {started:%Y-%m-%d %H:%M} UTC, {minutes:.1f} min.  ",
           f"Machine: {machine()}; {load}.", "",
           "Real nats-server, registry (docker-registry) and puller process; the puller is "
           "restarted for each N (config is read at start) on one state root that is never "
           "cleaned during the run. Each pull is of a distinct image of random bytes pushed "
           f"just before, so nothing is cached; {args.repetitions} repetitions per N, "
           "repetitions outermost. Time = `images.pull` over the bus, reply included. "
           "MB = 10^6 bytes.", "",
           f"Throttling proxy (`throttled`): {args.latency_ms:g} ms before the first byte of "
           f"every request, {args.bandwidth:g} MB/s per connection, {total}. "
           "`loopback`: straight to the registry, for reference. `ideal`: the least time "
           "the proxy allows (manifest and config, then layers started in manifest order on N "
           "connections, each taking latency + size / rate).", ""]
    chosen: dict[str, int] = {}
    slower: dict[str, str] = {}  # today's default against the best, per shape
    today = PullerConfig().max_concurrent_downloads
    for network in bench.networks():
        for shape in args.shapes:
            rows = summarize(args, runs, network, shape)
            if not rows:
                continue
            out += [f"### {network}, {shape.name}: {shape.describe()}", "", table(rows), ""]
            if network == "throttled":  # loopback is for reference only: no choice there
                chosen[shape.name] = choose(rows)
                slower[shape.name] = next(
                    (f"{(r.median / min(x.median for x in rows) - 1) * 100:+.0f} %"
                     for r in rows if r.n == today), "not measured")
                out += [f"Smallest N within {TOLERANCE:.0%} of the best median: "
                        f"{chosen[shape.name]}.", ""]
    throttled = [r for r in runs if r.network == "throttled"]
    if throttled:
        busiest = max(r.bench_cpu / r.seconds for r in throttled)
        out += [f"The proxy (the benchmark process) used at most {busiest:.0%} of a core "
                "during a throttled pull, so it was not the bottleneck."
                if busiest < 0.7 else
                f"Warning: the proxy used up to {busiest:.0%} of a core during a throttled "
                "pull and may have limited the higher N.", ""]
    default = max(chosen.values()) if chosen else 0
    picks = ", ".join(f"{name}: {n}" for name, n in chosen.items())
    out += ["**Conclusion.** Default = the smallest N within "
            f"{TOLERANCE:.0%} of the best median in the throttled case, for every shape "
            f"({picks}): **max_concurrent_downloads = {default}**. More connections cost "
            "registry rate limits and memory, so ties go to the smaller N. "
            f"Today's default ({today}) against the best median: "
            + ", ".join(f"{name} {v}" for name, v in slower.items()) + ".", "",
            "Without a total cap, a throttled pull takes about as long as its busiest "
            "connection: an image with one dominant layer gains nothing beyond N = 2, and one "
            "of many similar small layers gains until N reaches its layer count (in rounds of "
            "ceil(layers / N)), whatever the latency and bandwidth. So the choice rests on "
            "the image shapes more than on the network.", "",
            "Not modelled: TCP/TLS handshakes on new connections, token fetches and "
            "redirects to blob storage (more round trips per layer), and a node's total "
            "bandwidth (`--total-bandwidth`).", ""]
    return "\n".join(out), default


def update_doc(section: str) -> None:
    """Replace (or append) the section in docs/benchmarks.md, creating the file."""
    _harness.update_doc(SECTION, section)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Measure image pull time against services.puller.max_concurrent_downloads "
                    "with real NATS, registry and puller, through a throttling proxy. "
                    "MB = 10^6 bytes.")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                   default="1,2,3,4,6,8", metavar="N,N,...",
                   help="values of max_concurrent_downloads to measure (default: %(default)s)")
    _harness.number(p, "--repetitions", 3, "pulls per N, shape and network")
    p.add_argument("--shape", dest="shapes", type=parse_shape, action="append",
                   metavar="NAME=MB,MB,...",
                   help="an image shape: layer sizes in MB, COUNTxMB repeats one; repeatable "
                        f"(default: {' '.join(DEFAULT_SHAPES)})")
    _harness.number(p, "--latency-ms", 50.0, "proxy delay before the first byte of every request")
    _harness.number(p, "--bandwidth", 8.0, "proxy cap per connection, MB/s; 0: none")
    _harness.number(p, "--total-bandwidth", 0.0,
                    "proxy cap on all connections together, MB/s; 0: none")
    p.add_argument("--no-loopback", action="store_true",
                   help="skip the unthrottled reference runs")
    args = _harness.parse(p, argv, root="shoal-bench")
    args.shapes = args.shapes or [parse_shape(s) for s in DEFAULT_SHAPES]
    if min(args.concurrency) < 1 or args.repetitions < 1:
        p.error("concurrency values and repetitions must be >= 1")
    if len({s.name for s in args.shapes}) != len(args.shapes):
        p.error("shape names must differ")
    return args


async def bench_main(args: argparse.Namespace, root: Path, nats_url: str,
                     registry: Registry) -> Bench:
    bench = Bench(args, root, nats_url, registry)
    await _harness.run_then_close(bench.run(), bench.close)
    return bench


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(UTC)
    root = (args.root or Path(f"/tmp/shoal-bench-{started:%Y%m%d-%H%M%S}")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    command = shlex.join([".venv/bin/python", "bench/pull_concurrency.py",
                          *(sys.argv[1:] if argv is None else argv)])
    print(f"state under {root}", flush=True)
    t0, ticks0, load0 = time.monotonic(), cpu_ticks(), os.getloadavg()[0]
    signal.signal(signal.SIGTERM, interrupt)
    try:
        with nats_server(root / "nats") as nats_url, Registry(root / "registry") as registry:
            bench = _harness.run_loop(bench_main(args, root, nats_url, registry))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"\ninterrupted; every process stopped; files left in {root}", file=sys.stderr)
        return 130
    minutes = (time.monotonic() - t0) / 60
    ticks1 = cpu_ticks()
    # Everything counts, this benchmark's processes included; far above their share means
    # something else ran meanwhile and the numbers are suspect.
    busy = (ticks1[0] - ticks0[0]) / max(1, ticks1[1] - ticks0[1])
    load = (f"load average {load0:.2f} at the start, all CPUs {busy:.0%} busy during the run "
            "(this benchmark included)")
    (root / "runs.json").write_text(json.dumps([asdict(r) for r in bench.runs], indent=1))
    section, default = report(args, bench, command, started, minutes, load)
    print("\n" + section)
    if args.update_docs:
        update_doc(section)
        print(f"wrote {DOC}")
    print(f"chosen max_concurrent_downloads = {default}")
    print(f"raw results in {root / 'runs.json'}; state left in {root} (delete it by hand)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
