"""Interactive exec sessions and attach through conmon's attach socket, driven over the bus
the way the gateway's streaming server drives them (but with a socket client of its own)."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
from shoal_common.errors import FailedPrecondition, NotFound
from shoal_common.messages import Empty
from shoal_common.messages import streams as s
from shoal_common.messages.monitor import StopRequest, TaskIdRequest, TaskState
from supervisor_harness import Harness, conmon_pids

pytestmark = pytest.mark.e2e
STDOUT, STDERR = 2, 3


class AttachClient:
    """conmon's attach protocol: SOCK_SEQPACKET; we send raw stdin, it sends packets whose
    first byte names the stream."""

    def __init__(self, path: str) -> None:
        # The path may be longer than a sockaddr allows: connect through the directory's fd.
        self.dir_fd = os.open(Path(path).parent, os.O_PATH)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(f"/proc/self/fd/{self.dir_fd}/{Path(path).name}")
        self.sock.setblocking(False)

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    def close_stdin(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    async def read_all(self, timeout: float = 10) -> dict[int, bytes]:
        out: dict[int, bytes] = {STDOUT: b"", STDERR: b""}
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while packet := await loop.sock_recv(self.sock, 65536):
                out[packet[0]] += packet[1:]
        return out

    def close(self) -> None:
        self.sock.close()
        os.close(self.dir_fd)


async def run_exec(sup: Harness, task_id: str, cmd: list[str], *, stdin: bytes | None = None,
                   tty: bool = False, size: tuple[int, int] = (0, 0),
                   resize: tuple[int, int] | None = None) -> tuple[int, dict[int, bytes]]:
    """Run an exec session; with `resize`, resize its terminal once its first line is out."""
    exec_id = os.urandom(8).hex()
    session = await sup.call("exec_create", s.ExecCreateRequest(
        id=task_id, exec_id=exec_id, cmd=cmd, tty=tty, stdin=stdin is not None,
        height=size[0], width=size[1]), s.ExecSession)
    client = AttachClient(session.attach_socket)
    first = b""
    try:
        await sup.call("exec_start", s.ExecIdRequest(id=task_id, exec_id=exec_id), s.ExecStarted)
        if resize:
            loop = asyncio.get_running_loop()
            while b"\n" not in first:
                packet = await loop.sock_recv(client.sock, 65536)
                assert packet[:1] == bytes([STDOUT]), packet
                first += packet[1:]
            await sup.call("resize", s.ResizeRequest(id=task_id, exec_id=exec_id,
                                                     height=resize[0], width=resize[1]), Empty)
        if stdin is not None:
            await client.send(stdin)
            client.close_stdin()
        out = await client.read_all()
        out[STDOUT] = first + out[STDOUT]
    finally:
        client.close()
    code = (await sup.call("exec_wait", s.ExecIdRequest(id=task_id, exec_id=exec_id),
                           s.ExecExit)).exit_code
    return code, out


async def test_exec_sessions(sup: Harness) -> None:
    await sup.start_supervisor()
    task = await sup.create(["sh", "-c", "while true; do sleep 1; done"])

    code, out = await run_exec(sup, task.id, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (code, out) == (3, {STDOUT: b"out\n", STDERR: b"err\n"})
    code, out = await run_exec(sup, task.id, ["cat"], stdin=b"line one\nline two")
    assert (code, out[STDOUT]) == (0, b"line one\nline two")
    # A terminal: sized at creation, resized later; output has the tty's CRLF.
    code, out = await run_exec(sup, task.id, ["sh", "-c", 'stty size; while [ "$(stty size)" '
                                                     '= "24 80" ]; do sleep 0.05; done; stty size'],
                               tty=True, size=(24, 80), resize=(40, 132))
    assert (code, out[STDOUT]) == (0, b"24 80\r\n40 132\r\n")

    with pytest.raises(FailedPrecondition, match="executable file not found"):
        await run_exec(sup, task.id, ["nope"])
    # A session given up on before it started: removed, its conmon gone.
    exec_id = "abandoned"
    await sup.call("exec_create", s.ExecCreateRequest(id=task.id, exec_id=exec_id,
                                                      cmd=["sleep", "100"]), s.ExecSession)
    assert conmon_pids(exec_id)
    assert_owner_only(sup, task.id, exec_id)
    await sup.call("exec_remove", s.ExecIdRequest(id=task.id, exec_id=exec_id), Empty)
    assert not conmon_pids(exec_id)
    with pytest.raises(NotFound):
        await sup.call("exec_start", s.ExecIdRequest(id=task.id, exec_id=exec_id), s.ExecStarted)
    # And one killed while it runs.
    session = await sup.call("exec_create", s.ExecCreateRequest(
        id=task.id, exec_id="running", cmd=["sleep", "100"]), s.ExecSession)
    await sup.call("exec_start", s.ExecIdRequest(id=task.id, exec_id="running"), s.ExecStarted)
    await sup.call("exec_remove", s.ExecIdRequest(id=task.id, exec_id="running"), Empty)
    assert not conmon_pids("running")
    assert not Path(session.attach_socket).parent.exists()

    attach = await sup.call("attach", TaskIdRequest(id=task.id), s.AttachInfo)
    assert Path(attach.attach_socket).exists() and not attach.stdin
    await sup.call("stop", StopRequest(id=task.id, timeout=0.5), TaskState)
    with pytest.raises(FailedPrecondition, match="not running"):
        await sup.call("exec_create", s.ExecCreateRequest(id=task.id, exec_id="late",
                                                          cmd=["true"]), s.ExecSession)
    with pytest.raises(FailedPrecondition, match="not running"):
        await sup.call("attach", TaskIdRequest(id=task.id), s.AttachInfo)


def assert_owner_only(sup: Harness, task_id: str, exec_id: str) -> None:
    """What the supervisor itself writes (the exec's process spec with its environment,
    conmon's stderr, the database) is 0600 and its directories 0700; pid and exit files
    are conmon's, in those directories."""
    run, state = sup.node.run_root / "supervisor", sup.node.state_root / "supervisor"
    task_dir = run / "tasks" / task_id
    session = task_dir / "exec" / exec_id
    dirs = [run / "tasks", run / "attach", run / "runc", run / "exec-output", state / "exits",
            state / "persist", task_dir, state / "persist" / task_id, session]
    assert {str(d): d.stat().st_mode & 0o777 for d in dirs} == {str(d): 0o700 for d in dirs}
    files = [session / "process.json", session / "conmon.log", task_dir / "conmon.log",
             session / "start", session / "sync",
             *(f for f in state.iterdir() if f.name.startswith("tasks.db"))]
    assert {str(f): f.stat().st_mode & 0o777 for f in files} == {str(f): 0o600 for f in files}
