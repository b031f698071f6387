"""Kernel samepage merging (KSM) of Shoal's own Python heaps.

The services are forked from one preloaded zygote, but CPython 3.11 writes a reference
count (and, in code objects, warm-up counters) into every object it touches, so each child
copies 10-13 MiB of the zygote's pages although most of them end up byte for byte what
they were (a count that went up comes down again). KSM finds such identical anonymous pages
and maps them back to one copy-on-write page: measured here, the idle footprint of
`shoal up` fell from 153 to 127-133 MiB. Only the mappings marked MADV_MERGEABLE are scanned:
the zygote marks its private writable ones before it forks (the children inherit the
marks; an exec, such as runc's or conmon's, drops them, so no container's memory is ever
merged), and each service marks its own once it is up.

KSM is a kernel-wide switch (/sys/kernel/mm/ksm/run); `shoal up` turns it on when it is off
(`launcher.merge_pages`, logged), as kubelet sets the sysctls it needs. The scan rate stays
the kernel's (about 1% of a core over Shoal's ~300 MiB of marked pages here), but for a
minute after a service starts (ScanBoost: ~5%, so that its pages merge within seconds).
What else it costs: a page fault when a merged page is written again. A merged page holds
exactly what each process had; the side channel KSM opens (timing a write tells whether a
page of guessed content exists elsewhere) reaches only Shoal's own marked heaps, never a
container's memory, and guessing a whole 4 KiB heap page around a secret is impractical.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

MADV_MERGEABLE = 12
MADV_PAGEOUT = 21  # Linux 5.4
SYS_PROCESS_MADVISE = 440  # Linux 5.10; the same number on x86_64 and the generic table (arm64)
UIO_MAXIOV = 1024  # iovecs per process_madvise call
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
KSM_RUN = Path("/sys/kernel/mm/ksm/run")
PAGES_TO_SCAN = Path("/sys/kernel/mm/ksm/pages_to_scan")  # per ksmd wake-up (20 ms)
KERNEL_SCAN = 100  # the kernel's default: ~1% of a core here over Shoal's ~300 MiB
# While services start: their pages merge within seconds instead of ~30 s (~5% of a core).
BOOST_SCAN = 500
BOOST_SECONDS = 60.0
# Never marked: the stack (a thread's stack changes all the time), and the kernel's own.
_SKIP = {"[stack]", "[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _mappings(maps: str) -> Iterator[tuple[int, int, str, str]]:
    """(start, end, permissions, name) of each mapping in a /proc/<pid>/maps text; name ""
    for an anonymous one."""
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or len(fields[1]) != 4:
            continue
        start, _, end = fields[0].partition("-")
        yield (int(start, 16), int(end, 16), fields[1],
               fields[5].strip() if len(fields) == 6 else "")


def _private_writable(maps: str) -> list[tuple[int, int]]:
    """(start, end) of each private writable mapping in a /proc/<pid>/maps text: the heap,
    anonymous mappings (obmalloc's arenas, mmap'd malloc) and libraries' data."""
    return [(start, end) for start, end, perms, name in _mappings(maps)
            if perms[1] == "w" and perms[3] == "p" and name not in _SKIP]


def _file_read_only(maps: str) -> list[tuple[int, int]]:
    """(start, end) of each private read-only mapping of a file in a /proc/<pid>/maps text:
    program and library text and read-only data, whose pages the page cache can give back."""
    return [(start, end) for start, end, perms, name in _mappings(maps)
            if perms[1] != "w" and perms[3] == "p" and name.startswith("/")]


