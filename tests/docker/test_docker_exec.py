"""`docker exec` and stdin on `docker run -i`/`-it` and `docker attach`, through Debian's
docker CLI (on a pseudo-terminal where it needs one) and the docker SDK."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time

import pytest
from support.docker import DOCKER_CLI, docker_node_fixture
from support.shoal import images_fixture  # noqa: F401

dnode = docker_node_fixture("exec")


@pytest.fixture(scope="module")
def box(dnode, images):
    """A running container to exec in."""
    dnode.docker("run", "-d", "--name", "box", images["busybox"], "sleep", "600")
    yield "box"
    dnode.docker("rm", "-f", "box", check=False)


def _on_pty(dnode, args: list[str], keys: list[bytes], timeout: float = 30
            ) -> tuple[int, bytes]:
    """The CLI run on a pseudo-terminal (-t needs one), typing `keys` once each prompt-free
    pause; its exit code and all it printed."""
    main, child = pty.openpty()
    proc = subprocess.Popen([str(DOCKER_CLI), *args], stdin=child, stdout=child, stderr=child,
                            env=dnode.env(), close_fds=True)
    os.close(child)
    out = b""
    end = time.monotonic() + timeout
    pending = list(keys)
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([main], [], [], 0.5)
            if ready:
                try:
                    data = os.read(main, 4096)
                except OSError:  # the CLI exited and the terminal closed
                    break
                out += data
            elif pending:
                os.write(main, pending.pop(0))
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=max(1.0, end - time.monotonic())), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)


def test_exec_output_and_exit_code(dnode, box) -> None:
    out = dnode.docker("exec", box, "sh", "-c", "echo out; echo err >&2")
    assert out.stdout == b"out\n" and out.stderr == b"err\n", out
    assert dnode.docker("exec", box, "sh", "-c", "exit 7", check=False).returncode == 7


def test_exec_env_user_workdir(dnode, box) -> None:
    out = dnode.out("exec", "-e", "GREETING=hi", "-u", "1000:1001", "-w", "/tmp", box,
                    "sh", "-c", "echo $GREETING; id -u; id -g; pwd")
    assert out.split() == ["hi", "1000", "1001", "/tmp"]
    assert dnode.out("exec", "-u", "nobody", box, "id", "-un") == "nobody"
    bad = dnode.docker("exec", "-u", "nosuchuser", box, "true", check=False)
    assert bad.returncode != 0 and b"nosuchuser" in bad.stderr, bad


def test_exec_stdin(dnode, box) -> None:
    out = dnode.docker("exec", "-i", box, "sh", "-c", "cat; echo done", input=b"abc\n" * 1000)
    assert out.stdout == b"abc\n" * 1000 + b"done\n", out.stdout[-40:]


def test_exec_missing_command_and_stopped_container(dnode, box, images) -> None:
    missing = dnode.docker("exec", box, "/no/such/cmd", check=False)
    assert missing.returncode == 126, missing
    dnode.docker("create", "--name", "idle", images["busybox"], "true")
    try:
        idle = dnode.docker("exec", "idle", "true", check=False)
        assert idle.returncode != 0 and b"is not running" in idle.stderr, idle
    finally:
        dnode.docker("rm", "idle")
    nosuch = dnode.docker("exec", "nosuch", "true", check=False)
    assert b"No such container: nosuch" in nosuch.stderr, nosuch


def test_exec_detached(dnode, box) -> None:
    dnode.docker("exec", "-d", box, "sh", "-c", "sleep 0.2; touch /tmp/detached")
    end = time.monotonic() + 10
    while dnode.docker("exec", box, "test", "-e", "/tmp/detached", check=False).returncode:
        assert time.monotonic() < end
        time.sleep(0.2)


def test_exec_tty(dnode, box) -> None:
    code, out = _on_pty(dnode, ["exec", "-it", box, "sh"],
                        [b"stty size; echo tty-$((6*7))\r", b"exit 5\r"])
    assert code == 5, out
    assert b"tty-42" in out, out


def test_run_interactive(dnode, images) -> None:
    out = dnode.docker("run", "-i", "--rm", images["busybox"], "sh", "-c", "cat; echo end",
                       input=b"piped\n", timeout=20)
    assert out.stdout == b"piped\nend\n", out
    code, text = _on_pty(dnode, ["run", "-it", "--rm", images["busybox"], "sh", "-c",
                                 "read x; echo got-$x; exit 4"], [b"word\r"])
    assert code == 4, text
    assert b"got-word" in text, text


def test_attach_stdin(dnode, images) -> None:
    # docker attach ends with the container (it reports its exit code), so it reads one line.
    dnode.docker("run", "-di", "--name", "cat", images["busybox"], "sh", "-c",
                 "read x; echo seen-$x; exit 3")
    try:
        out = dnode.docker("attach", "cat", input=b"one\n", timeout=30, check=False)
        assert out.returncode == 3 and out.stdout == b"seen-one\n", out
    finally:
        dnode.docker("rm", "-f", "cat")


def test_sdk_exec_run(dnode, box) -> None:
    client = dnode.sdk()
    ctr = client.containers.get(box)
    code, output = ctr.exec_run(["sh", "-c", "echo a; echo b >&2"], demux=True)
    assert code == 0 and output == (b"a\n", b"b\n"), (code, output)
    info = client.api.exec_create(box, ["sh", "-c", "exit 3"])
    client.api.exec_start(info["Id"])
    assert client.api.exec_inspect(info["Id"])["ExitCode"] == 3


def test_sdk_containers_run(dnode, images) -> None:
    client = dnode.sdk()
    out = client.containers.run(images["busybox"], ["echo", "from-sdk"], remove=True)
    assert out == b"from-sdk\n"


def test_detach_keys_leave_the_container_running(dnode, images) -> None:
    """ctrl-p ctrl-q (or --detach-keys) ends the client's session, not the container. The
    CLI spots the keys itself and drops the connection; the container keeps its stdin."""
    code, out = _on_pty(dnode, ["run", "-it", "--name", "detached", images["busybox"], "sh"],
                        [b"echo before-$((2*3))\r", b"\x10\x11"])
    try:
        assert b"before-6" in out, (code, out)
        assert dnode.out("inspect", "-f", "{{.State.Status}}", "detached") == "running"
        assert dnode.out("exec", "detached", "echo", "alive") == "alive"
        code, out = _on_pty(dnode, ["attach", "--detach-keys", "ctrl-x,x", "detached"],
                            [b"echo again-$((3*3))\r", b"\x18x"])
        assert b"again-9" in out, (code, out)
        assert dnode.out("inspect", "-f", "{{.State.Status}}", "detached") == "running"
    finally:
        dnode.docker("rm", "-f", "detached")
