"""`docker update`: new limits reach a running container's cgroup and are kept."""

from __future__ import annotations

import json

from support.docker import docker_node_fixture
from support.shoal import images_fixture  # noqa: F401

dnode = docker_node_fixture("update")

MEMORY = "/sys/fs/cgroup/memory/memory.limit_in_bytes"
QUOTA = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"


def test_update_running_container(dnode, images) -> None:
    dnode.docker("run", "-d", "--name", "limited", "--memory", "64m", images["busybox"],
                 "sleep", "600")
    try:
        assert dnode.out("exec", "limited", "cat", MEMORY) == str(64 << 20)
        dnode.docker("update", "--memory", "96m", "--memory-swap", "200m", "--cpus", "0.5",
                     "limited")
        assert dnode.out("exec", "limited", "cat", MEMORY) == str(96 << 20)
        assert dnode.out("exec", "limited", "cat", QUOTA) == "50000"
        hc = json.loads(dnode.out("inspect", "limited"))[0]["HostConfig"]
        assert hc["Memory"] == 96 << 20 and hc["NanoCpus"] == 500_000_000, hc
        bad = dnode.docker("update", "--pids-limit", "10", "limited", check=False)
        assert bad.returncode != 0 and b"PidsLimit" in bad.stderr, bad
        nosuch = dnode.docker("update", "--memory", "96m", "nosuch", check=False)
        assert b"No such container: nosuch" in nosuch.stderr, nosuch
    finally:
        dnode.docker("rm", "-f", "limited")
