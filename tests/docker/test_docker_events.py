"""`docker events`: what the gateway does and what the supervisor saw (`die`), from the
events stream, replayed with --since/--until, followed live, filtered, and kept while the
gateway is down."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
from datetime import UTC, datetime

import nats
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


def replay_until(dnode, since: float, done, *filters: str, timeout: float = 20
                 ) -> list[dict]:
    """`replay` again until `done(events)`: the gateway publishes an event once what it
    reports is done, which may be a moment after the CLI returned."""
    end = time.monotonic() + timeout
    while True:
        events = replay(dnode, since, *filters)
        if done(events) or time.monotonic() > end:
            return events
        time.sleep(0.3)


CORE = ("create", "start", "die", "destroy")


def test_run_rm_gives_create_start_die_destroy_in_order(dnode, images) -> None:
    dnode.docker("pull", images["busybox"])
    t0 = time.time()
    dnode.docker("run", "--rm", "--name", "evx", images["busybox"], "true")
    seen = replay_until(dnode, t0, lambda evs: "destroy" in actions(evs), "container=evx")
    assert [a for a in actions(seen) if a in CORE] == list(CORE), seen
    assert len({e["Actor"]["ID"] for e in seen}) == 1
    die = next(e for e in seen if e["Action"] == "die")
    assert die["Actor"]["Attributes"]["exitCode"] == "0"
    assert die["Actor"]["Attributes"]["name"] == "evx"
    times = [e["timeNano"] for e in seen]
    assert times == sorted(times)


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
    # The SDK sees the same documents as the CLI.
    until = time.time()
    sdk = list(dnode.sdk().events(since=t0, until=until, decode=True,
                                  filters={"container": cid}))
    assert [e["Action"] for e in sdk] == ["create", "start", "die", "destroy"]
    cli = dnode.out("events", "--since", f"{t0:.9f}", "--until", f"{until:.9f}",
                    "--filter", f"container={cid}", "--format", "{{json .}}")
    assert sdk == [json.loads(line) for line in cli.splitlines()]


def test_stop_restart_rename_and_exec_events(dnode, images) -> None:
    t0 = time.time()
    cid = dnode.out("run", "-d", "--name", "evs", images["busybox"], "sleep", "600")
    assert dnode.out("exec", "evs", "sh", "-c", "echo hi") == "hi"
    dnode.docker("rename", "evs", "evs2")
    dnode.docker("restart", "-t", "1", "evs2")
    dnode.docker("stop", "-t", "1", "evs2")
    dnode.docker("stop", "evs2")  # not running: 304, and no event
    dnode.docker("rm", "evs2")
    expected = ["create", "start", "exec_create: sh -c echo hi", "exec_start: sh -c echo hi",
                "rename", "kill", "die", "stop", "start", "restart", "kill", "die", "stop",
                "destroy"]
    seen = replay_until(dnode, t0, lambda evs: "destroy" in actions(evs),
                        f"container={cid[:12]}")
    assert actions(seen) == expected, actions(seen)
    by_action = {e["Action"]: e["Actor"]["Attributes"] for e in seen}
    assert by_action["rename"]["oldName"] == "/evs" and by_action["rename"]["name"] == "evs2"
    assert by_action["kill"]["signal"] == "15"
    assert by_action["exec_start: sh -c echo hi"]["execID"] == \
        by_action["exec_create: sh -c echo hi"]["execID"]
    # `event=exec_start` matches the action before ": ", as Docker's filter does.
    assert actions(replay(dnode, t0, f"container={cid}", "event=exec_start")) == \
        ["exec_start: sh -c echo hi"]
    # A kill with a signal names it; `docker kill` of a stopped container is no event.
    t1 = time.time()
    # PID 1 of its namespace: only a signal it handles reaches it (as in Docker).
    dnode.docker("run", "-d", "--name", "evk", images["busybox"], "sh", "-c",
                 "trap 'exit 3' USR1; while :; do sleep 0.1; done")
    dnode.docker("kill", "-s", "USR1", "evk")
    dnode.docker("wait", "evk")
    assert dnode.docker("kill", "evk", check=False).returncode != 0
    dnode.docker("rm", "evk")
    seen = replay_until(dnode, t1, lambda evs: "destroy" in actions(evs), "container=evk")
    assert [(e["Action"], e["Actor"]["Attributes"].get("signal")) for e in seen
            if e["Action"] in ("kill", "die")] == [("kill", str(signal.SIGUSR1)),
                                                  ("die", None)], seen


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


async def _followers(dnode) -> int:
    """The ordered consumers of this node's docker.event subject (one per GET /events)."""
    from shoal_common import subjects

    subject = subjects.event(dnode.shoal.services.node.node_id, "moby", "docker.event")
    nc = await nats.connect(dnode.shoal.services.node.nats_url)
    try:
        infos = await nc.jetstream().consumers_info("SHOAL_EVENTS")
    finally:
        await nc.close()
    return sum(1 for i in infos if i.config.filter_subject == subject)


