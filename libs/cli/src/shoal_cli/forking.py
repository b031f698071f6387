"""What the preloaded parent (shoal_cli.zygote) needs from Linux and glibc that the stdlib
does not offer: a fork whose child is its caller's sibling, and a command line the child
can replace exactly.

- `fork_sibling`: clone(2) with CLONE_PARENT. The service it makes is the launcher's own
  child, as one the launcher exec'd would be: the launcher waits for it (exit status, not
  a guess), PR_SET_PDEATHSIG fires when the launcher dies and not when the zygote does, and
  `ps --forest` shows it where it always was. A plain fork in the zygote would make the
  zygote every service's parent: killing it would take down all of them. The clone runs
  between PyOS_BeforeFork and PyOS_AfterFork_Child/Parent, as os.fork does (import lock,
  the os.register_at_fork hooks: random reseeds, threading and logging reset their locks),
  with the GIL held throughout (PyDLL), and with CLONE_CHILD_SETTID on the thread id that
  glibc keeps in its thread descriptor, as glibc's own fork does, so that the child's
  pthread calls name the child's thread and not the zygote's.
- `set_cmdline`: prctl(PR_SET_MM_MAP) points /proc/<pid>/cmdline at a new NUL-separated
  argv (no privilege needed; CONFIG_CHECKPOINT_RESTORE, as every distribution kernel has),
  so a forked service reads exactly like the `python -m shoal_<service> ...` it replaces,
  argument by argument (`shoal status`, tests and operators split it on NULs).
  setproctitle(3)-style rewriting cannot do that: it writes one space-joined string into
  the old argv and environment area, truncated to its size.

Only x86_64 and aarch64 with glibc: `supported()` says whether both work here; if not,
`shoal up` execs every service as before.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
from pathlib import Path

PR_SET_NAME = 15
PR_SET_MM = 35
PR_SET_MM_MAP = 14
M_ARENA_MAX = -8
CLONE_PARENT = 0x00008000
CLONE_CHILD_SETTID = 0x01000000

# Per architecture: syscall numbers (clone, brk, gettid), whether clone takes the child's
# tid pointer before the TLS argument (x86_64) or after it (CONFIG_CLONE_BACKWARDS: arm64),
# and where glibc's struct pthread keeps the thread id (checked against gettid() before use).
_ARCH = {
    "x86_64": ((56, 12, 186), True, 720),
    "aarch64": ((220, 214, 178), False, 208),
}

_libc = ctypes.CDLL(None, use_errno=True)
_held = ctypes.PyDLL(None, use_errno=True)  # keeps the GIL: nothing runs mid-fork
_libc.syscall.restype = ctypes.c_long
_held.syscall.restype = ctypes.c_long
_libc.pthread_self.restype = ctypes.c_void_p
for _name in ("PyOS_BeforeFork", "PyOS_AfterFork_Parent", "PyOS_AfterFork_Child"):
    getattr(ctypes.pythonapi, _name).restype = None
    getattr(ctypes.pythonapi, _name).argtypes = []

_cmdline: list[ctypes.Array[ctypes.c_char]] = []  # the kernel reads /proc/<pid>/cmdline here


class _MmMap(ctypes.Structure):
    """struct prctl_mm_map (linux/prctl.h)."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
        "start_stack", "arg_start", "arg_end", "env_start", "env_end", "auxv")] + [
        ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]


def _arch() -> tuple[tuple[int, int, int], bool, int] | None:
    return _ARCH.get(platform.machine())


def _tid_address() -> int | None:
    """Where glibc keeps this thread's id, if it is where we expect it."""
    arch = _arch()
    if arch is None:
        return None
    address = int(_libc.pthread_self()) + arch[2]
    tid = _libc.syscall(ctypes.c_long(arch[0][2]))
    return address if ctypes.c_int.from_address(address).value == tid else None


def set_cmdline(argv: list[str], *, rename: bool = True) -> bool:
    """Make /proc/self/cmdline read `argv` (NUL-separated, as execve leaves it) and, with
    `rename`, the process name (comm) the base name of argv[0], as an exec of it would.
    False if the kernel refused (the command line is then unchanged)."""
    arch = _arch()
    if arch is None:
        return False
    data = b"".join(arg.encode() + b"\0" for arg in argv)
    buf = ctypes.create_string_buffer(data, len(data))
    stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()

    def field(n: int) -> int:  # numbered as in proc(5); stat[0] is field 3
        return int(stat[n - 3])

    start = ctypes.addressof(buf)
    mm = _MmMap(start_code=field(26), end_code=field(27), start_data=field(45),
                end_data=field(46), start_brk=field(47),
                brk=_libc.syscall(ctypes.c_long(arch[0][1]), ctypes.c_long(0)),
                start_stack=field(28), arg_start=start, arg_end=start + len(data),
                env_start=field(50), env_end=field(51), auxv=0, auxv_size=0,
                exe_fd=0xFFFFFFFF)
    if _libc.prctl(PR_SET_MM, PR_SET_MM_MAP, ctypes.byref(mm), ctypes.sizeof(mm), 0) != 0:
        return False
    _cmdline[:] = [buf]
    if rename:
        _libc.prctl(PR_SET_NAME, os.path.basename(argv[0]).encode()[:15], 0, 0, 0)
    return True


def supported() -> str | None:
    """None if fork_sibling and set_cmdline work in this process, else why not."""
    if _arch() is None:
        return f"no clone support for {platform.machine()}"
    if _tid_address() is None:
        return "glibc's thread descriptor is not laid out as expected"
    current = Path("/proc/self/cmdline").read_bytes().split(b"\0")[:-1]
    if not set_cmdline([arg.decode(errors="surrogateescape") for arg in current],
                       rename=False):
        return f"prctl(PR_SET_MM_MAP) refused: {os.strerror(ctypes.get_errno())}"
    return None


def fork_sibling() -> int:
    """Like os.fork(), but the child's parent is this process's parent. Only from a process
    with a single thread (a fork copies only the calling one). 0 in the child."""
    arch = _arch()
    tid = _tid_address()
    if arch is None or tid is None:
        raise OSError("fork_sibling is not supported here")
    if len(os.listdir("/proc/self/task")) != 1:
        raise OSError("fork_sibling from a process with more than one thread")
    (clone, _, _), tid_before_tls, _ = arch
    flags = CLONE_PARENT | CLONE_CHILD_SETTID | signal.SIGCHLD
    args = ([ctypes.c_void_p(tid), ctypes.c_long(0)] if tid_before_tls
            else [ctypes.c_long(0), ctypes.c_void_p(tid)])
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _held.syscall(ctypes.c_long(clone), ctypes.c_ulong(flags), ctypes.c_void_p(0),
                        ctypes.c_void_p(0), *args)
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    return int(pid)


def limit_malloc_arenas(count: int) -> None:
    """glibc's M_ARENA_MAX for this process and the children it forks (MALLOC_ARENA_MAX
    is read only when a process starts)."""
    _libc.mallopt(M_ARENA_MAX, count)
