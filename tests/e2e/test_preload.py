"""`shoal up` forks its services from the preloaded zygote: each shares the zygote's pages
(their PSS well under their RSS), is the launcher's own child, looks exactly like the
`python -m shoal_<service>` it replaces, and a killed one is forked again and serves; a
killed zygote is replaced and forks the next restart. `launcher.preload = false` execs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from shoal_common.catalog import SERVICES
from support.ports import free_port
from support.processes import (
    EVERY_SERVICE_AT_START,
    SHOAL,
    mergeable,
    metrics_sets,
    pids_mentioning,
    shoal_up_argv,
)

pytestmark = pytest.mark.e2e

MIB = 1 << 20
T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str) -> T:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def rollup(pid: int) -> dict[str, int]:
    """/proc/<pid>/smaps_rollup in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0]) * 1024
    return out


def stat(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on: [1] is the ppid, [3] the session."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def sockets_of(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


class Up:
    def __init__(self, root: Path, node: str, sets: list[str]) -> None:
        self.root, self.node = root, node
        self.port = free_port()
        argv = shoal_up_argv(root, node, [f"nats.embedded.listen=127.0.0.1:{self.port}",
                                          "log.format=json", *metrics_sets(),
                                          EVERY_SERVICE_AT_START, *sets])
        self.out, self.err = root / "up.out", root / "up.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL)
        wait_for(lambda: "Press Ctrl-C" in self.out.read_text() or self.proc.poll() is not None,
                 90, "shoal up to report ready")
        assert self.proc.poll() is None, self.err.read_text()[-3000:]

    def pid_of(self, module: str) -> int:
        pids = pids_mentioning(f"-m {module} --node-id {self.node} ")
        assert len(pids) == 1, (module, pids)
        return pids[0]

    def zygotes(self) -> list[int]:
        return pids_mentioning(f"-m shoal_cli.zygote --node-id {self.node} ")

    def serving(self) -> dict[str, int]:
        """replica -> pid of each replica `shoal status` reports serving."""
        result = subprocess.run(
            [SHOAL, "status", "--node-id", self.node, "--state-root", str(self.root / "state"),
             "--run-root", str(self.root / "run"), "--nats-url",
             f"nats://127.0.0.1:{self.port}", "--wait", "0.5"],
            capture_output=True, text=True, timeout=30)
        rows = {}
        for line in result.stdout.splitlines()[2:]:
            parts = line.split()
            if len(parts) >= 4 and parts[2] == "serving":
                rows[parts[1]] = int(parts[3])
        return rows

    def restarted(self, module: str, old: int) -> int:
        """The pid of the `module` that replaced `old`, once it serves."""
        replica = next(f"{s.name}-0" for s in SERVICES if s.module == module)
        return wait_for(lambda: (pid := self.serving().get(replica)) != old and pid,
                        60, f"{replica} to serve again")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=60)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    node = Up(tmp_path, "preload", [])
    try:
        yield node
    finally:
        code = node.stop()
        assert code == 0, node.err.read_text()[-3000:]
        assert pids_mentioning(str(tmp_path)) == []


def assert_forked(up: Up, module: str, zygote: int) -> int:
    """The service `module` runs as the launcher's child forked from `zygote`."""
    pid = up.pid_of(module)
    fields = stat(pid)
    assert int(fields[1]) == up.proc.pid  # the launcher's child, not the zygote's
    assert int(fields[3]) == pid  # in its own session, like an exec'd one
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert argv[:5] == [sys.executable, "-m", module, "--node-id", up.node]
    assert argv[-1] == "" and "" not in argv[:-1]  # NUL-separated, as execve leaves it
    assert argv[argv.index("--replica-id") + 1].endswith("-0")
    assert Path(f"/proc/{pid}/comm").read_text().strip() == Path(sys.executable).name[:15]
    # It shares the zygote's preloaded pages: an exec'd interpreter has no shared dirty
    # anonymous memory at all.
    mem = rollup(pid)
    assert mem["Shared_Dirty"] > 8 * MIB, (module, mem)
    assert mem["Pss"] < mem["Rss"] - 8 * MIB, (module, mem)
    assert not sockets_of(pid) & sockets_of(zygote)  # nor holds the zygote's socket
    assert mergeable(pid) > 8 * MIB  # the zygote's marks (launcher.merge_pages), inherited
    return pid


def test_services_are_forked_from_the_zygote_and_restarted_by_fork(up: Up) -> None:
    [zygote] = up.zygotes()
    assert int(stat(zygote)[1]) == up.proc.pid
    assert mergeable(zygote) > 8 * MIB
    [nats] = [pid for pid in pids_mentioning(str(up.root))
              if os.readlink(f"/proc/{pid}/exe").endswith("/nats-server")]
    assert mergeable(nats) == 0  # exec'd: no mark survives an exec
    # Its program text was paged out once it listened and again once every service was up
    # (nats.embedded.page_out_text; what that does to a process: tests/common/test_pages.py).
    paged = [json.loads(line) for line in up.err.read_text().splitlines()
             if "nats-server's program text paged out" in line]
    binary = Path(os.readlink(f"/proc/{nats}/exe")).stat().st_size
    assert [entry["pid"] for entry in paged] == [nats, nats]
    assert all(entry["advised_mib"] * MIB > binary * 0.8 for entry in paged), paged
    for svc in SERVICES:
        assert_forked(up, svc.module, zygote)
    serving = up.serving()  # `shoal status` finds each by its command line, as before
    assert {f"{s.name}-0" for s in SERVICES} <= serving.keys()

    # kill -9 a service: forked again by the same zygote, and it serves.
    old = up.pid_of("shoal_puller")
    os.kill(old, signal.SIGKILL)
    new = up.restarted("shoal_puller", old)
    assert assert_forked(up, "shoal_puller", zygote) == new
    assert f'"child": "puller-0", "pid": {new}, "by": "fork"' in up.err.read_text()

    # kill -9 the zygote: the services run on, a new zygote comes, and forks the next one.
    before = up.serving()
    os.kill(zygote, signal.SIGKILL)
    [second] = wait_for(lambda: [z for z in up.zygotes() if z != zygote], 60,
                        "a new zygote")
    wait_for(lambda: '"zygote ready"' in up.err.read_text().rsplit('"zygote exited', 1)[-1],
             60, "the new zygote to be ready")
    assert up.serving() == before
    old = up.pid_of("shoal_executor")
    os.kill(old, signal.SIGKILL)
    new = up.restarted("shoal_executor", old)
    assert assert_forked(up, "shoal_executor", second) == new
    assert f'"child": "executor-0", "pid": {new}, "by": "fork"' in up.err.read_text()


def test_preload_off_execs_every_service(tmp_path: Path) -> None:
    up = Up(tmp_path, "noload", ["launcher.preload=false", "launcher.merge_pages=false"])
    try:
        assert up.zygotes() == []
        assert '"services are exec\'d"' in up.err.read_text()
        for svc in SERVICES:
            pid = up.pid_of(svc.module)
            assert int(stat(pid)[1]) == up.proc.pid
            assert rollup(pid)["Shared_Dirty"] < 2 * MIB
            assert mergeable(pid) == 0
        assert {f"{s.name}-0" for s in SERVICES} <= up.serving().keys()
    finally:
        assert up.stop() == 0
    assert pids_mentioning(str(tmp_path)) == []
