"""Reading a container's cgroup: usage for stats and the OOM kill counter, on cgroup v1
(one hierarchy per controller) and v2 (unified).

Which one is decided as runc decides it (libcontainer/cgroups IsCgroup2UnifiedMode): by the
filesystem mounted at /sys/fs/cgroup, statfs(2)'s f_type. cgroup2 there is the unified
mode; a tmpfs of v1 hierarchies is v1, even with a cgroup2 at /sys/fs/cgroup/unified
("hybrid": runc's v1 manager, and the controllers all bound to v1, so v1 files are read).

A cgroup path comes from a request (or /proc/<pid>/cgroup): every file is opened only once
its directory resolves inside the hierarchy, so no path can make us read elsewhere."""

from __future__ import annotations

import ctypes
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from shoal_supervisor.domain.inotify import IN_MODIFY, Inotify

ROOT = Path("/sys/fs/cgroup")
# statfs(2) f_type values (linux/magic.h).
CGROUP2_SUPER_MAGIC = 0x63677270
CGROUP_SUPER_MAGIC = 0x27E0EB
TMPFS_MAGIC = 0x01021994
UNIFIED, HYBRID, LEGACY = "unified", "hybrid", "legacy"

_libc = ctypes.CDLL(None, use_errno=True)


def fs_type(path: Path) -> int | None:
    """statfs(2)'s f_type of `path`, None when it cannot be statted. f_type is the first
    member of struct statfs (a word); the buffer is larger than the whole struct."""
    buf = ctypes.create_string_buffer(512)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return None
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


@functools.cache
def mode(root: Path = ROOT) -> str:
    """UNIFIED (cgroup2 at `root`), HYBRID (v1 with cgroup2 at `root`/unified) or LEGACY."""
    if fs_type(root) == CGROUP2_SUPER_MAGIC:
        return UNIFIED
    return HYBRID if fs_type(root / "unified") == CGROUP2_SUPER_MAGIC else LEGACY


def is_unified(root: Path = ROOT) -> bool:
    return mode(root) == UNIFIED


def parse_proc_cgroup(text: str, unified: bool) -> str:
    """The cgroup path in a /proc/<pid>/cgroup text: v2's `0::/path` line when unified;
    on v1 the path of the memory hierarchy (`N:ctrl[,ctrl]:/path` lines; runc puts every
    controller at the same path), then cpuacct or pids where memory is not mounted."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        hierarchy, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep and sep2):
            continue
        if hierarchy == "0" and controllers == "":
            paths[""] = path
        for controller in controllers.split(","):
            paths.setdefault(controller, path)
    if unified:
        return paths.get("", "")
    return next((paths[c] for c in ("memory", "cpuacct", "pids") if c in paths), "")


def proc_cgroup(pid: int, unified: bool | None = None) -> str:
    """The cgroup a process is in; "" when the process is gone. This is where runc really
    put the container, whatever form (absolute, relative, systemd slice) its cgroupsPath
    had."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return ""
    return parse_proc_cgroup(text, is_unified() if unified is None else unified)


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
    """Flat keyed files, `key value` lines (memory.stat, memory.oom_control, memory.events,
    cpu.stat)."""
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
    # cAdvisor's RSS and fault counters (CRI MemoryUsage has fields for them).
    memory_rss_bytes: int = 0
    page_faults: int = 0
    major_page_faults: int = 0


@dataclass(frozen=True)
class _Files:
    """Where each reading lives: v1 spreads them over controllers' hierarchies and counts
    children in `total_*` keys of memory.stat; v2 has one directory and plain keys."""

    cpu: tuple[str, str]  # (controller, file)
    cpu_key: str  # "" = the file is one number in ns; else a cpu.stat key in µs
    memory: str
    stat_prefix: str
    rss_key: str


_V1 = _Files(("cpuacct", "cpuacct.usage"), "", "memory.usage_in_bytes", "total_", "rss")
_V2 = _Files(("cpu", "cpu.stat"), "usage_usec", "memory.current", "", "anon")


class Cgroup:
    """One container's cgroup, given its path inside the hierarchy (e.g. /shoal/<id>).
    `unified`: the host's mode unless given (tests build either layout anywhere)."""

    def __init__(self, path: str, root: Path = ROOT, unified: bool | None = None) -> None:
        self.path = path.strip("/")
        self.root = root
        self.unified = is_unified(root) if unified is None else unified

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
        f = _V2 if self.unified else _V1
        if f.cpu_key:
            cpu = _read_keyed(self.file(*f.cpu)).get(f.cpu_key, 0) * 1000
        else:
            cpu = _read_int(self.file(*f.cpu)) or 0
        memory = _read_int(self.file("memory", f.memory)) or 0
        stat = _read_keyed(self.file("memory", "memory.stat"))
        inactive = stat.get(f.stat_prefix + "inactive_file", 0)
        pids = _read_int(self.file("pids", "pids.current")) or 0
        return Usage(now, cpu, memory, max(0, memory - inactive), pids,
                     memory_rss_bytes=stat.get(f.stat_prefix + f.rss_key, 0),
                     page_faults=stat.get(f.stat_prefix + "pgfault", 0),
                     major_page_faults=stat.get(f.stat_prefix + "pgmajfault", 0))

    def oom_kills(self) -> int | None:
        """Processes the kernel OOM-killed in this cgroup; None when it cannot be read (the
        cgroup is gone, or a kernel before 4.13 without the counter)."""
        return _read_keyed(self.oom_file()).get("oom_kill")

    def oom_file(self) -> Path | None:
        """v2 memory.events, v1 memory.oom_control: both hold the `oom_kill` counter."""
        return self.file("memory", "memory.events" if self.unified else "memory.oom_control")

    def memory_swap_accounted(self) -> bool:
        """Whether a memory limit must be paired with a swap limit: the kernel accounts swap
        (v1: memsw files; v2: memory.swap.max, absent without swap accounting)."""
        if self.unified:
            path = self.file("memory", "memory.swap.max")
        else:  # the hierarchy's own file: no request path in it
            path = self.root / "memory" / "memory.memsw.limit_in_bytes"
        return path is not None and path.exists()


class OomWatch(Protocol):
    """A descriptor that becomes readable when the cgroup may have OOM-killed."""

    fd: int

    def drain(self) -> None: ...

    def close(self) -> None: ...


def oom_watch(cgroup: Cgroup) -> OomWatch:
    """The host's way of being told of OOM events; OSError when it cannot be set up."""
    return OomEventsWatch(cgroup) if cgroup.unified else OomEventFd(cgroup)


class OomEventsWatch:
    """cgroup v2 OOM notification: memory.events "generates a file modified event" on
    every change of its counters (cgroup-v2.rst), seen here as inotify IN_MODIFY. The
    counter read afterwards tells whether it was an oom_kill."""

    def __init__(self, cgroup: Cgroup) -> None:
        events = cgroup.oom_file()
        if events is None:
            raise OSError(f"cgroup {cgroup.path} leaves {cgroup.root}")
        self._inotify = Inotify()
        try:
            self._inotify.add_watch(events, IN_MODIFY)
        except OSError:
            self._inotify.close()
            raise
        self.fd = self._inotify.fd

    def drain(self) -> None:
        self._inotify.read()

    def close(self) -> None:
        self._inotify.close()


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