def page_out_file_pages(pid: int) -> int:
    """MADV_PAGEOUT (process_madvise, through a pidfd) every read-only file mapping of a
    child: the pages of its program text and read-only data that it faulted in, with the
    neighbours the kernel's fault-around mapped along (64 KiB at a time), leave its resident
    set, and what it runs afterwards is faulted back in. The kernel skips pages another
    process maps too (libc: nothing to gain). For nats-server, a static Go binary of which
    start-up leaves ~14 MiB resident: measured here 17.9 -> 12.2 MiB PSS idle and 18.2 ->
    13.8 MiB with 20 pods running (bench/ab.py); ~16 MiB again after minutes idle. Not done
    for Shoal's own services: what they map alone (grpc's 9 MiB in the gateway) came back
    within a few dozen requests.
    Returns the bytes advised; 0 where the kernel lacks the call or the process is gone:
    only the saving is lost."""
    try:
        ranges = _file_read_only(Path(f"/proc/{pid}/maps").read_text())
        pidfd = os.pidfd_open(pid)
    except OSError:
        return 0  # gone
    advised = 0
    try:
        for at in range(0, len(ranges), UIO_MAXIOV):
            batch = ranges[at:at + UIO_MAXIOV]
            vec = (_IoVec * len(batch))(*(_IoVec(s, e - s) for s, e in batch))
            done = _libc.syscall(ctypes.c_long(SYS_PROCESS_MADVISE), ctypes.c_int(pidfd),
                                 vec, ctypes.c_size_t(len(batch)),
                                 ctypes.c_int(MADV_PAGEOUT), ctypes.c_uint(0))
            if done < 0:
                break  # ENOSYS/EINVAL (an older kernel), or the process changed its maps
            advised += done
    finally:
        os.close(pidfd)
    return advised


def resident_bytes(pid: int) -> int:
    """A process's resident set (0 once it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def mark_mergeable() -> int:
    """madvise(MADV_MERGEABLE) every private writable mapping of this process; the bytes
    marked (0 where the kernel has no KSM). Marks are inherited by fork, not by exec."""
    if not KSM_RUN.exists():
        return 0  # a kernel without KSM: madvise would refuse every range
    marked = 0
    for start, end in _private_writable(Path("/proc/self/maps").read_text()):
        # A refusal is a mapping KSM cannot take (VM_IO, hugetlb...) or one gone since read.
        if _libc.madvise(start, end - start, MADV_MERGEABLE) == 0:
            marked += end - start
    return marked


def ksm_state() -> str:
    """'on', 'off', 'unmerging' (run = 2: an operator asked to undo every merge) or
    'absent' (a kernel without KSM)."""
    try:
        value = KSM_RUN.read_text().strip()
    except OSError:
        return "absent"
    return {"0": "off", "1": "on", "2": "unmerging"}.get(value, f"run={value}")


def ensure_ksm() -> tuple[str, bool]:
    """Turn KSM on if it is off: (state now, whether this call turned it on). 'unmerging'
    is an operator's explicit choice and is left alone; so is a kernel that refuses."""
    state = ksm_state()
    if state != "off":
        return state, False
    try:
        KSM_RUN.write_text("1\n")
    except OSError:
        return state, False
    return ksm_state(), True


class ScanBoost:
    """KSM's scan rate raised to BOOST_SCAN for BOOST_SECONDS after each `arm()` (a service
    started), then put back. Only a rate that is the kernel's default is raised: one an
    operator chose is theirs. Put back only if it is still ours (`end()`, also at stop)."""

    def __init__(self, path: Path = PAGES_TO_SCAN) -> None:
        self.path = path
        self.restore_to: int | None = None
        self._timer: asyncio.TimerHandle | None = None

    def _read(self) -> int | None:
        try:
            return int(self.path.read_text())
        except (OSError, ValueError):
            return None

    def arm(self, seconds: float = BOOST_SECONDS) -> None:
        if self.restore_to is None:
            if self._read() != KERNEL_SCAN:
                return
            try:
                self.path.write_text(f"{BOOST_SCAN}\n")
            except OSError:
                return
            self.restore_to = KERNEL_SCAN
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, self.end)

    def end(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.restore_to is not None and self._read() == BOOST_SCAN:
            try:
                self.path.write_text(f"{self.restore_to}\n")
            except OSError:
                pass
        self.restore_to = None
