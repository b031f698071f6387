"""OCI spec generation from image config + CRI config, and that runc accepts it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2 as cri
from shoal_common.errors import Invalid
from shoal_executor.domain.cgroups import HostCgroups, page_size_name
from shoal_executor.domain.rootfs_users import resolve_in_root, resolve_user
from shoal_executor.domain.spec import (
    DEFAULT_CAPS,
    ContainerContext,
    PodContext,
    build_spec,
    own_oom_score_adj,
    parse_signal,
    stop_signal,
)
from support.images import busybox_layer


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rootfs")
    with tarfile.open(fileobj=io.BytesIO(busybox_layer().tar)) as tar:
        tar.extractall(root, filter="fully_trusted")  # our own test layer
    (root / "etc" / "group").write_text(
        (root / "etc" / "group").read_text() + "video:x:44:app\n")
    return root


def container(rootfs: Path, image_config: dict | None = None, **kw) -> ContainerContext:
    cfg = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"), **kw)
    return ContainerContext("cid", cfg, image_config or {"config": {}}, str(rootfs),
                            "/shoal-test/cid")


def pod(**kw) -> PodContext:
    return PodContext("sid", cri.PodSandboxConfig(hostname="podhost", **kw),
                      netns_path="/var/run/netns/x")


def test_command_and_args_follow_kubelet_rules(rootfs: Path) -> None:
    image = {"config": {"Entrypoint": ["/ep"], "Cmd": ["c1", "c2"]}}
    spec = build_spec(pod(), container(rootfs, image))
    assert spec["process"]["args"] == ["/ep", "c1", "c2"]
    spec = build_spec(pod(), container(rootfs, image, args=["a1"]))
    assert spec["process"]["args"] == ["/ep", "a1"]
    spec = build_spec(pod(), container(rootfs, image, command=["/cmd"]))
    assert spec["process"]["args"] == ["/cmd"]
    spec = build_spec(pod(), container(rootfs, image, command=["/cmd"], args=["x"]))
    assert spec["process"]["args"] == ["/cmd", "x"]
    with pytest.raises(Invalid, match="no command"):
        build_spec(pod(), container(rootfs, {"config": {}}))


def test_env_workdir_hostname(rootfs: Path) -> None:
    image = {"config": {"Cmd": ["sh"], "Env": ["PATH=/bin", "A=image", "B=keep"],
                        "WorkingDir": "/img"}}
    spec = build_spec(pod(), container(rootfs, image, envs=[cri.KeyValue(key="A", value="cri")]))
    env = spec["process"]["env"]
    assert "A=cri" in env and "B=keep" in env and "PATH=/bin" in env
    assert "A=image" not in env and "HOSTNAME=podhost" in env and "HOME=/root" in env
    assert spec["process"]["cwd"] == "/img"
    spec = build_spec(pod(), container(rootfs, image, working_dir="/w"))
    assert spec["process"]["cwd"] == "/w" and spec["hostname"] == "podhost"


def test_users(rootfs: Path) -> None:
    assert resolve_user(str(rootfs), "app").uid == 1000
    user = resolve_user(str(rootfs), "app")
    assert (user.uid, user.gid, user.home) == (1000, 1000, "/home/app")
    assert 44 in user.additional_gids and 100 in user.additional_gids
    assert resolve_user(str(rootfs), "1000:44").gid == 44
    assert resolve_user(str(rootfs), "4242").uid == 4242  # numeric users need no entry
    with pytest.raises(Invalid, match="not found"):
        resolve_user(str(rootfs), "nosuchuser")
    sec = cri.LinuxContainerSecurityContext(run_as_username="app", supplemental_groups=[7])
    spec = build_spec(pod(), container(rootfs, {"config": {"Cmd": ["sh"]}},
                                       linux=cri.LinuxContainerConfig(security_context=sec)))
    assert spec["process"]["user"]["uid"] == 1000 and 7 in spec["process"]["user"][
        "additionalGids"]
    sec = cri.LinuxContainerSecurityContext(run_as_user=cri.Int64Value(value=0),
                                            run_as_group=cri.Int64Value(value=5))
    spec = build_spec(pod(), container(rootfs, {"config": {"Cmd": ["sh"], "User": "app"}},
                                       linux=cri.LinuxContainerConfig(security_context=sec)))
    assert spec["process"]["user"]["uid"] == 0 and spec["process"]["user"]["gid"] == 5


def test_passwd_symlink_cannot_escape_the_rootfs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.write_text("evil:x:666:666::/:/bin/sh\n")
    os.symlink(str(outside), root / "etc" / "passwd")
    assert resolve_in_root(str(root), "/etc/passwd") == str(root / outside.relative_to("/"))
    with pytest.raises(Invalid):
        resolve_user(str(root), "evil")


def test_security_context(rootfs: Path) -> None:
    sec = cri.LinuxContainerSecurityContext(
        capabilities=cri.Capability(add_capabilities=["NET_ADMIN"],
                                    drop_capabilities=["CAP_CHOWN"]),
        readonly_rootfs=True, no_new_privs=True,
        seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfile.RuntimeDefault))
    spec = build_spec(pod(), container(rootfs, {"config": {"Cmd": ["sh"]}},
                                       linux=cri.LinuxContainerConfig(security_context=sec)))
    caps = spec["process"]["capabilities"]["bounding"]
    assert "CAP_NET_ADMIN" in caps and "CAP_CHOWN" not in caps
    assert spec["root"]["readonly"] and spec["process"]["noNewPrivileges"]
    assert spec["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ALLOW"
    assert "/proc/kcore" in spec["linux"]["maskedPaths"]
    priv = cri.LinuxContainerSecurityContext(privileged=True)
    spec = build_spec(pod(), container(rootfs, {"config": {"Cmd": ["sh"]}},
                                       linux=cri.LinuxContainerConfig(security_context=priv)))
    assert "CAP_SYS_ADMIN" in spec["process"]["capabilities"]["bounding"]
    assert "maskedPaths" not in spec["linux"] and "seccomp" not in spec["linux"]
    bad = cri.LinuxContainerSecurityContext(
        capabilities=cri.Capability(add_capabilities=["CAP_FLY"]))
    with pytest.raises(Invalid, match="CAP_FLY"):
        build_spec(pod(), container(rootfs, {"config": {"Cmd": ["sh"]}},
                                    linux=cri.LinuxContainerConfig(security_context=bad)))
    default = build_spec(pod(), container(rootfs, {"config": {"Cmd": ["sh"]}}))
    assert sorted(default["process"]["capabilities"]["bounding"]) == sorted(DEFAULT_CAPS)


def test_resources_mounts_namespaces(rootfs: Path, tmp_path: Path) -> None:
    res = cri.LinuxContainerResources(cpu_shares=512, cpu_quota=50000, cpu_period=100000,
                                      memory_limit_in_bytes=64 << 20, oom_score_adj=500,
                                      cpuset_cpus="0")
    mounts = [cri.Mount(container_path="/data", host_path=str(tmp_path), readonly=True,
                        propagation=cri.PROPAGATION_HOST_TO_CONTAINER)]
    sec = cri.LinuxContainerSecurityContext(namespace_options=cri.NamespaceOption(pid=cri.POD))
    p = pod()
    p.pid_ns_path = "/proc/1234/ns/pid"
    spec = build_spec(p, container(rootfs, {"config": {"Cmd": ["sh"]}}, mounts=mounts,
                                   linux=cri.LinuxContainerConfig(resources=res,
                                                                  security_context=sec)))
    r = spec["linux"]["resources"]
    assert r["cpu"] == {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0"}
    assert r["memory"]["limit"] == 64 << 20 and spec["process"]["oomScoreAdj"] == 500
    data = next(m for m in spec["mounts"] if m["destination"] == "/data")
    assert data["options"] == ["rbind", "rslave", "ro"]
    assert spec["linux"]["rootfsPropagation"] == "rslave"
    ns = {n["type"]: n.get("path") for n in spec["linux"]["namespaces"]}
    assert ns["network"] == "/var/run/netns/x" and ns["pid"] == "/proc/1234/ns/pid"
    with pytest.raises(Invalid, match="does not exist"):
        build_spec(pod(), container(rootfs, {"config": {"Cmd": ["sh"]}}, mounts=[
            cri.Mount(container_path="/x", host_path=str(tmp_path / "absent"))]))


def test_stop_signal() -> None:
    assert parse_signal("SIGQUIT") == 3 and parse_signal("quit") == 3 and parse_signal("9") == 9
    cfg = cri.ContainerConfig()
    assert stop_signal(cfg, {"config": {"StopSignal": "SIGUSR1"}}) == 10
    assert stop_signal(cfg, {"config": {}}) == 15
    with pytest.raises(Invalid):
        parse_signal("SIGNOPE")


def test_runc_runs_the_generated_spec(rootfs: Path, tmp_path: Path) -> None:
    """The spec is not just plausible JSON: real runc runs a container from it."""
    cid = f"shoal-spec-{uuid.uuid4().hex[:8]}"
    ctx = ContainerContext(cid, cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="c"), command=["sh", "-c", "id -u; echo $A"],
        envs=[cri.KeyValue(key="A", value="from-cri")],
        linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
            run_as_username="app",
            seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfile.RuntimeDefault)))),
        {"config": {}}, str(rootfs), f"/shoal-test/{cid}")
    spec = build_spec(PodContext("sid", cri.PodSandboxConfig(hostname="h")), ctx)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(spec))
    state = tmp_path / "runc-state"
    try:
        out = subprocess.run(["runc", "--root", str(state), "run", "--bundle", str(bundle),
                              cid], capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["runc", "--root", str(state), "delete", "--force", cid],
                       capture_output=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1000", "from-cri"]


def kubelet_resources(**kw) -> cri.LinuxContainerResources:
    """What kubelet really puts into every container: a hugepage limit (0) for every page
    size the kernel offers, whether or not the hugetlb controller is mounted."""
    sizes = sorted(page_size_name(int(name.removeprefix("hugepages-").removesuffix("kB")))
                   for name in os.listdir("/sys/kernel/mm/hugepages"))
    return cri.LinuxContainerResources(
        hugepage_limits=[cri.HugepageLimit(page_size=s, limit=0) for s in sizes], **kw)


def write_mountinfo(tmp: Path, *mounts: tuple[str, str, str]) -> str:
    lines = [f"{30 + i} 23 0:{30 + i} / {point} rw,relatime - {fstype} {fstype} {opts}"
             for i, (point, fstype, opts) in enumerate(mounts)]
    path = tmp / "mountinfo"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_host_cgroups_detects_v1_controllers_and_page_sizes(tmp_path: Path) -> None:
    pages = tmp_path / "hugepages"
    (pages / "hugepages-2048kB").mkdir(parents=True)
    (pages / "hugepages-1048576kB").mkdir()
    cg = tmp_path / "cg"
    info = write_mountinfo(tmp_path, (f"{cg}", "tmpfs", "rw,mode=755"),
                           (f"{cg}/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"),
                           (f"{cg}/memory", "cgroup", "rw,memory"),
                           (f"{cg}/systemd", "cgroup", "rw,name=systemd"),
                           (f"{cg}/unified", "cgroup2", "rw"))
    host = HostCgroups.detect(mountinfo=info, root=str(cg), hugepages=str(pages))
    assert not host.unified and host.version == 1
    assert host.controllers == {"cpu", "cpuacct", "memory"}
    assert host.hugepage_sizes == {"2MB", "1GB"}
    v2root = tmp_path / "v2"
    v2root.mkdir()
    (v2root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    info2 = write_mountinfo(tmp_path, (f"{v2root}", "cgroup2", "rw,nsdelegate"))
    host2 = HostCgroups.detect(mountinfo=info2, root=str(v2root), hugepages=str(pages))
    assert host2.unified and "hugetlb" in host2.controllers


def test_resources_the_host_cannot_enforce_are_dropped_or_refused(rootfs: Path) -> None:
    v1_no_hugetlb = HostCgroups(False, frozenset({"cpu", "cpuset", "memory", "pids"}),
                                frozenset({"2MB", "1GB"}), swap_accounting=False)
    res = cri.LinuxContainerResources(
        cpu_shares=2, memory_limit_in_bytes=64 << 20, memory_swap_limit_in_bytes=128 << 20,
        hugepage_limits=[cri.HugepageLimit(page_size="2MB", limit=0),
                         cri.HugepageLimit(page_size="1GB", limit=0)],
        unified={"memory.high": "max"})
    ctr = container(rootfs, {"config": {"Cmd": ["sh"]}},
                    linux=cri.LinuxContainerConfig(resources=res))
    r = build_spec(pod(), ctr, v1_no_hugetlb)["linux"]["resources"]
    assert "hugepageLimits" not in r and "unified" not in r
    assert r["cpu"] == {"shares": 2} and r["memory"] == {"limit": 64 << 20}

    v2 = HostCgroups(True, frozenset({"cpu", "memory", "hugetlb"}), frozenset({"2MB"}), True)
    res2 = cri.LinuxContainerResources(
        hugepage_limits=[cri.HugepageLimit(page_size="2MB", limit=4 << 20)],
        unified={"memory.high": "max", "io.max": "8:0 rbps=1"})
    r2 = build_spec(pod(), container(rootfs, {"config": {"Cmd": ["sh"]}},
                                     linux=cri.LinuxContainerConfig(resources=res2)),
                    v2)["linux"]["resources"]
    assert r2["hugepageLimits"] == [{"pageSize": "2MB", "limit": 4 << 20}]
    assert r2["unified"] == {"memory.high": "max"}  # io is not enabled on that host

    for bad, match in ((cri.LinuxContainerResources(hugepage_limits=[
            cri.HugepageLimit(page_size="3MB", limit=0)]), "page size '3MB'"),
            (cri.LinuxContainerResources(unified={"../../x": "1"}), "not a cgroup v2")):
        with pytest.raises(Invalid, match=match):
            build_spec(pod(), container(rootfs, {"config": {"Cmd": ["sh"]}},
                                        linux=cri.LinuxContainerConfig(resources=bad)), v2)


@pytest.mark.parametrize("qos", ["best-effort", "burstable", "guaranteed"])
def test_runc_runs_a_container_with_what_kubelet_sends(rootfs: Path, tmp_path: Path,
                                                       qos: str) -> None:
    """The resources of kubelet's three QoS classes, with hugepage limits for every page
    size of this kernel, run under real runc on this host (which has no hugetlb cgroup)."""
    kinds = {"best-effort": dict(cpu_shares=2, oom_score_adj=1000),
             "burstable": dict(cpu_shares=102, cpu_period=100000, cpu_quota=50000,
                               memory_limit_in_bytes=64 << 20, oom_score_adj=968),
             "guaranteed": dict(cpu_shares=512, cpu_period=100000, cpu_quota=50000,
                                memory_limit_in_bytes=64 << 20, oom_score_adj=-997,
                                unified={"memory.oom.group": "1"})}
    cid = f"shoal-kres-{uuid.uuid4().hex[:8]}"
    ctx = ContainerContext(cid, cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="c"),
        command=["sh", "-c", "cat /proc/self/oom_score_adj"],
        linux=cri.LinuxContainerConfig(resources=kubelet_resources(**kinds[qos]))),
        {"config": {}}, str(rootfs), f"/shoal-test/{cid}")
    spec = build_spec(PodContext("sid", cri.PodSandboxConfig(hostname="h")), ctx)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(spec))
    state = tmp_path / "runc-state"
    try:
        out = subprocess.run(["runc", "--root", str(state), "run", "--bundle", str(bundle),
                              cid], capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["runc", "--root", str(state), "delete", "--force", cid],
                       capture_output=True)
    assert out.returncode == 0, out.stderr
    # A score below the runtime's own is raised to it (containerd's restrict_oom_score_adj).
    want = max(int(kinds[qos]["oom_score_adj"]), own_oom_score_adj())  # type: ignore[call-overload]
    assert out.stdout.split() == [str(want)]
