"""A hostile peer on the bus (it holds the executor's or the gateway's credentials; the
tests' NATS has no auth) sends every monitor verb hostile bodies: garbage MessagePack,
wrong types, traversal ids, paths outside the roots, symlinked bundles pointing outside,
log files in system trees or in another's place, 1 MB strings, negative and huge numbers.
Each is answered `invalid`, `not_found` or `failed_precondition` (never `internal`, never
silence); nothing outside Shoal's roots changes, no process appears, a real container
beside them keeps running and the supervisor never restarts."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from shoal_common import subjects
from shoal_common.bus import Bus
from shoal_common.clients.monitor import MonitorClient
from shoal_common.messages.monitor import MonitorCreateRequest, StopRequest, TaskIdRequest
from support.bundles import (
    bundle_root,
    busybox_bundle,
    remove_cgroup_tree,
    remove_containers,
    runc_spec,
)
from support.hostile import GARBAGE, HUGE_NUMBERS, WRONG_TYPES, ask, snapshot_of
from support.processes import Node, ServiceProcess, ServiceSet, pids_mentioning

pytestmark = pytest.mark.e2e

CGROUP_PARENT = f"shoal-hostile-{os.getpid()}"  # all of it is removed at the end
MB = 1_000_000
ANSWERS = {"invalid", "not_found", "failed_precondition"}
# No constrained string field (ids, paths, handler, stream and output names) takes these.
BAD_STRINGS = ["../../x", "..", ".", "/../../etc", "a/../../b", "/a/./b", "ok\n", "-rf",
               "\x00", "a b", "x" * 129, "/" + "x" * MB]
# A good body per verb (never sent as it is): each field is made hostile in turn.
# LIVE: the running container; NEW: an id nothing has.
BASES: dict[str, dict[str, Any]] = {
    "health": {}, "status": {}, "ping": {"payload": b"", "delay_ms": 0},
    "create": {"id": "NEW", "bundle": "SPARE", "log_path": "", "runtime_handler": "",
               "runtime_root": "", "tty": False, "stdin": False, "stdin_once": False,
               "sandbox_id": "", "cgroup_path": f"/{CGROUP_PARENT}/x", "labels": {}},
    "list": {"sandbox_id": ""},
    "kill": {"id": "LIVE", "signal": 15, "all": False},
    "stop": {"id": "LIVE", "signal": 15, "timeout": 1.0},
    "exec_sync": {"id": "LIVE", "cmd": ["true"], "timeout": 5.0, "env": [], "tty": False},
    "exec_output": {"output_id": "0" * 32, "stream": "stdout", "offset": 0, "size": 1},
    "exec_output_remove": {"output_id": "0" * 32},
    "update": {"id": "LIVE", "resources": {"cpu_shares": 512}},
    "stats": {"ids": ["LIVE"]},
    "exec_create": {"id": "LIVE", "exec_id": "hostile1", "cmd": ["true"], "env": [],
                    "tty": False, "stdin": False, "height": 0, "width": 0},
    "resize": {"id": "LIVE", "height": 10, "width": 10, "exec_id": ""},
    **{v: {"id": "LIVE"} for v in ("start", "rerun", "state", "delete", "reopen_log", "attach")},
    **{v: {"id": "LIVE", "exec_id": "nosuchexec"}
       for v in ("exec_start", "exec_wait", "exec_remove")},
}
# Well-typed bodies the supervisor must still refuse (on top of the generic ones).
SPECIALS: dict[str, list[dict[str, Any]]] = {
    "kill": [{"id": "LIVE", "signal": 0}],
    "delete": [{"id": "LIVE"}],  # it runs
    "exec_sync": [{"id": "LIVE", "cmd": []}, {"id": "LIVE", "cmd": ["/no-such-binary"]},
                  {"id": "LIVE", "cmd": ["x" * MB]}, {"id": "LIVE", "cmd": ["../../x"]},
                  {"id": "NEW", "cmd": ["true"]}],
    "exec_output": [{"output_id": "f" * 32, "stream": "stderr", "offset": 1 << 50}],
    "update": [{"id": "LIVE", "resources": r} for r in (
        {"cpu_shares": -5}, {"memory_limit": 2**64 - 1}, {"pids_limit": 2**64 - 1},
        {"cpuset_cpus": "../../etc"}, {"cpuset_cpus": "x" * MB}, {"cpuset_mems": "\x00"},
        {"cpu_period": -1})] + [{"id": "NEW", "resources": {}}],
    "stats": [{"ids": [s]} for s in BAD_STRINGS],
    "exec_create": [{"id": "LIVE", "exec_id": "hostile2", "cmd": []},
                    {"id": "NEW", "exec_id": "hostile3", "cmd": ["true"]}],
    "exec_start": [{"id": "NEW", "exec_id": "x"}],
    "resize": [{"id": "LIVE", "height": 0, "width": 10},
               {"id": "LIVE", "height": 10, "width": 10, "exec_id": "nosuchexec"}],
    **{v: [{"id": "NEW"}] for v in ("start", "state", "reopen_log", "attach")},
}


@dataclass
class Places:
    """Hostile targets beside the sentinel: what a create may be pointed at."""

    node: Node
    tmp: Path
    sentinel: Path
    spare: Path  # a good bundle in the executor's bundle root that nobody creates

    def bundles(self) -> list[str]:
        root = bundle_root(self.node.run_root)
        outside = self.tmp / "outside-bundle"
        return [str(self.sentinel), str(outside), str(root / "escape"), str(root / "nest" / "b"),
                str(root), str(root / "cfglink"), str(root / "cfgdir"), str(root / "absent"),
                "/", "/etc", str(self.node.run_root / "supervisor")]

    def runtime_roots(self) -> list[str]:
        run_dir = self.node.run_root / "supervisor"
        return ["/tmp/hostile-runc", str(self.sentinel), str(run_dir),
                str(self.node.run_root / "executor"), str(self.tmp / "runc")]

    def log_paths(self) -> list[str]:
        logs = self.tmp / "logs"
        system = ["/etc/shoal-hostile.log", "/proc/self/hostile", "/sys/kernel/hostile",
                  "/dev/null", "/dev/shm/hostile.log", "/usr/hostile.log", "/boot/hostile",
                  "/lib/hostile.log", "/lib64/hostile.log", "/bin/hostile", "/sbin/hostile",
                  "/root/.ssh/authorized_keys"]
        shoal = [str(self.node.state_root / "supervisor" / "tasks.db"),
                 str(self.node.run_root / "hostile.log")]
        local = [logs / "link.log", logs / "fifo", logs / "dir", self.sentinel / "keep",
                 logs / "hard.log", self.tmp / "missing" / "x.log", logs / "shared" / "x.log",
                 logs / "up" / "x.log", logs / "user" / "x.log"]
        return system + shoal + [str(p) for p in local]

    def make(self, base_spec: dict[str, Any]) -> None:
        root = bundle_root(self.node.run_root)
        cgroup = f"/{CGROUP_PARENT}/refused"  # where a create that got through would run
        outside = busybox_bundle(self.tmp / "outside-bundle", base_spec, ["true"], cgroup)
        (root / "escape").symlink_to(outside)
        busybox_bundle(root / "nest" / "b", base_spec, ["true"], cgroup)
        (root / "cfglink").mkdir()
        (root / "cfglink" / "config.json").symlink_to(outside / "config.json")
        (root / "cfgdir" / "config.json").mkdir(parents=True)
        logs = self.tmp / "logs"
        logs.mkdir()
        (logs / "link.log").symlink_to(self.sentinel / "keep")
        os.mkfifo(logs / "fifo")
        (logs / "dir").mkdir()
        (logs / "victim").write_text("not a log\n")
        os.link(logs / "victim", logs / "hard.log")
        (logs / "shared").mkdir()
        (logs / "shared").chmod(0o777)
        (logs / "up").symlink_to("/etc")
        (logs / "user").mkdir()
        os.chown(logs / "user", 65534, 65534)


def fields(base: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Each field of `base` made hostile in turn: a wrong type, a string no constrained
    field takes, a number out of every bound."""
    for key, value in base.items():
        # Not a map for a map (a struct takes any map: unknown keys are ignored).
        yield from ({**base, key: w} for w in WRONG_TYPES if type(w) is not type(value))
        if isinstance(value, str):
            yield from ({**base, key: s} for s in BAD_STRINGS)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield from ({**base, key: n} for n in HUGE_NUMBERS)