async def test_a_quiet_follower_that_leaves_ends_its_consumer(dnode) -> None:
    """A follower whose filter matches nothing is never written to: its leaving is seen
    anyway, and its consumer goes (not one left per Ctrl-C)."""
    before = await _followers(dnode)
    follower = subprocess.Popen(
        [str(DOCKER_CLI), "events", "--filter", "container=nosuch-ever"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dnode.env(),
        stdin=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 10
        while await _followers(dnode) == before:
            assert time.monotonic() < end and follower.poll() is None
            await asyncio.sleep(0.2)
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(timeout=10)
    end = time.monotonic() + 20
    while await _followers(dnode) > before:
        assert time.monotonic() < end, "the consumer of a follower that left is still there"
        await asyncio.sleep(0.3)


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


def test_replay_ends_when_until_is_reached(dnode) -> None:
    """`until` in the past: the end of what is stored before it, at once (however far back
    `since` is); in the future: at that time."""
    started = time.monotonic()
    replay(dnode, time.time() - 3600)
    assert time.monotonic() - started < 5
    started = time.monotonic()
    out = dnode.out("events", "--until", f"{time.time() + 2:.9f}", timeout=30)
    assert out == "" and 1.5 < time.monotonic() - started < 8


async def test_malformed_bus_events_are_skipped(dnode, images) -> None:
    """A tasks.exit or docker.event that is not the supervisor's or the gateway's doing
    (garbage, an exit of no Docker container) neither stops the consumer nor a replay."""
    from shoal_common import codec, subjects
    from shoal_common.messages.monitor import TaskExited

    t0 = time.time()
    node_id = dnode.shoal.services.node.node_id
    nc = await nats.connect(dnode.shoal.services.node.nats_url)
    try:
        js = nc.jetstream()
        for topic in ("tasks.exit", "docker.event"):
            await js.publish(subjects.event(node_id, "moby", topic), b"\xc1garbage")
        await js.publish(subjects.event(node_id, "moby", "tasks.exit"), codec.encode(
            TaskExited(id="f" * 64, pid=1, exit_code=1, exited_at=time.time(),
                       reason="Error")))
    finally:
        await nc.close()
    cid = dnode.out("run", "-d", "--name", "evm", images["busybox"], "sh", "-c", "exit 3")
    try:
        seen = replay_until(dnode, t0, lambda evs: "die" in actions(evs), "event=die")
        assert [(e["Actor"]["ID"], e["Actor"]["Attributes"]["exitCode"]) for e in seen] == \
            [(cid, "3")]
        assert dnode.gateway is not None and dnode.gateway.proc.poll() is None
    finally:
        dnode.docker("rm", "-f", "evm")


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def test_rfc3339_times(dnode) -> None:
    """The API takes RFC 3339 too (the CLI converts its own forms to unix seconds)."""
    t0 = time.time()
    dnode.docker("volume", "create", "evrfc")
    dnode.docker("volume", "rm", "evrfc")
    since = datetime.fromtimestamp(t0 - 1, UTC).isoformat().replace("+00:00", "Z")
    until = datetime.fromtimestamp(time.time() + 1, UTC).isoformat()
    conn = UnixHTTP(str(dnode.socket))
    conn.request("GET", "/v1.41/events?" + urllib.parse.urlencode(
        {"since": since, "until": until, "filters": json.dumps({"volume": ["evrfc"]})}))
    reply = conn.getresponse()
    assert reply.status == 200
    got = [json.loads(line) for line in reply.read().decode().splitlines()]
    assert [e["Action"] for e in got] == ["create", "destroy"], got


@pytest.mark.parametrize("query,message", [
    ("since=nonsense", "invalid value for since"),
    ("until=12x", "invalid value for until"),
    ("since=20&until=10", "since must be before until"),
    ("filters=%7B%22colour%22%3A%5B%22red%22%5D%7D", "invalid filter 'colour'"),
    ("filters=notjson", "filters"),
    ("since=999999999999", "invalid value for since"),
    ("until=2023-13-40T00:00:00Z", "invalid value for until"),
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
    # The CLI refuses a --since it cannot read before it asks.
    bad = dnode.docker("events", "--since", "nonsense", check=False, timeout=30)
    assert bad.returncode != 0 and "nonsense" in bad.stderr.decode(), bad
