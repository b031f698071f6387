"""The OCI runtime's command line (runc and runc-compatible runtimes such as crun): start,
kill, delete, state and update. `create` and `exec` go through conmon (conmon.py)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from shoal_common.commands import run_command
from shoal_common.errors import FailedPrecondition, Internal

from shoal_supervisor.domain.metrics import timed

# runc reports errors as logrus lines: time="..." level=error msg="..."
_MSG_RE = re.compile(r'\bmsg="((?:[^"\\]|\\.)*)"')
NOT_FOUND_TEXT = "does not exist"
MESSAGE_LIMIT = 4000


def runtime_message(text: str) -> str:
    """The human part of a runtime's error output: the msg="..." of each logrus line, or
    the text itself when it is not logrus-formatted."""
    messages = []
    for line in text.strip().splitlines():
        match = _MSG_RE.search(line)
        if match:
            try:
                messages.append(json.loads(f'"{match.group(1)}"'))
            except json.JSONDecodeError:
                messages.append(match.group(1))
        elif line.strip():
            messages.append(line.strip())
    # Bounded: it goes into error replies, and a reply over NATS' payload is never sent.
    return ("; ".join(messages) or text.strip())[:MESSAGE_LIMIT]


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def message(self) -> str:
        return runtime_message((self.stderr or self.stdout).decode(errors="replace"))


async def run(argv: list[str], op: str, *, stdin: bytes | None = None,
              timeout: float = 60.0) -> Result:
    """Run a short-lived command and collect its output; timed in the runtime histogram."""
    with timed(op):
        try:
            done = await run_command(argv, stdin=stdin, timeout=timeout)
        except OSError as exc:
            raise FailedPrecondition(f"cannot run {argv[0]}: {exc.strerror}") from None
    return Result(done.returncode, done.stdout, done.stderr)


class OciRuntime:
    """One OCI runtime binary (runc or compatible) with one state directory (`--root`)."""

    def __init__(self, path: str, root: str) -> None:
        self.path = path
        self.root = root

    def _argv(self, *args: str) -> list[str]:
        return [self.path, "--root", self.root, *args]

    async def start(self, task_id: str) -> None:
        res = await run(self._argv("start", task_id), "start")
        if res.returncode != 0:
            raise FailedPrecondition(f"{self.name} start {task_id} failed: {res.message}")

    async def kill(self, task_id: str, signal: int, *, all_processes: bool = False) -> Result:
        """Returns the result: "not running" races with an exit are the caller's to judge."""
        args = ["kill", *(["--all"] if all_processes else []), task_id, str(signal)]
        return await run(self._argv(*args), "kill")

    async def delete(self, task_id: str, *, force: bool) -> None:
        args = ["delete", *(["--force"] if force else []), task_id]
        res = await run(self._argv(*args), "delete")
        if res.returncode != 0 and NOT_FOUND_TEXT not in res.message:
            raise FailedPrecondition(f"{self.name} delete {task_id} failed: {res.message}")

    async def state(self, task_id: str) -> dict[str, Any] | None:
        """The runtime's view (status: created, running, paused, stopped) or None when it
        does not know the container."""
        res = await run(self._argv("state", task_id), "state")
        if res.returncode != 0:
            if NOT_FOUND_TEXT in res.message:
                return None
            raise Internal(f"{self.name} state {task_id} failed: {res.message}")
        try:
            state: dict[str, Any] = json.loads(res.stdout)
        except json.JSONDecodeError as exc:
            raise Internal(f"{self.name} state {task_id}: unreadable output: {exc}") from None
        return state

    async def update(self, task_id: str, resources: dict[str, Any]) -> None:
        res = await run(self._argv("update", "--resources", "-", task_id), "update",
                        stdin=json.dumps(resources).encode())
        if res.returncode != 0:
            raise FailedPrecondition(f"{self.name} update {task_id} failed: {res.message}")

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]
