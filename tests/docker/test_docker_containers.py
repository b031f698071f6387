"""Containers through Debian's docker CLI: run (attached, --rm, -d), start -a, ps, logs, inspect,
stop/start/restart, kill, wait, rename, rm, -v with a named volume, and Docker's errors."""

from __future__ import annotations

import json
import time

from support.docker import docker_node_fixture
from support.shoal import images_fixture  # noqa: F401

dnode = docker_node_fixture("ctrs")


def _gone(dnode, name: str) -> None:
    dnode.docker("rm", "-f", name, check=False)


def test_run_attached_prints_output_and_exit_code(dnode, images) -> None:
    out = dnode.docker("run", "--rm", images["busybox"], "echo", "hi")
    assert out.stdout == b"hi\n", out
    failed = dnode.docker("run", "--rm", images["busybox"], "sh", "-c", "echo oops >&2; exit 3",
                          check=False)
    assert failed.returncode == 3, failed
    assert failed.stderr == b"oops\n"
    cid = dnode.out("create", images["busybox"], "sh", "-c", "sleep 0.5; echo late")
    assert dnode.docker("start", "-a", cid).stdout == b"late\n"
    dnode.docker("rm", cid)
    end = time.monotonic() + 10  # --rm: removed once it exited
    while dnode.out("ps", "-aq"):
        assert time.monotonic() < end, dnode.out("ps", "-a")
        time.sleep(0.2)


def test_run_detached_then_wait_and_logs(dnode, images) -> None:
    cid = dnode.out("run", "-d", images["busybox"], "sh", "-c", "echo hi; echo oops >&2; exit 3")
    try:
        assert dnode.out("wait", cid) == "3"
        out = dnode.docker("logs", cid)
        assert out.stdout == b"hi\n" and out.stderr == b"oops\n", out
        assert dnode.docker("logs", "--tail", "0", cid).stdout == b""
        assert b"Exited (3)" in dnode.docker("ps", "-a").stdout
    finally:
        dnode.docker("rm", cid)
    assert dnode.out("ps", "-aq") == ""


def test_detached_lifecycle(dnode, images) -> None:
    cid = dnode.out("run", "-d", "--name", "web", "-e", "GREETING=hello", "-w", "/tmp",
                    "--label", "team=a", images["busybox"], "sh", "-c",
                    "echo $GREETING from $(pwd); exec sleep 300")
    try:
        assert len(cid) == 64
        rows = dnode.out("ps", "--format", "{{.ID}} {{.Names}} {{.Status}}").splitlines()
        assert any(r.startswith(cid[:12] + " web Up") for r in rows), rows
        end = time.monotonic() + 20
        while b"hello from /tmp" not in dnode.docker("logs", "web").stdout:
            assert time.monotonic() < end, dnode.docker("logs", "web")
            time.sleep(0.2)
        doc = json.loads(dnode.out("inspect", "web"))[0]
        assert doc["Id"] == cid and doc["Name"] == "/web"
        assert doc["State"]["Running"] is True
        assert "GREETING=hello" in doc["Config"]["Env"]
        assert doc["Config"]["Labels"] == {"team": "a"}
        assert dnode.out("ps", "-q", "--filter", "label=team=a") == cid[:12]
        assert dnode.out("ps", "-q", "--filter", "label=team=b") == ""
        conflict = dnode.docker("run", "-d", "--name", "web", images["busybox"], "true",
                                check=False)
        assert conflict.returncode != 0
        assert b'The container name "/web" is already in use' in conflict.stderr
        refused = dnode.docker("rm", "web", check=False)
        assert refused.returncode != 0 and b"cannot remove a running container" in \
            refused.stderr
        dnode.docker("stop", "-t", "1", "web")
        doc = json.loads(dnode.out("inspect", "web"))[0]
        assert doc["State"]["Status"] == "exited"
        dnode.docker("start", "web")  # a new CRI container in the same pod
        assert json.loads(dnode.out("inspect", "web"))[0]["State"]["Running"] is True
        dnode.docker("rename", "web", "web2")
        dnode.docker("kill", "web2")
        assert dnode.out("wait", "web2") == "137"
    finally:
        _gone(dnode, "web")
        _gone(dnode, "web2")
    assert dnode.out("ps", "-aq") == ""


def test_named_volume_outlives_its_container(dnode, images) -> None:
    try:
        first = dnode.out("run", "-d", "-v", "data1:/data", images["busybox"], "sh", "-c",
                          "echo kept > /data/f")
        assert dnode.out("wait", first) == "0"
        dnode.docker("rm", first)
        second = dnode.out("run", "-d", "-v", "data1:/data", images["busybox"], "cat",
                           "/data/f")
        assert dnode.out("wait", second) == "0"
        assert dnode.docker("logs", second).stdout == b"kept\n"
        dnode.docker("rm", second)
    finally:
        dnode.docker("volume", "rm", "data1", check=False)


def test_errors_as_docker_words_them(dnode, images) -> None:
    missing = dnode.docker("container", "inspect", "nosuch", check=False)
    assert missing.returncode != 0 and b"No such" in missing.stderr
    rm = dnode.docker("rm", "nosuch", check=False)
    assert b"No such container: nosuch" in rm.stderr
    bad = dnode.docker("run", "--rm", "--name", "bad name!", images["busybox"], "true",
                       check=False)
    assert bad.returncode != 0 and b"Invalid container name" in bad.stderr
