"""`shoal run/ps/pods/logs/exec/stop/rm/inspect`: the real `shoal` binary, a CRI client of
the socket of a real node (gateway, executor, supervisor with conmon + runc, snapshotter,
puller, CNI, registry)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.processes import SHOAL, CliResult, Node, finished
from support.shoal import images_fixture, running_node  # noqa: F401

pytestmark = pytest.mark.e2e
# Waits for SIGTERM, then exits 3: a container that only `stop` (or Ctrl-C) ends.
SERVE = 'trap "exit 3" TERM; echo ready; while true; do sleep 0.1; done'


@pytest.fixture(scope="module")
async def shoal_node(nats_url: str, images: dict[str, str],
                     tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Node]:
    """One node for the module (starting one per test would cost seconds each)."""
    async with running_node(nats_url, tmp_path_factory.mktemp("cli-node"), "tcli",
                            images) as running:
        yield running.services.node


@pytest.fixture
def busybox(images: dict[str, str]) -> str:
    return images["busybox"]


@dataclass
class Cli:
    """The `shoal` binary with the node's flags."""

    node: Node

    async def spawn(self, command: str, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            SHOAL, command, *self.node.flags(), *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

    async def __call__(self, command: str, *args: str, timeout: float = 30) -> CliResult:
        return await finished(await self.spawn(command, *args), timeout)

    async def running_id(self, name: str, timeout: float = 20) -> str:
        """The id of the running container called `name`, once there is one."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r = await self("ps", "-q", "--name", f"^{name}$")
            if r.out.strip():
                return r.out.strip()
            await asyncio.sleep(0.1)
        raise AssertionError(f"container {name} not running after {timeout}s")

    async def inspect(self, ident: str) -> dict:
        r = await self("inspect", ident)
        assert r.code == 0, r.err
        return json.loads(r.out)

    async def pod_of(self, container_id: str) -> str:
        return (await self.inspect(container_id))["info"]["info"]["sandboxID"]


@pytest.fixture
def cli(shoal_node: Node) -> Cli:
    return Cli(shoal_node)


async def test_run_streams_exit_code_and_listing(cli: Cli, busybox: str) -> None:
    # "partial" reaches conmon in two reads: a P line, then its F line.
    r = await cli("run", "--name", "streams", busybox, "sh", "-c",
                  "echo out; printf par; sleep 0.2; echo tial; echo err >&2; exit 4")
    assert r.code == 4, r.err
    assert r.out == "out\npartial\n"
    assert "err" in r.err.splitlines()

    cid = (await cli("ps", "-a", "-q", "--name", "^streams$")).out.strip()
    assert len(cid) == 64
    assert cid not in (await cli("ps", "-q")).out  # not running
    table = (await cli("ps", "-a")).out.splitlines()
    assert table[0].split()[:4] == ["CONTAINER", "IMAGE", "CREATED", "STATE"]
    row = next(line for line in table if line.startswith(cid[:13]))
    assert busybox in row and "Exited" in row and "streams" in row and "ago" in row

    status = await cli.inspect(cid[:10])
    assert status["status"]["id"] == cid and status["status"]["exitCode"] == 4
    pod_id = status["info"]["info"]["sandboxID"]
    assert pod_id in (await cli("pods", "-q")).out.split()
    pods = (await cli("pods")).out
    assert any(line.startswith(pod_id[:13]) and "streams" in line and "Ready" in line
               for line in pods.splitlines()), pods
    pod = await cli.inspect(pod_id[:12])
    assert pod["status"]["id"] == pod_id and pod["status"]["state"] == "SANDBOX_READY"

    assert " stdout P par\n" in Path(status["status"]["logPath"]).read_text()
    logs = await cli("logs", cid[:12])
    assert (logs.code, logs.out, logs.err) == (0, "out\npartial\n", "err\n")
    tail = await cli("logs", "--tail", "1", cid)
    assert (tail.out, tail.err) == ("", "err\n")

    log_dir = Path(pod["status"]["annotations"]["shoal.io/cli-log-directory"])
    assert log_dir.is_dir()
    r = await cli("rm", pod_id[:12])
    assert r.code == 0, r.err
    assert pod_id not in (await cli("pods", "-q")).out
    assert cid not in (await cli("ps", "-a", "-q")).out
    assert not log_dir.exists()
    assert not any(n.startswith(f"shoal-{pod_id[:32]}") for n in os.listdir("/var/run/netns"))


async def test_run_options_and_rm_leaves_nothing(cli: Cli, busybox: str) -> None:
    before = (await cli("pods", "-q")).out
    logs_before = set(os.listdir(cli.node.run_root / "cli-logs"))
    r = await cli("run", "--rm", "-e", "FOO=bar", "-w", "/tmp", "--user", "1000:1000",
                  "--memory", "64m", busybox, "sh", "-c", "echo $FOO; pwd; id -u; id -g")
    assert (r.code, r.out) == (0, "bar\n/tmp\n1000\n1000\n"), r.err
    assert (await cli("pods", "-q")).out == before
    assert set(os.listdir(cli.node.run_root / "cli-logs")) == logs_before


async def test_logs_follow_until_exit(cli: Cli, busybox: str) -> None:
    # Waits for /tmp/go (made by `exec`), then prints a line every 0.3 s and exits.
    script = ("echo start; while [ ! -e /tmp/go ]; do sleep 0.1; done; "
              "for i in 1 2 3 4; do echo tick $i; sleep 0.3; done")
    run = await cli.spawn("run", "--name", "ticker", busybox, "sh", "-c", script)
    cid = await cli.running_id("ticker")
    follow = await cli.spawn("logs", "-f", cid[:12])
    exec_ = await cli("exec", cid[:12], "touch", "/tmp/go")
    assert exec_.code == 0, exec_.err
    started = time.monotonic()
    logs = await finished(follow)
    assert time.monotonic() - started > 0.6  # it followed the ticks, not just a snapshot
    expected = "start\n" + "".join(f"tick {i}\n" for i in range(1, 5))
    assert (logs.code, logs.out) == (0, expected), logs.err
    ran = await finished(run)
    assert (ran.code, ran.out) == (0, expected), ran.err
    pod_id = await cli.pod_of(cid)
    assert (await cli("rm", pod_id)).code == 0


async def test_exec_stop_and_rm(cli: Cli, busybox: str) -> None:
    run = await cli.spawn("run", "--name", "server", busybox, "sh", "-c", SERVE)
    cid = await cli.running_id("server")
    r = await cli("exec", cid[:12], "sh", "-c", "echo hi; echo oops >&2; exit 7")
    assert (r.code, r.out, r.err) == (7, "hi\n", "oops\n")

    r = await cli("rm", cid[:12])
    assert r.code == 1 and "is running" in r.err
    r = await cli("stop", "-t", "5", cid[:12])
    assert (r.code, r.out) == (0, f"{cid[:12]}\n"), r.err
    ran = await finished(run)
    assert (ran.code, ran.out) == (3, "ready\n"), ran.err  # the container's exit code

    pod_id = await cli.pod_of(cid)
    assert (await cli("rm", cid)).code == 0
    assert (await cli("ps", "-a", "-q", "--pod", pod_id)).out == ""
    assert (await cli("stop", pod_id[:12])).code == 0
    pod = await cli.inspect(pod_id)
    assert pod["status"]["state"] == "SANDBOX_NOTREADY"
    assert (await cli("rm", pod_id)).code == 0


async def test_ctrl_c_stops_then_rm_removes(cli: Cli, busybox: str) -> None:
    run = await cli.spawn("run", "--rm", "--name", "interrupted", busybox, "sh", "-c", SERVE)
    cid = await cli.running_id("interrupted")
    pod_id = await cli.pod_of(cid)
    run.send_signal(signal.SIGINT)
    ran = await finished(run)
    assert ran.code == 3, ran.err
    assert "stopping" in ran.err
    assert pod_id not in (await cli("pods", "-q")).out


async def test_rm_force_on_a_running_container(cli: Cli, busybox: str) -> None:
    run = await cli.spawn("run", "--name", "forced", busybox, "sh", "-c", SERVE)
    cid = await cli.running_id("forced")
    pod_id = await cli.pod_of(cid)
    r = await cli("rm", "-f", cid[:12])
    assert r.code == 0, r.err
    ran = await finished(run)  # SIGKILL seen, or the container gone before run saw it exit
    assert ran.code == 137 or (ran.code == 1 and "was removed" in ran.err), ran
    assert cid not in (await cli("ps", "-a", "-q")).out
    assert (await cli("rm", pod_id)).code == 0


async def test_clear_errors(cli: Cli, busybox: str, tmp_path: Path) -> None:
    for command in (["rm"], ["stop"], ["inspect"]):
        r = await cli(*command, "nosuchid")
        assert r.code == 1
        assert r.err.strip() == (f"shoal {command[0]}: no container or pod sandbox with id "
                                 "'nosuchid'")
    for command in (["logs", "nosuchid"], ["exec", "nosuchid", "true"]):
        r = await cli(*command)
        assert r.code == 1
        assert r.err.startswith(f"shoal {command[0]}: ") and "nosuchid" in r.err
        assert "not found" in r.err

    before = (await cli("pods", "-q")).out
    r = await cli("run", f"{busybox}-missing", "true")
    assert r.code == 1 and r.err.splitlines()[-1].startswith("shoal run: ")
    assert (await cli("pods", "-q")).out == before  # no pod left behind

    # No socket, and a socket nobody listens on (Shoal died): both say so, and where.
    stale = tmp_path / "stale"
    stale.mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale / "cri.sock"))
    for run_root, why in ((tmp_path / "none", "no CRI socket at"),
                          (stale, "nothing listens on")):
        r = await finished(await asyncio.create_subprocess_exec(
            SHOAL, "ps", "--run-root", str(run_root), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE))
        assert r.code == 1
        assert r.err.startswith(f"shoal ps: Shoal is not running: {why} "
                                f"{run_root / 'cri.sock'} ("), r.err
        assert "shoal up" in r.err
