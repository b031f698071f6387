"""containerd 1.6 as the node of bench/churn.py's pod churn (`--runtime containerd`): the
same lives, kubelet retries, deadlines and checks (tests/support/chaos.py) against its CRI
plugin, while its daemon is SIGKILLed every few seconds and restarted at once, as systemd's
Restart=always would. Its shims live on, as under containerd.service's KillMode=process.

The daemon runs in a mount namespace that outlives it: made once per run (`unshare
--mount=<file>` on a private bind mount under the run's root) with a tmpfs on /run
(containerd 1.6 puts shim sockets under /run/containerd/s whatever its config says), and
entered by every start (`nsenter --mount=<file>`). So a restarted daemon sees what the
killed one left (shim sockets, runc state, netns and rootfs mounts) and can adopt its shims
as on a host, and nothing is written to the host's /run. At the end the namespace is
unmounted and whatever of the run is left is killed.

What is left is checked like Shoal's (tests/support/shoal.py `leftovers_at`): processes
naming the run's root (shims), the pods' cgroups, mounts (the host's and the namespace's),
netns, IP leases (its own host-local dataDir), runc state, task bundles and the CRI
plugin's pod and container directories, and containerd's container and task records.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Restarts fork while the churn's gRPC channel is busy: without this, gRPC (read at its
# import, hence before it) logs "skipping fork() handlers" each time. The child only execs.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import _harness as h
from shoal_common.fs import Under
from support.chaos_nodes import Spawn, subnet_prefix, until_runtime_ready

TARGET = "containerd"  # the daemon, as a kill target
NAMESPACE = "k8s.io"  # the CRI plugin's containerd namespace
SHIM = "/usr/bin/containerd-shim-runc-v2"
CONTROLLERS = ("memory", "pids", "cpu")  # the cgroups checked, as for Shoal's pods
RESTART_POLL = 0.05  # how soon a dead daemon is seen (systemd's RestartSec is 100 ms)
SUBNET = "10.211.{n}.0/24"  # a run's pods; bridge ctrdchurn<n>
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
ID = re.compile(r"[0-9a-f]{64}")


def missing() -> str | None:
    """What to install before `--runtime containerd` can run, if anything."""
    absent = [p for p in (h.CONTAINERD, h.CTR, SHIM) if not Path(p).exists()]
    if not absent:
        return None
    return (f"{', '.join(absent)} not found: --runtime containerd needs containerd 1.6 and "
            "its ctr; install them with `apt-get install -y containerd` (Debian's; benchmarks "
            "only, deploy/setup.sh does not install it)")


def free_network() -> tuple[str, str]:
    """A subnet and bridge no other run uses (IP leases are each run's own)."""
    for n in range(1, 255):
        if not Path(f"/sys/class/net/ctrdchurn{n}").exists():
            return SUBNET.format(n=n), f"ctrdchurn{n}"
    raise RuntimeError("no free bridge ctrdchurnN")


def _run(argv: Sequence[str]) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _names(path: Path, prefix: str = "") -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith(prefix)) \
        if path.is_dir() else []


