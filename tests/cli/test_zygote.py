"""The zygote's parts on their own: fork_sibling makes a child of its caller's parent (here:
of this test process) whose /proc/<pid>/cmdline is exactly the argv it was given, and the
exec'd zygote refuses what is not `python -m <a service>` and forks what is."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

PY = sys.executable


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def wait_exit(pid: int, timeout: float = 30) -> int:
    """The exit code of our child `pid` (which asyncio/subprocess do not know)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError(f"pid {pid} did not exit within {timeout} s")


def test_fork_sibling_makes_a_child_of_the_callers_parent_with_the_given_cmdline() -> None:
    script = textwrap.dedent("""
        import os, sys, time
        from shoal_cli import forking
        assert forking.supported() is None, forking.supported()
        r, w = os.pipe()
        ready_r, ready_w = os.pipe()
        pid = forking.fork_sibling()
        if pid == 0:
            os.close(w)
            forking.set_cmdline([sys.executable, "-m", "shoal_x", "--a b", "", "c"])
            os.write(ready_w, b"x")
            os.read(r, 1)  # until the test has looked
            os._exit(7)
        os.close(r)
        os.read(ready_r, 1)
        print(pid, flush=True)
        sys.stdin.read()  # the test closes stdin once it has looked
        os.write(w, b"x")
    """)
    helper = subprocess.Popen([PY, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert helper.stdout is not None and helper.stdin is not None
    pid = int(helper.stdout.readline())
    try:
        assert parent_of(pid) == os.getpid()  # not the helper's child: ours
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert cmdline == b"\0".join(a.encode() for a in
                                     [PY, "-m", "shoal_x", "--a b", "", "c"]) + b"\0"
        assert Path(f"/proc/{pid}/comm").read_text().strip() == Path(PY).name[:15]
    finally:
        helper.stdin.close()
        assert helper.wait(timeout=30) == 0
    assert wait_exit(pid) == 7  # its exit status is ours to collect


class Zygote:
    """`python -m shoal_cli.zygote` exec'd by this test, as the launcher does."""

    def __init__(self, tmp: Path) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.err = tmp / "zygote.err"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [PY, "-m", "shoal_cli.zygote", "--fd", str(theirs.fileno()), "--node-id", "z",
                 "--run-root", str(tmp), "--malloc-arenas", "2"],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stderr=err)
        theirs.close()
        self.sock.settimeout(60)
        assert json.loads(self.sock.recv(65536)) == {"ready": self.proc.pid}

    def ask(self, request: object) -> dict[str, object]:
        self.sock.send(request if isinstance(request, bytes) else json.dumps(request).encode())
        reply = json.loads(self.sock.recv(65536))
        assert isinstance(reply, dict)
        return reply

    def close(self) -> int:
        self.sock.close()  # end of file: it exits
        return self.proc.wait(timeout=30)


@pytest.fixture
def zygote(tmp_path: Path):  # type: ignore[no-untyped-def]
    z = Zygote(tmp_path)
    try:
        yield z
    finally:
        if z.proc.poll() is None:
            z.close()


@pytest.mark.parametrize(("request_", "error"), [
    (b"not json", "not JSON"),
    ({"argv": "python"}, "list of strings"),
    ({"argv": [PY, "-m", "shoal_puller", "a\0b"]}, "without NUL"),
    ({"argv": ["/bin/sh", "-m", "shoal_puller"]}, f"must start with {PY} -m"),
    ({"argv": [PY, "-c", "shoal_puller"]}, f"must start with {PY} -m"),
    ({"argv": [PY, "-m", "os"]}, "'os' is not a Shoal service module"),
])
def test_zygote_refuses_what_is_not_a_service(zygote: Zygote, request_: object,
                                              error: str) -> None:
    reply = zygote.ask(request_)
    assert error in str(reply.get("error")), reply
    assert zygote.proc.poll() is None  # and keeps serving


def test_zygote_forks_a_service_as_a_child_of_its_parent(zygote: Zygote) -> None:
    reply = zygote.ask({"argv": [PY, "-m", "shoal_puller", "--no-such-flag"]})
    pid = reply["pid"]
    assert isinstance(pid, int)
    # The service ran as `python -m shoal_puller` would: argparse refused the flag (exit 2)
    # on the stderr it shares with the zygote; its status is ours (CLONE_PARENT).
    assert wait_exit(pid) == 2
    assert "shoal-puller: error: unrecognized arguments: --no-such-flag" in \
        zygote.err.read_text()
    assert zygote.close() == 0


def _fd_targets(pid: int) -> set[str]:
    found = set()
    for entry in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            found.add(os.readlink(f"/proc/{pid}/fd/{entry}"))
    return found


def test_descriptors_sent_with_a_request_are_the_childs_alone(zygote: Zygote) -> None:
    """What the launcher hands a service (the Docker socket it holds) arrives at the number
    asked for, in the child only; a request whose numbers do not match is refused."""
    r, w = os.pipe()
    pipe = os.readlink(f"/proc/self/fd/{w}")
    # A "NATS" that accepts and never answers: the puller waits on it instead of exiting
    # at once (a refused connection raced the look at its descriptors).
    mute = socket.create_server(("127.0.0.1", 0))
    try:
        socket.send_fds(zygote.sock, [json.dumps({"argv": [PY, "-m", "shoal_puller", "--x"],
                                                  "fds": [3, 4]}).encode()], [w])
        assert "fds must number each" in str(json.loads(zygote.sock.recv(65536))["error"])
        socket.send_fds(zygote.sock, [json.dumps({
            "argv": [PY, "-m", "shoal_puller", "--nats-url",
                     f"nats://127.0.0.1:{mute.getsockname()[1]}"],
            "fds": [45]}).encode()], [w])
        pid = json.loads(zygote.sock.recv(65536))["pid"]
        try:
            # The zygote answers once the child took its command line; the child moves
            # the descriptor to 45 just after.
            end = time.monotonic() + 30
            while not os.path.exists(f"/proc/{pid}/fd/45") and time.monotonic() < end:
                time.sleep(0.01)
            assert os.readlink(f"/proc/{pid}/fd/45") == pipe
            assert pipe not in _fd_targets(zygote.proc.pid)  # the zygote kept no copy
        finally:
            os.kill(pid, signal.SIGKILL)
            wait_exit(pid)
        os.close(w)
        assert os.read(r, 1) == b""  # every copy of the write end is closed now
    finally:
        mute.close()
        os.close(r)
        with contextlib.suppress(OSError):
            os.close(w)


def test_shoal_up_imports_no_grpc_before_it_forks() -> None:
    code = ("import sys; import shoal_cli.main; from shoal_cli import zygote; "
            "zygote.preload(); print(sorted(m for m in sys.modules if m.split('.')[0] == 'grpc'))")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert out.strip() == "[]"


def test_the_pod_commands_main_knows_are_the_ones_pods_serves() -> None:
    from shoal_cli import main, pods

    assert main.POD_COMMANDS == pods.COMMANDS
