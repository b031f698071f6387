"""Reading a container's cgroup: usage for stats and the OOM kill counter, on cgroup v1
(one hierarchy per controller) and v2 (unified).

A cgroup path comes from a request (or /proc/<pid>/cgroup): every file is opened only once
its directory resolves inside the hierarchy, so no path can make us read elsewhere."""

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


def within(path: Path, root: Path = ROOT) -> bool:
    """Whether `path`, symlinks resolved, is `root` or below it."""
    real = Path(os.path.realpath(path))
    return real.is_relative_to(os.path.realpath(root))


def _read_int(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_keyed(path: Path | None) -> dict[str, int]:
    """`key value` lines (memory.stat, memory.oom_control, memory.events, cpu.stat)."""
    if path is None:
        return {}
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

    def file(self, controller: str, name: str) -> Path | None:
        """`name` in the directory of `controller`; None if that would leave the root."""
        d = self.dir(controller)
        return d / name if within(d, self.root) else None

    def exists(self) -> bool:
        return within(self.dir("memory"), self.root) and self.dir("memory").is_dir()

    def usage(self) -> Usage:
        """CPU time, memory and pids now; missing files (cgroup gone) read as 0. The working
        set is usage minus inactive file pages, as kubelet/cAdvisor compute it."""
        now = time.time_ns()
        if self.unified:
            cpu = _read_keyed(self.file("", "cpu.stat")).get("usage_usec", 0) * 1000
            memory = _read_int(self.file("", "memory.current")) or 0
            inactive = _read_keyed(self.file("", "memory.stat")).get("inactive_file", 0)
            pids = _read_int(self.file("", "pids.current")) or 0
        else:
            cpu = _read_int(self.file("cpuacct", "cpuacct.usage")) or 0
            memory = _read_int(self.file("memory", "memory.usage_in_bytes")) or 0
            inactive = _read_keyed(self.file("memory", "memory.stat")).get(
                "total_inactive_file", 0)
            pids = _read_int(self.file("pids", "pids.current")) or 0
        return Usage(now, cpu, memory, max(0, memory - inactive), pids)

    def oom_kills(self) -> int | None:
        """Processes the kernel OOM-killed in this cgroup; None when it cannot be read (the
        cgroup is gone, or a kernel before 4.13 without the counter)."""
        if self.unified:
            values = _read_keyed(self.file("", "memory.events"))
        else:
            values = _read_keyed(self.file("memory", "memory.oom_control"))
        return values.get("oom_kill")

    def memory_swap_accounted(self) -> bool:
        """Whether a memory limit must be paired with a swap limit (v1 with memsw)."""
        if self.unified:
            path = self.file("", "memory.swap.max")
        else:  # the hierarchy's own file: no request path in it
            path = self.root / "memory" / "memory.memsw.limit_in_bytes"
        return path is not None and path.exists()


class OomEventFd:
    """cgroup v1 OOM notification: an eventfd registered on memory.oom_control through
    cgroup.event_control. It becomes readable on each OOM in the cgroup and when the cgroup
    is removed (the counter tells which)."""

    def __init__(self, cgroup: Cgroup) -> None:
        memdir = cgroup.dir("memory")
        if not within(memdir, cgroup.root):
            raise OSError(f"cgroup {cgroup.path} leaves {cgroup.root}")
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
