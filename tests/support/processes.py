"""Start real Shoal processes (services, `shoal up`) for tests, and clean them up."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shoal_common.catalog import SERVICES
from shoal_common.fs import Under
from shoal_executor.domain import masquerade

SHOAL = str(Path(sys.executable).parent / "shoal")  # the CLI installed beside this Python

SERVICE_MODULES = {
    "puller": "shoal_puller",
    "snapshotter": "shoal_snapshotter",
    "executor": "shoal_executor",
    "supervisor": "shoal_supervisor",
    "cri-gateway": "shoal_cri_gateway",
    "docker-gateway": "shoal_docker_gateway",
}


@dataclass
class CliResult:
    """What a finished `shoal` command said."""

    code: int
    out: str
    err: str


async def finished(proc: asyncio.subprocess.Process, timeout: float = 30) -> CliResult:
    """The result of `proc` (started with stdout and stderr piped), once it exits."""
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())


def mergeable(pid: int) -> int:
    """Bytes of `pid`'s mappings marked for KSM (VmFlags "mg" in /proc/<pid>/smaps)."""
    size = total = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            low, high = head.split("-")
            size = int(high, 16) - int(low, 16)
        elif head == "VmFlags:" and "mg" in line.split()[1:]:
            total += size
    return total


def shoal_up_argv(root: Path, node_id: str, sets: Iterable[str], *extra: str) -> list[str]:
    """`shoal up` for `node_id` with its state and run roots under `root`, a `--set` for
    each KEY=VALUE in `sets`, then `extra` (e.g. `--replicas puller=2`)."""
    return [SHOAL, "up", "--node-id", node_id, "--state-root", str(root / "state"),
            "--run-root", str(root / "run"), *(a for s in sets for a in ("--set", s)), *extra]


# `shoal up` starts the docker gateway at its first connection; tests that watch every
# service's process (restarts, kills, targets, status) want it running from the start.
EVERY_SERVICE_AT_START = "docker.on_demand=false"


def metrics_sets(port: Callable[[], int] = lambda: 0) -> list[str]:
    """`--set` values serving the launcher's and every service's /metrics on loopback: the
    launcher on any free port, each service on `port()` (0: any free one)."""
    return ["launcher.metrics_addr=127.0.0.1:0",
            *(f"services.{s.config_key}.metrics_addr=127.0.0.1:{port()}" for s in SERVICES)]


@dataclass
class Node:
    """Where one test node keeps its files, and how its processes reach NATS."""

    node_id: str
    nats_url: str
    root: Path

    state_root = Under("root", "state")
    run_root = Under("root", "run")
    cri_socket = Under("run_root", "cri.sock")

    def flags(self) -> list[str]:
        return ["--node-id", self.node_id, "--nats-url", self.nats_url,
                "--state-root", str(self.state_root), "--run-root", str(self.run_root)]


@dataclass
class ServiceProcess:
    service: str
    replica: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    metrics_addr: str = ""

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


@dataclass
class ServiceSet:
    node: Node
    procs: list[ServiceProcess] = field(default_factory=list)
    subnet_prefix: str = ""  # of the pod network start_shoal gave this node, e.g. "10.41."
    extra: list[str] = field(default_factory=list)  # the flags start_shoal gave each service
    # The node's own pod network (start_shoal's), removed by stop_all: see release_network.
    pod_subnet: str = ""
    bridge: str = ""

    def start(self, service: str, replica: str | None = None,
              extra: Sequence[str] = (), env: dict[str, str] | None = None) -> ServiceProcess:
        """`env`: more environment for this process (e.g. SHOAL_FAULTS)."""
        replica = replica or f"{service}-{len([p for p in self.procs if p.service == service])}"
        log_dir = self.node.root / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{replica}.log"
        # Tests name their pause image (extra's --set wins); without one the puller would
        # make the built-in one and every store would start with its three blobs.
        argv = [sys.executable, "-m", SERVICE_MODULES[service], *self.node.flags(),
                "--replica-id", replica, "--metrics-addr", "127.0.0.1:0",
                "--set", "log.format=json",
                "--set", 'cri.sandbox_image="registry.k8s.io/pause:3.9"', *extra]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env={**os.environ, **env} if env else None)
        sp = ServiceProcess(service, replica, proc, log_path)
        self.procs.append(sp)
        return sp

    def wait_serving(self, sp: ServiceProcess, timeout: float = 30) -> None:
        """Until the replica logs that it serves (its metrics address is in that line)."""
        import json

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if sp.proc.poll() is not None:
                raise AssertionError(f"{sp.replica} exited {sp.proc.returncode}:\n"
                                     f"{sp.log_text()[-3000:]}")
            for line in sp.log_text().splitlines():
                if '"serving"' in line:
                    sp.metrics_addr = json.loads(line)["metrics"]
                    return
            time.sleep(0.05)
        raise AssertionError(f"{sp.replica} not serving in {timeout}s:\n{sp.log_text()[-3000:]}")

    def stop_all(self) -> None:
        for sp in self.procs:
            if sp.proc.poll() is None:
                sp.proc.send_signal(signal.SIGTERM)
        for sp in self.procs:
            try:
                sp.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                sp.proc.kill()
                sp.proc.wait()
        release_network(self.bridge, self.pod_subnet)

    def __iter__(self) -> Iterator[ServiceProcess]:
        return iter(self.procs)


def release_network(bridge: str, pod_subnet: str) -> None:
    """What a node's pod network leaves on the host once its services are gone: the bridge
    (the CNI bridge plugin makes it at the first pod's ADD and no DEL deletes it) and the
    executor's masquerade chain (left by an executor that did not stop cleanly, or stopped
    with pods on it). Only these names: other nodes may be running beside it."""
    if bridge:
        delete_link(bridge)
    if pod_subnet:
        delete_masquerade(pod_subnet)


def delete_link(name: str) -> None:
    """`ip link delete`; a link that is already gone is no error."""
    done = subprocess.run(["ip", "link", "delete", name], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0 and "Cannot find device" not in done.stderr:
        raise RuntimeError(f"ip link delete {name}: {done.stderr.strip()}")


def delete_masquerade(subnet: str) -> None:
    """The executor's nat chain for `subnet` (IPv4) and every POSTROUTING jump to it, as
    domain/masquerade.remove() does; none there is no error."""
    name = masquerade.chain(ipaddress.ip_network(subnet))
    nat = ["iptables", "-w", "-t", "nat"]
    rules = subprocess.run([*nat, "-S", "POSTROUTING"], capture_output=True, text=True,
                           check=True).stdout
    for rule in rules.splitlines():
        words = shlex.split(rule)  # -A POSTROUTING ... -j NAME; the comment is quoted
        if words[-2:] == ["-j", name]:
            subprocess.run([*nat, "-D", *words[1:]], capture_output=True, check=True)
    if subprocess.run([*nat, "-S", name], capture_output=True, check=False).returncode == 0:
        subprocess.run([*nat, "-F", name], capture_output=True, check=True)
        subprocess.run([*nat, "-X", name], capture_output=True, check=True)


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains `text` (e.g. a test's unique state root)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry))
    return found
