"""`docker run --restart`: the supervisor runs the container again in place (its writable
layer kept, its log appended to), counts the runs for `docker inspect`, and `docker stop`
ends the policy."""

from __future__ import annotations

import json
import time

from support.docker import docker_node_fixture
from support.shoal import images_fixture  # noqa: F401

dnode = docker_node_fixture("restart")


def state(dnode, name: str) -> dict:
    doc = json.loads(dnode.out("inspect", name))[0]
    return {**doc["State"], "RestartCount": doc["RestartCount"]}


def until(check, timeout: float = 20.0, what: str = ""):
    end = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)
    return got


def test_on_failure_keeps_the_writable_layer_and_stops_at_its_limit(dnode, images) -> None:
    dnode.docker("run", "-d", "--name", "retry", "--restart", "on-failure:2",
                 images["busybox"], "sh", "-c", "echo run >> /runs; wc -l < /runs; exit 3")
    try:
        until(lambda: state(dnode, "retry")["RestartCount"] == 2, what="two restarts")
        st = until(lambda: (s := state(dnode, "retry"))["Status"] == "exited" and s,
                   what="the last exit")
        time.sleep(1.0)  # no third restart
        st = state(dnode, "retry")
        assert (st["ExitCode"], st["RestartCount"], st["Restarting"]) == (3, 2, False), st
        assert dnode.out("logs", "retry").split() == ["1", "2", "3"]
    finally:
        dnode.docker("rm", "-f", "retry")


def test_always_runs_again_until_docker_stop(dnode, images) -> None:
    dnode.docker("run", "-d", "--name", "again", "--restart", "always", images["busybox"],
                 "sh", "-c", "sleep 0.3")
    try:
        until(lambda: state(dnode, "again")["RestartCount"] >= 2, what="restarts")
        # Between two runs (the delay grows to 0.8 s and more) `docker ps` says so.
        until(lambda: dnode.out("ps", "--filter", "name=again", "--format",
                                "{{.Status}}").startswith("Restarting (0)"),
              what="a Restarting status")
        dnode.docker("stop", "-t", "1", "again")
        count = state(dnode, "again")["RestartCount"]
        time.sleep(1.5)
        st = state(dnode, "again")
        assert (st["Status"], st["RestartCount"]) == ("exited", count), st
        assert dnode.out("ps", "-q", "--filter", "name=again") == ""
    finally:
        dnode.docker("rm", "-f", "again")


def test_bad_restart_policies_are_refused_by_the_gateway(dnode, images) -> None:
    """The CLI checks some itself; the SDK sends what it is given."""
    import docker.errors
    import pytest

    dnode.docker("pull", images["busybox"])
    client = dnode.sdk()
    for policy, extra, message in [
            ({"Name": "always"}, {"auto_remove": True}, "AutoRemove"),
            ({"Name": "sometimes"}, {}, "invalid restart policy"),
            ({"Name": "always", "MaximumRetryCount": 3}, {}, "maximum retry count")]:
        with pytest.raises(docker.errors.APIError, match=message) as err:
            client.containers.create(images["busybox"], "true", restart_policy=policy,
                                     **extra)
        assert err.value.status_code == 400


def test_start_of_an_exited_container_keeps_its_writable_layer(dnode, images,
                                                               tmp_path) -> None:
    """As dockerd: `docker start`/`restart` run the same container again, so what it wrote,
    what `docker cp` put in, and `docker update`'s limits are all still there."""
    dnode.docker("run", "-d", "--name", "keep", images["busybox"], "sh", "-c",
                 "echo run >> /runs; sleep 600")
    try:
        (tmp_path / "copied").write_text("from the host\n")
        dnode.docker("cp", str(tmp_path / "copied"), "keep:/copied")
        dnode.docker("update", "--memory", "80m", "--memory-swap", "160m", "keep")
        dnode.docker("stop", "-t", "0", "keep")
        dnode.docker("start", "keep")
        assert dnode.out("exec", "keep", "cat", "/runs", "/copied") == \
            "run\nrun\nfrom the host"
        limit = "/sys/fs/cgroup/memory/memory.limit_in_bytes"
        assert dnode.out("exec", "keep", "cat", limit) == str(80 << 20)
        dnode.docker("restart", "-t", "0", "keep")
        assert dnode.out("exec", "keep", "cat", "/runs").split() == ["run"] * 3
        assert state(dnode, "keep")["Status"] == "running"
    finally:
        dnode.docker("rm", "-f", "keep")
