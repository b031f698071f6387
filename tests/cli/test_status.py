"""`shoal status` against a real `shoal up`: it prints as soon as every replica the launcher
runs has answered, waits up to --wait only for one that does not, and without the
launcher's pid list (nobody to expect) collects for the whole --wait as before."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from shoal_common.catalog import SERVICES
from support.ports import free_port
from support.processes import EVERY_SERVICE_AT_START, SHOAL, metrics_sets, shoal_up_argv

pytestmark = pytest.mark.e2e

REPLICAS = {f"{s.name}-0" for s in SERVICES} | {"puller-1"}


@dataclass
class Up:
    root: Path
    nats_port: int

    def flags(self, run_root: Path | None = None) -> list[str]:
        """The client's: this node, its roots (or another run root), its NATS."""
        return ["--node-id", "statusnode", "--state-root", str(self.root / "state"),
                "--run-root", str(run_root or self.root / "run"),
                "--nats-url", f"nats://127.0.0.1:{self.nats_port}"]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    root = tmp_path_factory.mktemp("status")
    port = free_port()
    argv = shoal_up_argv(root, "statusnode", [f"nats.embedded.listen=127.0.0.1:{port}",
                                              "log.format=json", *metrics_sets(),
                                              EVERY_SERVICE_AT_START],
                         "--replicas", "puller=2")
    out = root / "up.out"
    with open(out, "wb") as stdout, open(root / "up.err", "wb") as stderr:
        proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 60
        while "Press Ctrl-C" not in out.read_text() and proc.poll() is None:
            assert time.monotonic() < end, "shoal up not ready in 60 s"
            time.sleep(0.1)
        assert proc.poll() is None, (root / "up.err").read_text()[-3000:]
        yield Up(root, port)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def status(flags: list[str], wait: float) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run([SHOAL, "status", "--wait", str(wait), *flags],
                            capture_output=True, text=True, timeout=wait + 30)
    return result, time.monotonic() - started


def rows(out: str) -> dict[str, tuple[str, int]]:
    """replica -> (STATUS, PID) of each replica row."""
    found = {}
    for line in out.splitlines()[2:]:
        parts = line.split()
        if len(parts) >= 4 and parts[1] != "-":
            found[parts[1]] = (parts[2], int(parts[3]))
    return found


def test_returns_well_under_the_timeout_when_every_replica_answers(up: Up) -> None:
    result, took = status(up.flags(), wait=10)
    assert result.returncode == 0, result.stdout + result.stderr
    assert rows(result.stdout).keys() == REPLICAS, result.stdout
    assert all(state == "serving" for state, _ in rows(result.stdout).values())
    # Before: five services asked one after another, each for the whole wait (50 s here).
    # Now: the interpreter's start, the connect, and one round of answers.
    assert took < 5, f"{took:.2f} s"


def test_a_replica_that_does_not_answer_is_waited_for_only_up_to_the_timeout(up: Up) -> None:
    first, _ = status(up.flags(), wait=10)
    pid = rows(first.stdout)["puller-1"][1]
    os.kill(pid, signal.SIGSTOP)  # alive (the launcher does not restart it), but silent
    try:
        result, took = status(up.flags(), wait=2)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert result.returncode == 0, result.stdout  # puller-0 still serves the service
    assert rows(result.stdout)["puller-1"] == ("DOWN", pid), result.stdout
    assert rows(result.stdout)["puller-0"][0] == "serving"
    assert 2 <= took < 2 + 5, f"{took:.2f} s"  # the whole wait, once: not once per service


def test_without_the_launchers_pid_list_it_collects_for_the_whole_wait(up: Up) -> None:
    result, took = status(up.flags(run_root=up.root / "elsewhere"), wait=1)
    assert result.returncode == 0, result.stdout + result.stderr
    assert rows(result.stdout).keys() == REPLICAS
    assert 1 <= took < 1 + 5, f"{took:.2f} s"