@dataclass
class ContainerdUp:
    """A throwaway containerd (bench/_harness.py's config and CNI network: its own root,
    state, socket, subnet and bridge, images from a plain-HTTP local registry) that
    run_chaos can churn, kill (target "containerd": the daemon) and check like a
    `shoal up`. Call close() when done, also after a failure."""

    root: Path
    images: dict[str, str]
    registry_host: str  # 127.0.0.1:PORT
    subnet: str
    bridge: str
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    ctrd: h.Containerd = field(init=False)
    _restarts: int = field(default=0, init=False)
    _records: list[str] = field(default_factory=list, init=False)  # taken by stop()
    _watch: asyncio.Task[None] | None = field(default=None, init=False)
    _spawn: Spawn = field(default=h.spawn, init=False)

    def __post_init__(self) -> None:
        self.ctrd = h.Containerd(self.root, h.CriSettings(
            sandbox_image=self.images["pause"], registry_host=self.registry_host,
            subnet=self.subnet, bridge=self.bridge, network_name="ctrd-churn"))

    name = "containerd"  # not a field: what reports call this runtime

    @property
    def cri_socket(self) -> Path:
        return self.ctrd.socket

    @property
    def log_path(self) -> Path:
        return self.ctrd.log_path

    @property
    def subnet_prefix(self) -> str:
        return subnet_prefix(self.subnet)

    config_path = Under("root", "config.toml")
    ns_dir = Under("root", "mntns")
    ns_file = Under("ns_dir", "mnt")

    # ------------------------------------------------------------------ life

    async def start(self, spawn: Spawn = h.spawn, timeout: float = 90) -> None:
        """Write its config, make its mount namespace, start it (`spawn`: from the main
        thread, see h.spawn) and restart it whenever it dies; wait for RuntimeReady."""
        problem = missing()
        if problem:
            raise RuntimeError(problem)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.ctrd.config())
        (self.root / "cni").mkdir(exist_ok=True)
        (self.root / "cni" / "10-churn.conflist").write_text(
            json.dumps(self.ctrd.cni_conflist(), indent=1) + "\n")
        self._make_namespace()
        self._spawn = spawn
        self._launch()
        self._watch = asyncio.create_task(self._restart_when_dead())
        try:
            await until_runtime_ready(self.cri_socket, timeout)
        except RuntimeError as exc:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"containerd: {exc}:\n{tail}") from None

    def _make_namespace(self) -> None:
        # The namespace file's mount must not propagate: hence the private bind mount.
        self.ns_dir.mkdir(parents=True, exist_ok=True)
        _run(["mount", "--bind", str(self.ns_dir), str(self.ns_dir)])
        _run(["mount", "--make-private", str(self.ns_dir)])
        self.ns_file.touch()
        _run(["unshare", f"--mount={self.ns_file}", "--propagation", "private", "--",
              "mount", "-t", "tmpfs", "-o", "mode=0755,size=256m", "ctrd-churn-run", "/run"])

    def _launch(self) -> None:
        # nsenter execs containerd (no fork without --pid): the child is the daemon.
        self.proc = self._spawn(["nsenter", f"--mount={self.ns_file}", "--", h.CONTAINERD,
                                 "--config", str(self.config_path)], self.log_path)

    async def _restart_when_dead(self) -> None:
        while True:
            await asyncio.sleep(RESTART_POLL)
            assert self.proc is not None
            if self.proc.poll() is not None:
                self._relaunch()

    def _relaunch(self) -> None:
        assert self.proc is not None
        self._restarts += 1
        with open(self.log_path, "a") as log:
            log.write(f"churn: containerd exited {self.proc.returncode}; restarting\n")
        self._launch()

    def pids_of(self, target: str) -> list[int]:
        if target != TARGET:
            return []
        return [pid for pid in h.pids_mentioning(str(self.config_path))
                if h.process_name(pid) == "containerd"]

    def restarts(self) -> int:
        return self._restarts

    async def stop(self, timeout: float = 90) -> int | None:
        """No more restarts; its records listed; SIGTERM (as `systemctl stop`): its exit
        code, or None if it had to be killed. Its shims, like Shoal's conmons, are left for
        leftovers() to find."""
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self._records = self._listed_records()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
            return None

    def _listed_records(self) -> list[str]:
        """containerd's container and task records (Shoal's are its executor and
        supervisor rows), while it still answers."""
        out = []
        for kind in ("containers", "tasks"):
            try:
                ids = _run([h.CTR, "-a", str(self.cri_socket), "-n", NAMESPACE, kind, "ls",
                            "-q"]).split()
            except RuntimeError as exc:
                out.append(f"containerd {kind}: not listed: {exc}")
                continue
            out += [f"containerd {kind[:-1]} record {i}" for i in ids]
        return out

    # ------------------------------------------------------------------ what is left

    def _ids(self) -> set[str]:
        """Every pod and container id it handled: its log names each (info level)."""
        return set(ID.findall(self.log_path.read_text(errors="replace")))

    def _cgroups(self) -> list[Path]:
        return [d for ctrl in CONTROLLERS for i in sorted(self._ids())
                if (d := Path(f"/sys/fs/cgroup/{ctrl}/{NAMESPACE}/{i}")).is_dir()]

    def _in_namespace(self, argv: Sequence[str]) -> str:
        if not _mounted(self.ns_file):
            return ""
        return _run(["nsenter", f"--mount={self.ns_file}", "--", *argv])

    def _mounts(self) -> list[str]:
        ours = {str(self.ns_dir), str(self.ns_file)}
        found = [f"mount {p}" for p in _mount_points(Path("/proc/self/mountinfo").read_text())
                 if p.startswith(str(self.root)) and p not in ours]
        inside = _mount_points(self._in_namespace(["cat", "/proc/self/mountinfo"]))
        found += [f"mount (its namespace) {p}" for p in inside if p not in ours
                  and (p.startswith(str(self.root)) or p.startswith("/run/containerd"))]
        return found

    def _files(self) -> list[str]:
        state, data = self.root / "state", self.root / "root"
        found = [f"netns {n}" for n in _names(state / CRI_PLUGIN / "netns")]
        found += [f"ip lease {n}" for n in _names(self.root / "cni-ipam" / "ctrd-churn",
                                                   self.subnet_prefix)]
        runc = self._in_namespace(["sh", "-c", f"ls -A /run/containerd/runc/{NAMESPACE} "
                                   "2>/dev/null || true"])
        found += [f"runc state {n}" for n in runc.split()]
        found += [f"bundle {n}" for n in _names(state / "io.containerd.runtime.v2.task"
                                                 / NAMESPACE)]
        for base in (data, state):
            for kind in ("sandboxes", "containers"):
                found += [f"{base.name}/{CRI_PLUGIN}/{kind}/{n}"
                          for n in _names(base / CRI_PLUGIN / kind)]
        return found

    def leftovers(self, before: set[str], ours: set[int]) -> list[str]:
        """What is left once it stopped (`before` is Shoal's: ids from its log suffice)."""
        found = list(self._records)
        for pid in h.pids_mentioning(str(self.root)):
            if pid not in ours:
                with contextlib.suppress(OSError):  # gone meanwhile
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    found.append(f"process {pid}: " + cmdline.replace(b"\0", b" ")
                                 .decode(errors="replace")[:200])
        found += [f"cgroup {d}" for d in self._cgroups()]
        return found + self._mounts() + self._files()

    def scrub(self, leaks: Sequence[str], ours: set[int]) -> None:
        self.close(ours)

    def close(self, ours: set[int]) -> None:
        """Idempotent: the daemon (no more restarts), every process naming the root (its
        shims) or in its pods' cgroups killed, those cgroups removed, the namespace
        unmounted (its mounts and netns go with it), the bridge deleted."""
        if self._watch is not None:
            self._watch.cancel()  # synchronous: it cannot restart anything before it ends
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        cgroups = self._cgroups()
        pids = set(h.pids_mentioning(str(self.root))) - ours
        for d in cgroups:
            with contextlib.suppress(OSError, ValueError):
                pids |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)  # the killed leave their cgroups
        for d in cgroups:
            with contextlib.suppress(OSError):
                d.rmdir()
        for point in (self.ns_file, self.ns_dir):
            if _mounted(point):
                subprocess.run(["umount", str(point)], capture_output=True, check=False)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, check=False)


def _mount_points(mountinfo: str) -> list[str]:
    return [line.split()[4].replace("\\040", " ") for line in mountinfo.splitlines() if line]


def _mounted(path: Path) -> bool:
    """In this mount namespace (os.path.ismount misses a bind mount of a directory on
    itself)."""
    return str(path) in _mount_points(Path("/proc/self/mountinfo").read_text())
