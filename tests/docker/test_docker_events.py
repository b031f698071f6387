"""`docker events`: what the gateway does and what the supervisor saw (`die`), from the
events stream, replayed with --since/--until, followed live, filtered, and kept while the
gateway is down."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time

import pytest
from support.docker import DOCKER_CLI, docker_node_fixture
from support.shoal import images_fixture  # noqa: F401

dnode = docker_node_fixture("events")


def replay(dnode, since: float, *filters: str) -> list[dict]:
    """`docker events --since T --until now` as JSON lines (the CLI's own --format)."""
    args = ["events", "--since", f"{since:.9f}", "--until", f"{time.time():.9f}",
            "--format", "{{json .}}"]
    for f in filters:
        args += ["--filter", f]
    out = dnode.out(*args, timeout=60)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def actions(events: list[dict], actor: str | None = None) -> list[str]:
    return [e["Action"] for e in events if actor is None or e["Actor"]["ID"] == actor]


def test_a_run_gives_create_start_die_destroy(dnode, images) -> None:
    dnode.docker("pull", images["busybox"])
    t0 = time.time()
    cid = dnode.out("run", "-d", "--name", "evx", "--label", "team=blue", images["busybox"],
                    "sh", "-c", "exit 4")
    assert dnode.out("wait", "evx") == "4"
    dnode.docker("rm", "evx")
    time.sleep(0.5)
    seen = [e for e in replay(dnode, t0) if e["Type"] == "container"]
    assert actions(seen, cid) == ["create", "start", "die", "destroy"], seen
    die = next(e for e in seen if e["Action"] == "die")
    assert die["Actor"]["Attributes"] == {"exitCode": "4", "name": "evx", "team": "blue",
                                          "image": images["busybox"]}
    assert (die["status"], die["id"], die["from"], die["scope"]) == \
        ("die", cid, images["busybox"], "local")
    assert abs(die["timeNano"] / 1e9 - time.time()) < 60 and die["time"] == \
        die["timeNano"] // 10**9

    # Filters: by name and action, by label, by type; keys AND-ed, values OR-ed.
    assert actions(replay(dnode, t0, "container=evx", "event=die")) == ["die"]
    assert actions(replay(dnode, t0, "label=team=blue", "event=create",
                          "event=destroy")) == ["create", "destroy"]
    assert replay(dnode, t0, "container=nosuch") == []
    assert {e["Type"] for e in replay(dnode, t0, "type=container")} == {"container"}
    # The SDK sees the same documents.
    sdk = list(dnode.sdk().events(since=t0, until=time.time(), decode=True,
                                  filters={"container": cid}))
    assert [e["Action"] for e in sdk] == ["create", "start", "die", "destroy"]


def test_image_volume_and_network_events(dnode, images) -> None:
    t0 = time.time()
    dnode.docker("tag", images["busybox"], "evtag:1")
    dnode.docker("rmi", "evtag:1")
    dnode.docker("volume", "create", "evvol")
    dnode.docker("volume", "rm", "evvol")
    net_id = dnode.out("network", "create", "evnet")
    dnode.docker("network", "rm", "evnet")
    time.sleep(0.5)
    image = replay(dnode, t0, "type=image")
    assert actions(image)[0] == "tag" and set(actions(image)[1:]) == {"untag"}, image
    assert image[0]["Actor"]["Attributes"]["name"] == "evtag:1"
    vols = replay(dnode, t0, "volume=evvol")
    assert [(e["Type"], e["Action"], e["Actor"]["ID"]) for e in vols] == [
        ("volume", "create", "evvol"), ("volume", "destroy", "evvol")]
    nets = replay(dnode, t0, "network=evnet")
    assert [(e["Action"], e["Actor"]["ID"]) for e in nets] == [("create", net_id),
                                                               ("destroy", net_id)]
    assert "status" not in nets[0]  # only container and image events have the old fields


def test_following_shows_events_as_they_happen(dnode, images) -> None:
    follower = subprocess.Popen(
        [str(DOCKER_CLI), "events", "--filter", "container=evy", "--format", "{{json .}}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dnode.env(),
        stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # the CLI is connected and following
        dnode.docker("run", "-d", "--name", "evy", images["busybox"], "sleep", "600")
        dnode.docker("kill", "evy")
        got: list[str] = []
        end = time.monotonic() + 30
        assert follower.stdout is not None
        os.set_blocking(follower.stdout.fileno(), False)
        buffer = b""
        while "die" not in got:
            assert time.monotonic() < end and follower.poll() is None, (got, buffer)
            buffer += follower.stdout.read() or b""
            got = [json.loads(x)["Action"] for x in buffer.splitlines() if x.strip()]
            time.sleep(0.1)
        assert got == ["create", "start", "kill", "die"], got
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(timeout=10)
        dnode.docker("rm", "-f", "evy")


def test_a_die_while_the_gateway_is_down_is_reported(dnode, images) -> None:
    t0 = time.time()
    cid = dnode.out("run", "-d", "--name", "evz", images["busybox"], "sh", "-c",
                    "sleep 2; exit 9")
    dnode.kill9_gateway()
    time.sleep(3.5)  # it exits meanwhile
    dnode.start_gateway()
    try:
        end = time.monotonic() + 30
        while True:
            try:
                died = replay(dnode, t0, "container=evz", "event=die")
            except AssertionError:
                died = []  # the gateway still starting
            if died or time.monotonic() > end:
                break
            time.sleep(0.5)
        assert [(e["Actor"]["ID"], e["Actor"]["Attributes"]["exitCode"]) for e in died] == \
            [(cid, "9")]
    finally:
        dnode.docker("rm", "-f", "evz")


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


@pytest.mark.parametrize("query,message", [
    ("since=nonsense", "invalid value for since"),
    ("until=12x", "invalid value for until"),
    ("since=20&until=10", "since must be before until"),
    ("filters=%7B%22colour%22%3A%5B%22red%22%5D%7D", "invalid filter 'colour'"),
    ("filters=notjson", "filters"),
])
def test_bad_input_is_refused(dnode, query, message) -> None:
    """The CLI checks --since itself; the API answers 400 with Docker's message."""
    conn = UnixHTTP(str(dnode.socket))
    conn.request("GET", f"/v1.41/events?{query}")
    reply = conn.getresponse()
    body = reply.read().decode()
    assert reply.status == 400 and message in json.loads(body)["message"], body
    bad = dnode.docker("events", "--filter", "colour=red", "--until", f"{time.time():.0f}",
                       check=False, timeout=30)
    assert bad.returncode != 0 and "invalid filter" in bad.stderr.decode(), bad
