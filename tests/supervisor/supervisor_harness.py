"""Supervisor test harness: OCI bundles from busybox-static, a real supervisor process with
real conmon and runc, the node's event stream, and cleanup of every container, cgroup and
conmon a test made (so reruns start clean). Fixtures are in conftest.py."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from nats.js.api import DeliverPolicy
from shoal_common import codec, headers, subjects
from shoal_common.bus import Bus
from shoal_common.messages import Event, Message
from shoal_common.messages.monitor import (
    MonitorCreateRequest,
    TaskCreated,
    TaskDeleted,
    TaskExited,
    TaskIdRequest,
    TaskOOM,
    TaskStarted,
    TaskState,
)
from support.bundles import CGROUP_ROOT, bundle_root, busybox_bundle, remove_containers
from support.bundles import conmon_pids as conmon_pids
from support.processes import Node, ServiceProcess, ServiceSet
from support.waiting import eventually  # noqa: F401  (the tests import it from here)

R = TypeVar("R", bound=Message)

CGROUP_PARENT = "shoal-test"
EVENT_TYPES: dict[str, type[Event]] = {
    c.TOPIC: c for c in (TaskCreated, TaskStarted, TaskExited, TaskOOM, TaskDeleted)}
# conmon's k8s-file format: "<RFC3339Nano> <stdout|stderr> <P|F> <content>"
CRI_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}(?:Z|[+-]\d\d:\d\d)) (stdout|stderr) ([PF]) (.*)$")


def parse_log(path: Path) -> list[tuple[datetime, str, str, str]]:
    """(time, stream, tag, content) per line; fails on any line not in the CRI format."""
    out = []
    for line in path.read_text().splitlines():
        m = CRI_LINE.match(line)
        assert m, f"not a CRI log line: {line!r}"
        out.append((datetime.fromisoformat(m.group(1)[:26] + m.group(1)[29:]), m.group(2),
                    m.group(3), m.group(4)))
    return out


class EventLog:
    """Every event of the test's node, in stream order."""

    def __init__(self, sub: Any) -> None:
        self.sub = sub
        self.seen: list[Event] = []

    async def _next(self, timeout: float) -> bool:
        try:
            msg = await self.sub.next_msg(timeout=timeout)
        except Exception:  # nats TimeoutError
            return False
        topic = (msg.headers or {}).get(headers.TOPIC, "")
        if topic in EVENT_TYPES:
            self.seen.append(codec.decode(msg.data, EVENT_TYPES[topic]))
        return True

    async def wait_for(self, kind: type[Event], task_id: str, timeout: float = 10) -> Event:
        end = time.monotonic() + timeout
        while True:
            for ev in self.seen:
                if isinstance(ev, kind) and getattr(ev, "id", None) == task_id:
                    return ev
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind.TOPIC} for {task_id}; saw {self.seen}")
            await self._next(min(left, 0.5))

    async def settle(self, quiet: float = 1.0) -> None:
        """Read until nothing arrives for `quiet` seconds."""
        while await self._next(quiet):
            pass

    def of(self, task_id: str) -> list[str]:
        return [type(e).TOPIC for e in self.seen if getattr(e, "id", None) == task_id]


@dataclass
class Harness:
    node: Node
    services: ServiceSet
    bus: Bus
    base_spec: dict[str, Any]
    root: Path
    ids: list[str] = field(default_factory=list)
    sp: ServiceProcess | None = None
    subs: list[Any] = field(default_factory=list)

    @property
    def runtime_root(self) -> Path:
        return self.node.run_root / "supervisor" / "runc"

    @property
    def bundle_root(self) -> Path:
        """Where the executor puts bundles: the only place the supervisor takes them from."""
        return bundle_root(self.node.run_root)

    @property
    def exit_dir(self) -> Path:
        return self.node.state_root / "supervisor" / "exits"

    async def start_supervisor(self, *extra: str) -> ServiceProcess:
        self.sp = self.services.start("supervisor", extra=extra)
        await asyncio.to_thread(self.services.wait_serving, self.sp)
        return self.sp

    def kill9_supervisor(self) -> None:
        assert self.sp is not None
        self.sp.kill9()

    async def events(self) -> EventLog:
        await self.bus.ensure_events_stream()
        sub = await self.bus.nc.jetstream().subscribe(
            subjects.event_filter(self.node.node_id), ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL)
        self.subs.append(sub)
        return EventLog(sub)

    async def close_subscriptions(self) -> None:
        # An ordered consumer left open makes the bus fixture's drain wait for its timeout.
        for sub in self.subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass

    def new_id(self) -> str:
        # 64 characters, as CRI ids are: long paths (attach socket, cgroups) must work.
        task_id = f"sup-{uuid.uuid4().hex}{uuid.uuid4().hex[:28]}"
        self.ids.append(task_id)
        return task_id

    def bundle(self, task_id: str, args: list[str], *, memory: int = 0) -> Path:
        """A busybox bundle for `task_id` in the cgroup /shoal-test/<id>."""
        return busybox_bundle(self.bundle_root / task_id, self.base_spec, args,
                              f"/{CGROUP_PARENT}/{task_id}", memory=memory)

    def log_path(self, task_id: str) -> Path:
        """In a directory that exists, as kubelet makes it before CreateContainer."""
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        return logs / f"{task_id}.log"

    async def call(self, verb: str, msg: Message, reply: type[R], **kw: Any) -> R:
        return await self.bus.request("monitor", verb, msg, reply, **kw)

    async def create(self, args: list[str], *, memory: int = 0, start: bool = True,
                     sandbox_id: str = "") -> TaskState:
        task_id = self.new_id()
        bundle = self.bundle(task_id, args, memory=memory)
        state = await self.call("create", MonitorCreateRequest(
            id=task_id, bundle=str(bundle), log_path=str(self.log_path(task_id)),
            cgroup_path=f"/{CGROUP_PARENT}/{task_id}", sandbox_id=sandbox_id,
            labels={"test": "supervisor"}), TaskState)
        assert state.state == "created", state
        if start:
            state = await self.call("start", TaskIdRequest(id=task_id), TaskState)
        return state

    async def wait_state(self, task_id: str, want: str = "stopped",
                         timeout: float = 15) -> TaskState:
        end = time.monotonic() + timeout
        while True:
            state = await self.call("state", TaskIdRequest(id=task_id), TaskState)
            if state.state == want or time.monotonic() > end:
                assert state.state == want, state
                return state
            await asyncio.sleep(0.05)

    def cgroup_dir(self, controller: str, task_id: str) -> Path:
        return CGROUP_ROOT / controller / CGROUP_PARENT / task_id

    def cleanup(self) -> None:
        """Every container, conmon and cgroup this test made goes, whatever state the test
        left them in."""
        remove_containers(self.runtime_root, self.ids, self.node.root, CGROUP_PARENT)


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (this machine's init does not reap orphans)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


