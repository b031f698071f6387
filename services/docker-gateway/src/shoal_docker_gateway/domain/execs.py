"""Docker's exec instances: `POST /containers/{id}/exec` records what to run, `POST
/exec/{id}/start` runs it in the container through the supervisor's attached exec sessions
(shoal_common.attach), and `GET /exec/{id}/json` tells its exit code, which is how the CLI
learns it. Like dockerd's, instances live in memory: a gateway restart ends the streams
they belong to anyway. Finished ones are dropped after a while, and a container has a
bounded number, so a client cannot grow the table without end."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from shoal_common.attach import ExecProcess, ProcessIO, Sessions, TerminalSize
from shoal_common.messages.fields import OptionalAbsPath
from shoal_common.messages.streams import ExecUser

from shoal_docker_gateway.domain.containers_body import flag, str_list, text
from shoal_docker_gateway.errors import BadParameter, Conflict, NotFound

if TYPE_CHECKING:
    from shoal_docker_gateway.store.containers import ContainerRecord

log = structlog.get_logger("shoal.docker.exec")
KEEP_FINISHED = 300.0  # seconds a finished instance can still be inspected
MAX_PER_CONTAINER = 256


@dataclass
class ExecInstance:
    id: str  # 64 hex, as Docker's
    container_id: str  # the Docker container's
    cri_id: str  # the CRI container (the supervisor's task) it runs in
    process: ExecProcess
    attach_stdin: bool
    attach_stdout: bool
    attach_stderr: bool
    privileged: bool = False
    detach_keys: str = ""
    started: bool = False
    running: bool = False
    exit_code: int | None = None
    pid: int = 0
    finished_at: float = 0.0
    resizes: asyncio.Queue[TerminalSize] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None  # a detached run (held so it is not collected)

    def inspect(self) -> dict[str, Any]:
        cmd = self.process.cmd
        return {
            "ID": self.id, "Running": self.running, "ExitCode": self.exit_code,
            "ProcessConfig": {"tty": self.process.tty, "entrypoint": cmd[0],
                              "arguments": cmd[1:], "privileged": self.privileged,
                              "user": self.process.user},
            "OpenStdin": self.attach_stdin, "OpenStdout": self.attach_stdout,
            "OpenStderr": self.attach_stderr, "CanRemove": False,
            "ContainerID": self.container_id, "DetachKeys": self.detach_keys,
            "Pid": self.pid,
        }


def _checked(value: str, kind: Any, name: str) -> str:
    """`value` as the supervisor's message field `kind` takes it, or a 400 naming `name`."""
    try:
        msgspec.convert(value, kind)
    except msgspec.ValidationError:
        raise BadParameter(f"invalid {name}: {value[:200]!r}") from None
    return value


def parse_config(body: dict[str, Any]) -> tuple[ExecProcess, dict[str, Any]]:
    """The exec create body (ExecConfig) checked: the process and the attach flags."""
    cmd = str_list(body, "Cmd")
    if not cmd:
        raise BadParameter("No exec command specified")
    if flag(body, "Privileged"):
        raise BadParameter("privileged exec is not supported by Shoal: the process gets "
                           "the container's own privileges")
    env = str_list(body, "Env") or []
    for item in env:
        if "=" not in item or item.startswith("="):
            raise BadParameter(f"invalid environment variable: {item[:200]!r}")
    process = ExecProcess(
        cmd=cmd, tty=flag(body, "Tty"), env=env,
        user=_checked(text(body, "User"), ExecUser, "user"),
        cwd=_checked(text(body, "WorkingDir"), OptionalAbsPath, "working directory"))
    flags = {"attach_stdin": flag(body, "AttachStdin"),
             "attach_stdout": flag(body, "AttachStdout"),
             "attach_stderr": flag(body, "AttachStderr"),
             "detach_keys": text(body, "DetachKeys")}
    return process, flags


class ExecRegistry:
    """The gateway's exec instances, by id."""

    def __init__(self) -> None:
        self._by_id: dict[str, ExecInstance] = {}

    def _expire(self) -> None:
        now = time.time()
        for key, inst in list(self._by_id.items()):
            if inst.finished_at and now - inst.finished_at > KEEP_FINISHED:
                del self._by_id[key]

    def add(self, rec: ContainerRecord, process: ExecProcess,
            flags: dict[str, Any]) -> ExecInstance:
        self._expire()
        if sum(1 for i in self._by_id.values() if i.container_id == rec.id) \
                >= MAX_PER_CONTAINER:
            raise Conflict(f"container {rec.id} has {MAX_PER_CONTAINER} exec instances; "
                           "wait for some to finish")
        inst = ExecInstance(id=uuid.uuid4().hex + uuid.uuid4().hex, container_id=rec.id,
                            cri_id=rec.cri_id, process=process, **flags)
        self._by_id[inst.id] = inst
        return inst

    def get(self, exec_id: str) -> ExecInstance:
        inst = self._by_id.get(exec_id)
        if inst is None:
            raise NotFound(f"No such exec instance: {exec_id[:128]}")
        return inst

    def of_container(self, container_id: str) -> list[str]:
        return [i.id for i in self._by_id.values() if i.container_id == container_id]

    def forget_container(self, container_id: str) -> None:
        for key in self.of_container(container_id):
            del self._by_id[key]


def claim(inst: ExecInstance) -> None:
    """Mark `inst` started, once: Docker refuses a second start."""
    if inst.started:
        raise Conflict(f"Error: Exec command {inst.id} has already run" if not inst.running
                       else f"Error: Exec command {inst.id} is already running")
    inst.started = True
    inst.running = True


async def run(sessions: Sessions, inst: ExecInstance, io: ProcessIO) -> int:
    """Run a claimed instance to its end; its exit code (also kept on it, for inspect).
    `io` should share `inst.resizes`, so resizes sent to the instance reach the session."""

    def started(pid: int) -> None:
        inst.pid = pid

    try:
        inst.exit_code = await sessions.exec(inst.cri_id, inst.id[:32], inst.process, io,
                                             on_start=started)
        return inst.exit_code
    finally:
        inst.running = False
        inst.finished_at = time.time()
