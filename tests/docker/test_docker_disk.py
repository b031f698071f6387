"""`docker system df` (and -v), `docker container prune` and `docker system prune` through
Debian's docker CLI and the docker SDK."""

from __future__ import annotations

import json
import subprocess
import time

from support.docker import docker_node_fixture
from support.shoal import images_fixture  # noqa: F401

dnode = docker_node_fixture("disk")

WRITTEN = 300_000  # bytes a container writes into its writable layer


def _gone(dnode, *names: str) -> None:
    for name in names:
        dnode.docker("rm", "-f", name, check=False)


def _status(dnode, method: str, path: str) -> int:
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method,
                          "--unix-socket", str(dnode.socket), f"http://docker/v1.41{path}"],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def test_system_df_counts_and_sizes(dnode, images) -> None:
    dnode.docker("volume", "create", "df-vol")
    dnode.docker("run", "-d", "--name", "df-live", "-v", "df-vol:/data", images["busybox"],
                 "sh", "-c", f"head -c {WRITTEN} /dev/zero > /big; "
                 f"head -c 5000 /dev/zero > /data/v; exec sleep 300")
    dnode.docker("run", "--name", "df-done", images["busybox"], "true")
    try:
        end = time.monotonic() + 20
        while True:
            df = dnode.sdk().df()
            rows = {c["Names"][0]: c for c in df["Containers"]}
            vols = {v["Name"]: v for v in df["Volumes"]}
            if rows["/df-live"]["SizeRw"] >= WRITTEN and \
                    vols["df-vol"]["UsageData"]["Size"] >= 5000:
                break
            assert time.monotonic() < end, df
            time.sleep(0.3)
        assert rows["/df-done"]["SizeRw"] < WRITTEN
        assert rows["/df-live"]["SizeRootFs"] > rows["/df-live"]["SizeRw"]
        assert vols["df-vol"]["UsageData"]["RefCount"] == 1
        image = next(i for i in df["Images"] if i["Id"] == rows["/df-live"]["ImageID"])
        assert image["Containers"] == 2 and image["SharedSize"] >= 0
        assert df["LayersSize"] >= image["Size"] > 0 and df["BuildCache"] == []
        summary = {r["Type"]: r for r in map(json.loads, dnode.out(
            "system", "df", "--format", "{{json .}}").splitlines())}
        assert summary["Containers"]["TotalCount"] == "2"
        assert summary["Containers"]["Active"] == "1"
        assert summary["Images"]["Active"] == "1"
        assert summary["Local Volumes"]["Active"] == "1"
        verbose = dnode.out("system", "df", "-v")
        for text in ("Images space usage", "Containers space usage", "df-live", "df-done",
                     "Local Volumes space usage", "df-vol", "Build cache usage"):
            assert text in verbose, verbose
    finally:
        _gone(dnode, "df-live", "df-done")
        dnode.docker("volume", "rm", "df-vol", check=False)


def test_container_prune_removes_stopped_ones_only(dnode, images) -> None:
    dnode.docker("run", "-d", "--name", "pr-live", images["busybox"], "sleep", "300")
    dnode.docker("run", "--name", "pr-done", "--label", "tier=a", images["busybox"], "true")
    dnode.docker("run", "--name", "pr-kept", "--label", "tier=b", images["busybox"], "true")
    dnode.docker("create", "--name", "pr-new", "--label", "tier=b", images["busybox"], "true")
    try:
        ids = {n: dnode.out("inspect", "-f", "{{.Id}}", n)
               for n in ("pr-live", "pr-done", "pr-kept", "pr-new")}
        # Created within the hour: `until=1h` keeps them all.
        assert "Total reclaimed space: 0B" in dnode.out("container", "prune", "-f", "--filter",
                                                        "until=1h")
        out = dnode.out("container", "prune", "-f", "--filter", "label=tier=a")
        assert ids["pr-done"] in out and ids["pr-kept"] not in out, out
        out = dnode.out("container", "prune", "-f")
        assert ids["pr-kept"] in out and ids["pr-new"] in out and ids["pr-live"] not in out
        assert dnode.out("ps", "-aq", "--no-trunc") == ids["pr-live"]
        result = dnode.sdk().containers.prune()
        assert result["ContainersDeleted"] is None and result["SpaceReclaimed"] == 0
        bad = dnode.docker("container", "prune", "-f", "--filter", "color=red", check=False)
        assert bad.returncode != 0 and b"invalid filter 'color'" in bad.stderr
    finally:
        _gone(dnode, "pr-live", "pr-done", "pr-kept", "pr-new")


def test_system_prune(dnode, images) -> None:
    missing = [p for p in ("/networks/prune", "/build/prune") if _status(dnode, "POST", p) == 501]
    assert not missing, f"docker system prune needs {', '.join(missing)}"
    dnode.docker("run", "-d", "--name", "sp-live", images["busybox"], "sleep", "300")
    dnode.docker("run", "--name", "sp-done", images["busybox"], "true")
    dnode.docker("volume", "create", "sp-vol")
    try:
        done = dnode.out("inspect", "-f", "{{.Id}}", "sp-done")
        out = dnode.out("system", "prune", "-f", "--volumes")
        assert done in out and "sp-vol" in out, out
        assert dnode.out("ps", "-a", "--format", "{{.Names}}") == "sp-live"
        assert dnode.docker("volume", "inspect", "sp-vol", check=False).returncode != 0
        # The running container's image stays, even with -a.
        dnode.out("system", "prune", "-a", "-f")
        assert dnode.out("images", "-q")
    finally:
        _gone(dnode, "sp-live", "sp-done")
        dnode.docker("volume", "rm", "sp-vol", check=False)
