"""Every cgroup reading of the supervisor on cgroup v1 and v2, against fake hierarchies
written in the kernel's documented formats (Documentation/admin-guide/cgroup-v2.rst and
cgroup-v1/memory.rst, cpuacct.rst, pids.rst), and the mode detection on this real host.

This machine is cgroup v1 (hybrid): the v2 readings are verified only against these
fakes, never against a real v2 kernel here."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from shoal_supervisor.domain import cgroups
from shoal_supervisor.domain.cgroups import (
    CGROUP2_SUPER_MAGIC,
    TMPFS_MAGIC,
    Cgroup,
    OomEventFd,
    OomEventsWatch,
    oom_watch,
    parse_proc_cgroup,
)

CONTAINER = "kubepods/burstable/podabc/ctr1"
MiB = 1 << 20

# cgroup-v1/memory.rst 5.2: per-cgroup keys, then hierarchical `total_` ones.
V1_MEMORY_STAT = f"""cache {30 * MiB}
rss {40 * MiB}
rss_huge 0
shmem 0
mapped_file {MiB}
pgpgin 1000
pgpgout 500
pgfault 111
pgmajfault 1
inactive_anon 0
active_anon {40 * MiB}
inactive_file {5 * MiB}
active_file {25 * MiB}
unevictable 0
hierarchical_memory_limit 9223372036854771712
total_cache {30 * MiB}
total_rss {50 * MiB}
total_pgfault 2222
total_pgmajfault 7
total_inactive_file {20 * MiB}
total_active_file {10 * MiB}
"""
# cgroup-v2.rst memory.stat: flat keys, hierarchical by definition.
V2_MEMORY_STAT = f"""anon {50 * MiB}
file {30 * MiB}
kernel {MiB}
kernel_stack 65536
pagetables 131072
sock 0
shmem 0
file_mapped {MiB}
file_dirty 0
file_writeback 0
anon_thp 0
inactive_anon 0
active_anon {50 * MiB}
inactive_file {20 * MiB}
active_file {10 * MiB}
unevictable 0
slab_reclaimable 0
slab_unreclaimable 0
pgfault 2222
pgmajfault 7
workingset_refault_anon 0
workingset_refault_file 0
"""
# cgroup-v2.rst cpu.stat (always present, with or without the cpu controller).
V2_CPU_STAT = """usage_usec 1234567
user_usec 1000000
system_usec 234567
nr_periods 0
nr_throttled 0
throttled_usec 0
"""


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v1_tree(root: Path, *, memsw: bool = True, oom_kill: int = 2) -> Path:
    """One directory per controller hierarchy, the container at the same path in each."""
    write(root / "cpuacct" / CONTAINER / "cpuacct.usage", "1234567000\n")
    mem = root / "memory" / CONTAINER
    write(mem / "memory.usage_in_bytes", f"{100 * MiB}\n")
    write(mem / "memory.stat", V1_MEMORY_STAT)
    write(mem / "memory.oom_control", f"oom_kill_disable 0\nunder_oom 0\noom_kill {oom_kill}\n")
    write(mem / "cgroup.event_control", "")
    write(mem / "memory.limit_in_bytes", f"{128 * MiB}\n")
    if memsw:
        write(root / "memory" / "memory.memsw.limit_in_bytes", "9223372036854771712\n")
    write(root / "pids" / CONTAINER / "pids.current", "3\n")
    return root


def v2_tree(root: Path, *, swap: bool = True, oom_kill: int = 2) -> Path:
    """One directory for everything; the root has cgroup.controllers, no memory.* limits."""
    write(root / "cgroup.controllers", "cpuset cpu io memory hugetlb pids rdma misc\n")
    write(root / "cgroup.subtree_control", "cpuset cpu io memory pids\n")
    c = root / CONTAINER
    write(c / "cgroup.controllers", "cpuset cpu io memory pids\n")
    write(c / "cpu.stat", V2_CPU_STAT)
    write(c / "memory.current", f"{100 * MiB}\n")
    write(c / "memory.stat", V2_MEMORY_STAT)
    write(c / "memory.events",
          f"low 0\nhigh 0\nmax 12\noom 3\noom_kill {oom_kill}\noom_group_kill 0\n")
    write(c / "memory.max", f"{128 * MiB}\n")
    if swap:
        write(c / "memory.swap.max", "max\n")
    write(c / "pids.current", "3\n")
    return root


@pytest.fixture(params=["v1", "v2"])
def tree(request: pytest.FixtureRequest, tmp_path: Path) -> Cgroup:
    if request.param == "v1":
        return Cgroup("/" + CONTAINER, v1_tree(tmp_path / "v1"), unified=False)
    return Cgroup("/" + CONTAINER, v2_tree(tmp_path / "v2"), unified=True)


def test_usage_reads_the_same_on_v1_and_v2(tree: Cgroup) -> None:
    u = tree.usage()
    assert u.cpu_usage_ns == 1234567000  # v1 ns; v2 usage_usec x 1000
    assert u.memory_usage_bytes == 100 * MiB  # memory.usage_in_bytes / memory.current
    # usage - inactive_file (v1: total_inactive_file, the hierarchical one)
    assert u.memory_working_set_bytes == 80 * MiB
    assert u.memory_rss_bytes == 50 * MiB  # v1 total_rss / v2 anon
    assert (u.page_faults, u.major_page_faults) == (2222, 7)
    assert u.pids == 3


def test_oom_kill_counter_on_v1_and_v2(tree: Cgroup) -> None:
    # v1: memory.oom_control's oom_kill; v2: memory.events' oom_kill (not `oom`, which
    # counts OOM situations, nor max).
    assert tree.oom_kills() == 2
    assert tree.exists()
    gone = Cgroup("/kubepods/gone", tree.root, unified=tree.unified)
    assert gone.oom_kills() is None and not gone.exists()
    assert gone.usage().memory_usage_bytes == 0


def test_swap_accounting_on_v1_and_v2(tmp_path: Path) -> None:
    assert Cgroup(CONTAINER, v1_tree(tmp_path / "a"), unified=False).memory_swap_accounted()
    assert not Cgroup(CONTAINER, v1_tree(tmp_path / "b", memsw=False),
                      unified=False).memory_swap_accounted()
    assert Cgroup(CONTAINER, v2_tree(tmp_path / "c"), unified=True).memory_swap_accounted()
    assert not Cgroup(CONTAINER, v2_tree(tmp_path / "d", swap=False),
                      unified=True).memory_swap_accounted()


def test_v2_reads_stay_in_the_hierarchy(tmp_path: Path) -> None:
    root = v2_tree(tmp_path / "v2")
    outside = tmp_path / "outside"
    write(outside / "memory.current", "7\n")
    (root / "escape").symlink_to(outside)
    escaped = Cgroup("/escape", root, unified=True)
    assert escaped.file("memory", "memory.current") is None
    assert escaped.usage().memory_usage_bytes == 0 and escaped.oom_kills() is None
    with pytest.raises(OSError, match="leaves"):
        OomEventsWatch(escaped)


def test_proc_cgroup_lines_of_v1_hybrid_and_v2() -> None:
    v1 = ("12:pids:/kubepods/pod1/c\n11:cpu,cpuacct:/kubepods/pod1/c\n"
          "4:memory:/kubepods/pod1/c\n1:name=systemd:/kubepods/pod1/c\n")
    hybrid = v1 + "0::/kubepods/pod1/c\n"
    v2 = "0::/kubepods.slice/kubepods-pod1.slice/cri-shoal-c.scope\n"
    assert parse_proc_cgroup(v1, unified=False) == "/kubepods/pod1/c"
    assert parse_proc_cgroup(hybrid, unified=False) == "/kubepods/pod1/c"
    assert parse_proc_cgroup(v2, unified=True) == \
        "/kubepods.slice/kubepods-pod1.slice/cri-shoal-c.scope"
    assert parse_proc_cgroup(v1, unified=True) == ""  # no unified line: not v2's
    # Without memory mounted, another v1 hierarchy of the same container.
    assert parse_proc_cgroup("3:cpuacct:/a\n2:pids:/b\n", unified=False) == "/a"
    assert parse_proc_cgroup("garbage\n", unified=False) == ""


def test_this_host_is_decided_as_runc_decides() -> None:
    """Real kernel: statfs(2) of /sys/fs/cgroup, cross-checked with mountinfo."""
    assert cgroups.fs_type(Path("/proc")) == 0x9FA0  # PROC_SUPER_MAGIC: the struct is read right
    mounts = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        mounts[pre.split()[4]] = post.split()[0]
    want = {"cgroup2": cgroups.UNIFIED}.get(mounts.get("/sys/fs/cgroup", ""))
    if want is None:
        want = cgroups.HYBRID if mounts.get("/sys/fs/cgroup/unified") == "cgroup2" \
            else cgroups.LEGACY
    assert cgroups.mode() == want
    assert cgroups.is_unified() == (want == cgroups.UNIFIED)
    magic = cgroups.fs_type(cgroups.ROOT)
    assert magic == (CGROUP2_SUPER_MAGIC if want == cgroups.UNIFIED else TMPFS_MAGIC)


def test_own_cgroup_reads_on_the_real_hierarchy() -> None:
    """The real kernel's files for this process' own cgroup (v1 here)."""
    path = cgroups.proc_cgroup(os.getpid())
    assert path.startswith("/")
    u = Cgroup(path).usage()
    if cgroups.is_unified() or path != "/":
        assert u.memory_usage_bytes > 0
        assert 0 < u.memory_working_set_bytes <= u.memory_usage_bytes
    assert cgroups.proc_cgroup(2**22 + 1) == ""  # beyond pid_max: gone


def test_oom_watch_is_chosen_by_mode(tmp_path: Path) -> None:
    v1 = oom_watch(Cgroup(CONTAINER, v1_tree(tmp_path / "v1"), unified=False))
    v2 = oom_watch(Cgroup(CONTAINER, v2_tree(tmp_path / "v2"), unified=True))
    try:
        assert isinstance(v1, OomEventFd) and isinstance(v2, OomEventsWatch)
    finally:
        v1.close()
        v2.close()
    with pytest.raises(OSError):  # no memory.events: the cgroup is gone
        oom_watch(Cgroup("/kubepods/gone", tmp_path / "v2", unified=True))


async def test_v2_memory_events_change_wakes_the_watch(tmp_path: Path) -> None:
    """The kernel signals memory.events as a modified file; the watch is readable then
    (a plain file's write stands in for kernfs' notification here)."""
    cg = Cgroup(CONTAINER, v2_tree(tmp_path / "v2", oom_kill=0), unified=True)
    watch = oom_watch(cg)
    woke = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(watch.fd, woke.set)
    try:
        assert cg.oom_kills() == 0
        events = cg.oom_file()
        assert events is not None
        events.write_text("low 0\nhigh 0\nmax 13\noom 4\noom_kill 1\noom_group_kill 0\n")
        await asyncio.wait_for(woke.wait(), 5)
        watch.drain()
        assert cg.oom_kills() == 1
    finally:
        loop.remove_reader(watch.fd)
        watch.close()
