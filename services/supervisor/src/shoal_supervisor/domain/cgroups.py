"""Reading a container's cgroup: usage for stats and the OOM kill counter, on cgroup v1
(one hierarchy per controller) and v2 (unified)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def is_unified(root: Path = ROOT) -> bool:
    return (root / "cgroup.controllers").exists()


def proc_cgroup(pid: int) -> str:
    """The cgroup path of a process as its memory controller sees it (v1) or its unified
    path (v2); "" when the process is gone. This is where runc really put the container,
    whatever form (absolute, relative, systemd slice) its cgroupsPath had."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return ""
    unified = ""
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
        if controllers == "":
            unified = path
    return unified


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    """`key value` lines (memory.stat, memory.oom_control, memory.events, cpu.stat)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            values[key] = int(value)
        except ValueError:
            continue
    return values


@dataclass(frozen=True)
class Usage:
    timestamp_ns: int
    cpu_usage_ns: int
    memory_usage_bytes: int
    memory_working_set_bytes: int
    pids: int


class Cgroup:
    """One container's cgroup, given its path inside the hierarchy (e.g. /shoal/<id>)."""

    def __init__(self, path: str, root: Path = ROOT) -> None:
        self.path = path.strip("/")
        self.root = root
        self.unified = is_unified(root)

    def dir(self, controller: str) -> Path:
        return self.root / self.path if self.unified else self.root / controller / self.path

    def exists(self) -> bool:
        return self.dir("memory").is_dir()

    def usage(self) -> Usage:
        """CPU time, memory and pids now; missing files (cgroup gone) read as 0. The working
        set is usage minus inactive file pages, as kubelet/cAdvisor compute it."""
        now = time.time_ns()
        if self.unified:
            d = self.dir("")
            cpu = _read_keyed(d / "cpu.stat").get("usage_usec", 0) * 1000
            memory = _read_int(d / "memory.current") or 0
            inactive = _read_keyed(d / "memory.stat").get("inactive_file", 0)
            pids = _read_int(d / "pids.current") or 0
        else:
            cpu = _read_int(self.dir("cpuacct") / "cpuacct.usage") or 0
            memory = _read_int(self.dir("memory") / "memory.usage_in_bytes") or 0
            inactive = _read_keyed(self.dir("memory") / "memory.stat").get(
                "total_inactive_file", 0)
            pids = _read_int(self.dir("pids") / "pids.current") or 0
        return Usage(now, cpu, memory, max(0, memory - inactive), pids)

    def oom_kills(self) -> int | None:
        """Processes the kernel OOM-killed in this cgroup; None when it cannot be read (the
        cgroup is gone, or a kernel before 4.13 without the counter)."""
        if self.unified:
            values = _read_keyed(self.dir("") / "memory.events")
        else:
            values = _read_keyed(self.dir("memory") / "memory.oom_control")
        return values.get("oom_kill")

    def memory_swap_accounted(self) -> bool:
        """Whether a memory limit must be paired with a swap limit (v1 with memsw)."""
        if self.unified:
            return (self.dir("") / "memory.swap.max").exists()
        return (self.root / "memory" / "memory.memsw.limit_in_bytes").exists()


class OomEventFd:
    """cgroup v1 OOM notification: an eventfd registered on memory.oom_control through
    cgroup.event_control. It becomes readable on each OOM in the cgroup and when the cgroup
    is removed (the counter tells which)."""

    def __init__(self, cgroup: Cgroup) -> None:
        memdir = cgroup.dir("memory")
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self._control = os.open(memdir / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            try:
                event_control = os.open(memdir / "cgroup.event_control",
                                        os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(event_control, f"{self.fd} {self._control}".encode())
                finally:
                    os.close(event_control)
            except OSError:
                os.close(self._control)
                raise
        except OSError:
            os.close(self.fd)
            raise

    def drain(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        for fd in (self.fd, self._control):
            try:
                os.close(fd)
            except OSError:
                pass
