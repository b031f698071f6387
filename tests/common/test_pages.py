"""KSM marks (shoal_common.pages): which mappings are marked, that a fork inherits them
and an exec (runc's, conmon's, a container's) does not, and the KSM switch."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from shoal_common import pages
from support.processes import mergeable

MAPS = """\
55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]
7f1e2c000000-7f1e2c040000 rw-p 00000000 00:00 0
7f1e2d000000-7f1e2d001000 r--p 00000000 fe:01 1234                       /usr/lib/libc.so.6
7f1e2d001000-7f1e2d002000 rw-p 00003000 fe:01 1234                       /usr/lib/libc.so.6
7f1e2e000000-7f1e2e001000 rw-s 00000000 00:05 99                         /dev/zero (deleted)
7ffc1a000000-7ffc1a021000 rw-p 00000000 00:00 0                          [stack]
7ffc1a100000-7ffc1a102000 r-xp 00000000 00:00 0                          [vdso]
"""


def test_only_private_writable_mappings_but_the_stack_are_chosen() -> None:
    assert pages._private_writable(MAPS) == [
        (0x55D0C0A00000, 0x55D0C0A21000),  # heap
        (0x7F1E2C000000, 0x7F1E2C040000),  # anonymous (an arena)
        (0x7F1E2D001000, 0x7F1E2D002000),  # a library's data
    ]  # not read-only, shared, stack or vdso


# Marks its mappings when told to (a line on stdin), prints the bytes marked, then keeps a
# forked child and an exec'd program alive until stdin closes, printing their pids.
SCRIPT = textwrap.dedent("""
    import os, subprocess, sys, time
    from shoal_common import pages

    sys.stdin.readline()
    print(pages.mark_mergeable(), flush=True)
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    execd = subprocess.Popen(["sleep", "60"])
    print(pid, execd.pid, flush=True)
    sys.stdin.read()
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    execd.kill()
    execd.wait()
""")


@pytest.mark.skipif(not pages.KSM_RUN.exists(), reason="kernel without KSM")
def test_marks_are_inherited_by_a_fork_and_dropped_by_an_exec() -> None:
    helper = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert helper.stdin is not None and helper.stdout is not None
    try:
        assert mergeable(helper.pid) == 0  # nothing before it marks
        helper.stdin.write("mark\n")
        helper.stdin.flush()
        marked = int(helper.stdout.readline())
        forked, execd = (int(v) for v in helper.stdout.readline().split())
        assert marked > 1 << 20  # the heap and arenas at least
        assert mergeable(helper.pid) >= marked
        assert mergeable(forked) >= marked
        assert mergeable(execd) == 0
    finally:
        helper.stdin.close()
        assert helper.wait(timeout=30) == 0


def test_ksm_state_reads_the_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    switch = tmp_path / "run"
    monkeypatch.setattr(pages, "KSM_RUN", switch)
    assert pages.ksm_state() == "absent"
    assert pages.ensure_ksm() == ("absent", False)
    switch.write_text("2\n")  # an operator unmerging everything: left alone
    assert pages.ensure_ksm() == ("unmerging", False)
    assert switch.read_text() == "2\n"
    switch.write_text("0\n")
    assert pages.ensure_ksm() == ("on", True)
    assert switch.read_text() == "1\n"
    assert pages.ensure_ksm() == ("on", False)


async def test_the_scan_is_raised_for_a_while_only_from_the_kernels_default(
        tmp_path: Path) -> None:
    rate = tmp_path / "pages_to_scan"
    rate.write_text(f"{pages.KERNEL_SCAN}\n")
    boost = pages.ScanBoost(rate)
    boost.arm(0.05)
    assert int(rate.read_text()) == pages.BOOST_SCAN
    boost.arm(0.2)  # a second start prolongs it
    await asyncio.sleep(0.1)
    assert int(rate.read_text()) == pages.BOOST_SCAN
    await asyncio.sleep(0.2)
    assert int(rate.read_text()) == pages.KERNEL_SCAN
    rate.write_text("300\n")  # an operator's rate: never touched
    boost.arm(0.05)
    assert rate.read_text() == "300\n"
    rate.write_text(f"{pages.KERNEL_SCAN}\n")
    boost.arm(10)
    rate.write_text("700\n")  # changed meanwhile: not ours to put back
    boost.end()
    assert rate.read_text() == "700\n"


def test_only_private_read_only_file_mappings_are_paged_out() -> None:
    text = MAPS + ("7f1e2f000000-7f1e2f100000 r-xp 00001000 fe:01 77"
                   "                         /usr/bin/nats-server\n")
    assert pages._file_read_only(text) == [
        (0x7F1E2D000000, 0x7F1E2D001000),  # a library's read-only data
        (0x7F1E2F000000, 0x7F1E2F100000),  # a program's text
    ]  # not anonymous, writable, shared or the kernel's


# Maps a file read-only and privately, reads every page of it, says so; then on each line
# on stdin reads its middle byte and prints it.
MAPPER = textwrap.dedent("""
    import mmap, sys

    with open(sys.argv[1], "rb") as f:
        view = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    print(sum(view[at] for at in range(0, len(view), mmap.PAGESIZE)), flush=True)
    for line in sys.stdin:
        print(view[len(view) // 2], flush=True)
""")


def resident_kib(pid: int, path: Path) -> int:
    """Rss of the mappings of `path` in process `pid`."""
    rss, current = 0, ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            current = fields[5] if len(fields) > 5 else ""
        elif fields[0] == "Rss:" and current == str(path):
            rss += int(fields[1])
    return rss


def test_paged_out_text_leaves_the_resident_set_and_comes_back_on_use(
        tmp_path: Path) -> None:
    data = tmp_path / "text.bin"
    with data.open("wb") as f:
        f.write(bytes(range(256)) * (16 << 12))  # 16 MiB
        f.flush()
        os.fsync(f.fileno())  # clean pages: the kernel can drop them, not just unmap them
    helper = subprocess.Popen([sys.executable, "-c", MAPPER, str(data)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert helper.stdin is not None and helper.stdout is not None

    def ask(line: str) -> str:
        helper.stdin.write(line + "\n")
        helper.stdin.flush()
        return helper.stdout.readline().strip()

    try:
        helper.stdout.readline()
        assert resident_kib(helper.pid, data) == 16 << 10
        assert pages.page_out_file_pages(helper.pid) >= 16 << 20
        assert resident_kib(helper.pid, data) == 0
        assert ask("touch") == str((8 << 20) % 256)  # the same bytes, read back from the file
        back = resident_kib(helper.pid, data)
        assert 4 <= back <= 512  # what was used, with at most the read-around about it
    finally:
        helper.stdin.close()
        assert helper.wait(timeout=30) == 0


def test_a_gone_process_is_nothing_to_page_out() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert pages.page_out_file_pages(proc.pid) == 0