def create_specials(places: Places) -> Iterator[dict[str, Any]]:
    """Good bodies but for one path, each of which must be refused."""
    base = {**BASES["create"], "bundle": str(places.spare)}
    yield from ({**base, "bundle": b} for b in places.bundles())
    yield from ({**base, "runtime_root": r} for r in places.runtime_roots())
    yield from ({**base, "log_path": p} for p in places.log_paths())
    yield {**base, "runtime_handler": "evil"}


def bodies(verb: str, places: Places, live: str) -> Iterator[bytes]:
    def named(body: dict[str, Any]) -> bytes:
        ids = {"LIVE": live, "NEW": f"hostile-{uuid.uuid4().hex}", "SPARE": str(places.spare)}
        fixed = {k: ids.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
        if isinstance(fixed.get("ids"), list):
            fixed["ids"] = [ids.get(i, i) for i in fixed["ids"]]
        return msgspec.msgpack.encode(fixed)

    yield from GARBAGE
    yield from (named(b) for b in fields(BASES[verb]))
    yield from (named(b) for b in SPECIALS.get(verb, []))
    if verb == "create":
        yield from (named(b) for b in create_specials(places))


@pytest.fixture
async def live_task(node: Node, services: ServiceSet, bus: Bus, tmp_path: Path
                    ) -> AsyncIterator[tuple[ServiceProcess, str, Places]]:
    """A supervisor with one running container (whose id bodies name) and the places."""
    sp = services.start("supervisor")
    await asyncio.to_thread(services.wait_serving, sp)
    base_spec = runc_spec(tmp_path)
    root = bundle_root(node.run_root)
    task_id = f"hostile-live-{uuid.uuid4().hex}"
    spare = f"hostile-spare-{uuid.uuid4().hex}"
    bundle = busybox_bundle(root / task_id, base_spec, ["sleep", "1000"],
                            f"/{CGROUP_PARENT}/{task_id}")
    sentinel = tmp_path / "sentinel"
    (sentinel / "dir").mkdir(parents=True)
    (sentinel / "keep").write_text("untouched\n")
    (sentinel / "dir" / "also").write_text("untouched too\n")
    places = Places(node, tmp_path, sentinel, busybox_bundle(
        root / spare, base_spec, ["sleep", "1000"], f"/{CGROUP_PARENT}/{spare}"))
    places.make(base_spec)
    monitor = MonitorClient(bus)
    try:
        await monitor.create(MonitorCreateRequest(id=task_id, bundle=str(bundle),
                                                  cgroup_path=f"/{CGROUP_PARENT}/{task_id}"))
        await monitor.start(TaskIdRequest(id=task_id))
        yield sp, task_id, places
        await monitor.stop_task(StopRequest(id=task_id, timeout=1))
        await monitor.delete(TaskIdRequest(id=task_id))
    finally:
        # Whatever a body wrongly got created goes too.
        runc_root = node.run_root / "supervisor" / "runc"
        made = [p.name for p in runc_root.iterdir()] if runc_root.is_dir() else []
        remove_containers(runc_root, [task_id, spare, *made], node.root, CGROUP_PARENT)
        remove_cgroup_tree(CGROUP_PARENT)


async def test_every_monitor_verb_survives_hostile_bodies(
        live_task: tuple[ServiceProcess, str, Places], node: Node, bus: Bus) -> None:
    sp, live, places = live_task
    kept = {p: snapshot_of(p) for p in (places.sentinel, places.tmp / "logs")}
    processes = set(pids_mentioning(str(node.root)))
    nc = await nats.connect(node.nats_url)
    answers: dict[str, int] = {}
    wrong = []
    try:
        for verb in MonitorClient.verbs():
            subject = subjects.command(node.node_id, "monitor", verb)
            for i, body in enumerate(bodies(verb, places, live)):
                status, message = await ask(nc, subject, body)
                answers[status] = answers.get(status, 0) + 1
                if status not in ANSWERS or (body in GARBAGE and status != "invalid"):
                    wrong.append(f"{verb} body {i} ({body[:100]!r}): {status}: {message}")
                elif len(message) > 8192:
                    wrong.append(f"{verb} body {i}: a {len(message)}-character error")
    finally:
        await nc.close()
    assert wrong == [], "\n".join(wrong)
    assert answers["invalid"] > 500 and answers["not_found"] and \
        answers["failed_precondition"], answers

    assert {p: snapshot_of(p) for p in kept} == kept
    for path in ("/etc/shoal-hostile.log", "/tmp/hostile-runc", "/dev/shm/hostile.log",
                 places.tmp / "missing", places.tmp / "runc", node.run_root / "hostile.log"):
        assert not Path(path).exists(), path
    # Only the container that was there (its conmon) lives on: nothing started, nothing
    # killed, and no exec or create left anything running.
    assert set(pids_mentioning(str(node.root))) == processes
    assert (await MonitorClient(bus).state(TaskIdRequest(id=live))).state == "running"
    assert sp.proc.poll() is None, "the supervisor exited"
    assert sp.log_text().count('"serving"') == 1, "the supervisor restarted"
    assert '"outcome": "internal"' not in sp.log_text()
