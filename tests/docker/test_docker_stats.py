"""`docker top` and `docker stats` through Debian's docker CLI and the docker SDK: the
container's processes from host `ps`, usage from its cgroup, and Docker's errors."""

from __future__ import annotations

import re

import docker.errors
import pytest
from support.docker import docker_node_fixture
from support.shoal import images_fixture  # noqa: F401

dnode = docker_node_fixture("stats")


@pytest.fixture(scope="module")
def box(dnode, images):
    """A running container that sleeps, and one that keeps a CPU busy."""
    dnode.docker("run", "-d", "--name", "statbox", images["busybox"], "sleep", "600")
    dnode.docker("run", "-d", "--name", "statbusy", images["busybox"], "sh", "-c",
                 "while :; do :; done")
    yield "statbox"
    dnode.docker("rm", "-f", "statbox", "statbusy", check=False)


def test_top_lists_the_container_processes(dnode, box) -> None:
    lines = dnode.out("top", box).splitlines()
    assert lines[0].split()[:3] == ["UID", "PID", "PPID"], lines
    assert [row for row in lines[1:] if row.endswith("sleep 600")], lines
    assert len(lines) == 2, lines  # the host's processes are not in it
    custom = dnode.out("top", box, "-o", "pid,comm").splitlines()
    assert custom[0].split() == ["PID", "COMMAND"] and custom[1].split()[1] == "sleep", custom
    body = dnode.sdk().containers.get(box).top(ps_args="-o pid,args")
    assert body["Titles"] == ["PID", "COMMAND"], body
    assert body["Processes"][0][1] == "sleep 600", body


def test_top_refuses_bad_ps_args(dnode, box) -> None:
    shell = dnode.docker("top", box, "-ef;", "id", check=False)
    assert shell.returncode != 0 and b"invalid ps_args" in shell.stderr, shell
    bad = dnode.docker("top", box, "--no-such-option", check=False)
    assert bad.returncode != 0 and b"Error running ps" in bad.stderr, bad
    with pytest.raises(docker.errors.APIError) as err:
        dnode.sdk().containers.get(box).top(ps_args="-o pid=$(id)")
    assert err.value.status_code == 400


def _size(text: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)\s*([kKMGT]?i?B)", text.strip()).groups()
    scale = {"B": 1, "kB": 1e3, "KiB": 2**10, "MB": 1e6, "MiB": 2**20, "GB": 1e9,
             "GiB": 2**30, "TB": 1e12, "TiB": 2**40}[unit]
    return float(number) * scale


def test_stats_no_stream_row(dnode, box) -> None:
    table = dnode.out("stats", "--no-stream", box).splitlines()
    assert table[0].split()[:3] == ["CONTAINER", "ID", "NAME"], table
    assert box in table[1], table
    rows = dnode.out("stats", "--no-stream", "--format",
                     "{{.Name}}|{{.CPUPerc}}|{{.MemUsage}}|{{.NetIO}}|{{.PIDs}}",
                     box, "statbusy").splitlines()
    seen = {}
    for row in rows:
        name, cpu, mem, net, pids = row.split("|")
        usage, limit = mem.split(" / ")
        rx, tx = net.split(" / ")
        assert 0 < _size(usage) < _size(limit), row
        assert _size(rx) >= 0 and _size(tx) >= 0, row
        assert int(pids) >= 1, row
        seen[name] = float(cpu.rstrip("%"))
    assert set(seen) == {box, "statbusy"}, rows
    assert 0 <= seen[box] < 10, seen  # sleeping
    assert 20 < seen["statbusy"] <= 200, seen  # one busy CPU of at most two


def test_sdk_stats(dnode, box) -> None:
    ctr = dnode.sdk().containers.get(box)
    doc = ctr.stats(stream=False)
    assert doc["name"] == "/statbox" and doc["id"] == ctr.id
    cpu, pre = doc["cpu_stats"], doc["precpu_stats"]
    assert cpu["system_cpu_usage"] > pre["system_cpu_usage"] > 0, doc
    assert cpu["cpu_usage"]["total_usage"] >= pre["cpu_usage"]["total_usage"] > 0, doc
    assert cpu["online_cpus"] >= 1 and doc["preread"] < doc["read"], doc
    memory = doc["memory_stats"]
    assert 0 < memory["usage"] < memory["limit"] and "stats" in memory, memory
    assert doc["pids_stats"]["current"] == 1, doc
    assert "eth0" in doc.get("networks", {}) or doc.get("networks") is None, doc
    stream = ctr.stats(stream=True, decode=True)
    first, second = next(stream), next(stream)
    stream.close()
    assert second["precpu_stats"] == first["cpu_stats"], (first, second)
    assert second["preread"] == first["read"] < second["read"]
    one = ctr.stats(stream=False, one_shot=True)
    assert one["preread"].startswith("0001-01-01"), one


def test_stopped_and_missing_containers(dnode, images) -> None:
    cid = dnode.out("create", "--name", "statidle", images["busybox"], "true")
    try:
        for args in (("top", "statidle"), ("stats", "--no-stream", "statidle")):
            out = dnode.docker(*args, check=False)
            assert out.returncode != 0, out
            assert f"Container {cid} is not running".encode() in out.stderr, out
        with pytest.raises(docker.errors.APIError) as err:
            dnode.sdk().containers.get(cid).stats(stream=False)
        assert err.value.status_code == 409
        for args in (("top", "nosuch"), ("stats", "--no-stream", "nosuch")):
            out = dnode.docker(*args, check=False)
            assert out.returncode != 0 and b"No such container: nosuch" in out.stderr, out
        with pytest.raises(docker.errors.NotFound):
            dnode.sdk().api.top("nosuch")
    finally:
        dnode.docker("rm", "-f", "statidle", check=False)
