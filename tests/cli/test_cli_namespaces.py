"""`shoal -n NAME <command>` and `shoal namespaces ls|create|rm`: the real `shoal` binary
against a real node (gateway, puller, snapshotter, executor, supervisor with conmon + runc,
registry). Images, pods and containers of one namespace are not seen from another; a
namespace is removed only once it holds nothing, and the refusal names what is left."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from support.processes import SHOAL, CliResult, Node, finished
from support.shoal import images_fixture, running_node  # noqa: F401

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def ns_node(nats_url: str, images: dict[str, str],
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Node]:
    async with running_node(nats_url, tmp_path_factory.mktemp("cli-ns-node"), "tclins",
                            images, namespaces=("k8s.io", "team-a", "team-b")) as running:
        yield running.services.node


@dataclass
class Shoal:
    node: Node

    async def spawn(self, *argv: str, ns: str | None = None) -> asyncio.subprocess.Process:
        """`shoal [-n NS] COMMAND ...` with the node's flags after the command."""
        global_flags = ["-n", ns] if ns is not None else []
        command, *rest = argv
        # `namespaces` takes its verb before the node's flags.
        if command == "namespaces":
            command, rest = f"{command} {rest[0]}", rest[1:]
        return await asyncio.create_subprocess_exec(
            SHOAL, *global_flags, *command.split(), *self.node.flags(), *rest,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)

    async def __call__(self, *argv: str, ns: str | None = None, timeout: float = 60
                       ) -> CliResult:
        return await finished(await self.spawn(*argv, ns=ns), timeout)

    async def ok(self, *argv: str, ns: str | None = None) -> str:
        r = await self(*argv, ns=ns)
        assert r.code == 0, (argv, r.err)
        return r.out

    async def running(self, name: str, ns: str, timeout: float = 30) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            out = (await self.ok("ps", "-q", "--name", f"^{name}$", ns=ns)).strip()
            if out:
                return out
            await asyncio.sleep(0.2)
        raise AssertionError(f"container {name} not running in {ns} after {timeout}s")


@pytest.fixture
def shoal(ns_node: Node) -> Shoal:
    return Shoal(ns_node)


async def test_images_and_containers_are_per_namespace_and_rm_waits_until_empty(
        shoal: Shoal, images: dict[str, str]) -> None:
    busybox, pause = images["busybox"], images["pause"]
    await shoal.ok("namespaces", "create", "team-a")
    await shoal.ok("pull", busybox, ns="team-a")
    assert busybox.rsplit(":", 1)[0] in await shoal.ok("images", ns="team-a")
    assert busybox.rsplit(":", 1)[0] not in await shoal.ok("images", ns="team-b")
    assert busybox.rsplit(":", 1)[0] not in await shoal.ok("images")  # k8s.io
    # The per-command `-n` of before still works.
    assert busybox.rsplit(":", 1)[0] in await shoal.ok("images", "-n", "team-a")

    run = await shoal.spawn("run", "--name", "sleeper", busybox, "sleep", "3600",
                            ns="team-a")
    try:
        cid = await shoal.running("sleeper", "team-a")
        assert cid not in await shoal.ok("ps", "-a", "-q")
        assert cid not in await shoal.ok("ps", "-a", "-q", ns="team-b")
        assert await shoal.ok("pods", "-q", ns="team-b") == ""
        r = await shoal("inspect", cid[:12], ns="team-b")
        assert r.code == 1 and "no container or pod sandbox" in r.err
        exec_ = await shoal("exec", cid[:12], "echo", "hi", ns="team-a")
        assert (exec_.code, exec_.out) == (0, "hi\n"), exec_.err

        r = await shoal("namespaces", "rm", "team-a")
        assert r.code == 1
        assert "namespace team-a holds 1 pod sandbox" in r.err and "1 container" in r.err
        assert "sleeper" in r.err and cid[:13] in r.err
        assert "team-a" in (await shoal.ok("namespaces", "ls", "-q")).split()

        pod_id = (await shoal.ok("pods", "-q", ns="team-a")).strip()
        await shoal.ok("stop", "-t", "1", cid, ns="team-a")
        await asyncio.wait_for(run.communicate(), 30)
        await shoal.ok("rm", pod_id, ns="team-a")
    finally:
        if run.returncode is None:
            run.kill()
            await run.wait()

    r = await shoal("namespaces", "rm", "team-a")
    assert r.code == 1 and "holds 2 images" in r.err, r.err  # busybox and the pause image
    assert busybox in r.err and pause in r.err
    await shoal.ok("rmi", busybox, pause, ns="team-a")
    assert await shoal.ok("namespaces", "rm", "team-a") == "team-a\n"
    assert "team-a" not in (await shoal.ok("namespaces", "ls", "-q")).split()


async def test_namespaces_create_ls_and_bad_names(shoal: Shoal) -> None:
    assert await shoal.ok("namespaces", "create", "team-b", "--label", "owner=bob") == \
        "team-b\n"
    await shoal.ok("namespaces", "create", "team-b")  # again: nothing changes
    table = (await shoal.ok("namespaces", "ls")).splitlines()
    assert table[0].split() == ["NAME", "IMAGES", "LABELS"]
    rows = {line.split()[0]: line.split()[1:] for line in table[1:]}
    assert rows["team-b"] == ["0", "owner=bob"] and "k8s.io" in rows
    r = await shoal("namespaces", "create", "team-b", "--label", "owner=carol")
    assert r.code == 1 and "other labels" in r.err

    r = await shoal("namespaces", "rm", "k8s.io")
    assert r.code == 1 and "k8s.io is the CRI's" in r.err
    r = await shoal("namespaces", "rm", "never-made")
    assert r.code == 1 and "namespace 'never-made' not found" in r.err
    assert await shoal.ok("namespaces", "rm", "team-b") == "team-b\n"

    for argv in (("ps",), ("images",), ("namespaces", "ls")):
        r = await shoal(*argv, ns="bad name")
        assert r.code != 0 and "shoal: -n: namespace 'bad name' is not a valid name" in r.err
    r = await shoal("namespaces", "create", "bad_")
    assert r.code == 1 and "namespace 'bad_' is not a valid name" in r.err
    r = await shoal("namespaces", "create", "x" * 77)
    assert r.code == 1 and "at most 76" in r.err
    r = await shoal("namespaces", "create", "ok", "--label", "novalue")
    assert r.code == 1 and "expected KEY=VALUE" in r.err
