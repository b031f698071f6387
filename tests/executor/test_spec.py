"""OCI spec generation from image config + CRI config, and that runc accepts it."""

from __future__ import annotations

import json
import os
import platform
import stat
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from cri_api.v1 import api_pb2 as cri
from executor_support import write_mountinfo
from shoal_common.errors import Invalid
from shoal_common.rootfs_users import resolve_in_root, resolve_user
from shoal_executor.domain.cgroups import HostCgroups, page_size_name
from shoal_executor.domain.seccomp import DENIED
from shoal_executor.domain.spec import (
    DEFAULT_CAPS,
    GRANTABLE_CAPS,
    ContainerContext,
    PodContext,
    build_spec,
    own_oom_score_adj,
    parse_signal,
    stop_signal,
)


@pytest.fixture(scope="module")
def rootfs(rootfs: Path) -> Path:
    """The conftest's busybox, with the user `app` in a supplementary group."""
    (rootfs / "etc" / "group").write_text(
        (rootfs / "etc" / "group").read_text() + "video:x:44:app\n")
    return rootfs


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


def run_in_runc(spec: dict, tmp_path: Path, cid: str) -> subprocess.CompletedProcess[str]:
    """Runs `spec` to its end under real runc; asserts that it succeeded."""
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
    return out


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
    out = run_in_runc(build_spec(PodContext("sid", cri.PodSandboxConfig(hostname="h")), ctx),
                      tmp_path, cid)
    assert out.stdout.split() == ["1000", "from-cri"]


def kubelet_resources(**kw) -> cri.LinuxContainerResources:
    """What kubelet really puts into every container: a hugepage limit (0) for every page
    size the kernel offers, whether or not the hugetlb controller is mounted."""
    sizes = sorted(page_size_name(int(name.removeprefix("hugepages-").removesuffix("kB")))
                   for name in os.listdir("/sys/kernel/mm/hugepages"))
    return cri.LinuxContainerResources(
        hugepage_limits=[cri.HugepageLimit(page_size=s, limit=0) for s in sizes], **kw)


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
    out = run_in_runc(build_spec(PodContext("sid", cri.PodSandboxConfig(hostname="h")), ctx),
                      tmp_path, cid)
    # A score below the runtime's own is raised to it (containerd's restrict_oom_score_adj).
    want = max(int(kinds[qos]["oom_score_adj"]), own_oom_score_adj())  # type: ignore[call-overload]
    assert out.stdout.split() == [str(want)]


# --- Golden specs -------------------------------------------------------------------------
# build_spec's whole output for a wide set of inputs, pinned as the code produced it before
# it was split into section builders. BASE is the spec of the plainest container; a case
# lists only the flattened keys ("linux.namespaces[1].path") where its spec differs. Values
# that depend on the host (its bounding set, this process' OOM score, seccomp architectures)
# are computed; temporary paths read <rootfs> and <tmp>.

GONE = "<absent>"  # the case's spec has no such key
HOST_V2 = HostCgroups(True, frozenset({"cpu", "cpuset", "memory", "hugetlb", "pids"}),
                      frozenset({"2MB", "1GB"}), swap_accounting=True)
HOST_V1 = HostCgroups(False, frozenset({"cpu", "memory"}), frozenset({"2MB"}),
                      swap_accounting=False)
HOST_BARE = HostCgroups(False, frozenset({"pids"}), frozenset({"2MB"}), swap_accounting=True)
SECCOMP_DEFAULT = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]}.get(platform.machine(), []),
    "syscalls": [{"names": DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}
Case = tuple[PodContext, ContainerContext, HostCgroups]


def make_ctr(rootfs: Path, image: dict | None = None, *,
             sec: cri.LinuxContainerSecurityContext | None = None,
             res: cri.LinuxContainerResources | None = None, sandbox: bool = False,
             extra_env: tuple[str, ...] = (), **kw) -> ContainerContext:
    linux = {k: v for k, v in (("security_context", sec), ("resources", res)) if v is not None}
    if linux:
        kw["linux"] = cri.LinuxContainerConfig(**linux)
    out = container(rootfs, {"config": {"Cmd": ["sh"], **(image or {})}}, **kw)
    out.is_sandbox, out.extra_env = sandbox, list(extra_env)
    return out


def full_pod(tmp: Path, **kw) -> PodContext:
    """A pod that provides every namespace and file a container may join or bind."""
    out = pod(**kw)
    for name in ("hostname", "resolv_conf", "hosts", "shm"):
        setattr(out, f"{name}_path", str(tmp / name))
    out.pid_ns_path, out.ipc_ns_path, out.uts_ns_path = (f"/proc/9/ns/{k}" for k in
                                                         ("pid", "ipc", "uts"))
    return out


def node_pod(**modes: int) -> PodContext:
    opts = cri.NamespaceOption(**modes)
    config = cri.PodSandboxConfig(hostname="podhost", linux=cri.LinuxPodSandboxConfig(
        security_context=cri.LinuxSandboxSecurityContext(namespace_options=opts)))
    return PodContext.of("sid", config, netns_path="/var/run/netns/x",
                         ipc_ns_path="/proc/9/ns/ipc", uts_ns_path="/proc/9/ns/uts",
                         pid_ns_path="/proc/9/ns/pid")


def caps(add: list[str] | None = None, drop: list[str] | None = None,
         **kw) -> cri.LinuxContainerSecurityContext:
    return cri.LinuxContainerSecurityContext(capabilities=cri.Capability(
        add_capabilities=add or [], drop_capabilities=drop or []), **kw)


def profile(kind: int, ref: str = "") -> cri.LinuxContainerSecurityContext:
    return cri.LinuxContainerSecurityContext(
        seccomp=cri.SecurityProfile(profile_type=kind, localhost_ref=ref))


def process_cases(rootfs: Path, tmp: Path) -> dict[str, Case]:
    run_as = cri.LinuxContainerSecurityContext
    return {name: (p, c, HOST_V2) for name, p, c in [
        ("minimal", pod(), make_ctr(rootfs)),
        ("image-process", pod(), make_ctr(
            rootfs, {"Entrypoint": ["/ep"], "Cmd": ["c1"], "Env": ["A=1", "B=2"],
                     "WorkingDir": "/img", "User": "app"},
            envs=[cri.KeyValue(key="A", value="cri")], extra_env=("B=extra", "C=3"),
            tty=True, annotations={"team": "x"})),
        ("command-replaces-entrypoint-and-cmd", pod(), make_ctr(
            rootfs, {"Entrypoint": ["/ep"], "Cmd": ["c1"]}, command=["/cmd"])),
        ("args-replace-cmd", pod(), make_ctr(
            rootfs, {"Entrypoint": ["/ep"], "Cmd": ["c1"]}, args=["a1", "a2"])),
        ("command-and-args", pod(), make_ctr(rootfs, command=["/cmd"], args=["x"])),
        ("cri-env-and-workdir", pod(), make_ctr(rootfs, envs=[
            cri.KeyValue(key=k, value=v) for k, v in
            (("PATH", "/x"), ("HOSTNAME", "mine"), ("HOME", "/h"))], working_dir="/w")),
        ("run-as-user-and-group", pod(), make_ctr(rootfs, {"User": "app"}, sec=run_as(
            run_as_user=cri.Int64Value(value=1000), run_as_group=cri.Int64Value(value=5),
            supplemental_groups=[7, 5, 100]))),
        ("run-as-username", pod(), make_ctr(rootfs, sec=run_as(run_as_username="app",
                                                               supplemental_groups=[7]))),
        ("image-user-and-group-names", pod(), make_ctr(rootfs, {"User": "app:video"})),
        ("image-uid-and-gid", pod(), make_ctr(rootfs, {"User": "1000:44"})),
        ("image-uid-without-entry", pod(), make_ctr(rootfs, {"User": "4242"})),
        ("host-network", node_pod(network=cri.NODE), make_ctr(rootfs)),
        ("no-hostname", PodContext("sid", cri.PodSandboxConfig()), make_ctr(rootfs)),
    ]}


def security_cases(rootfs: Path, tmp: Path) -> dict[str, Case]:
    local = tmp / "profile.json"
    local.write_text('{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []}')
    sp = cri.SecurityProfile
    priv = cri.LinuxContainerSecurityContext(
        privileged=True, masked_paths=["/proc/m"], seccomp=sp(profile_type=sp.RuntimeDefault),
        capabilities=cri.Capability(drop_capabilities=["CAP_CHOWN"]))
    locked = cri.LinuxContainerSecurityContext(readonly_rootfs=True, no_new_privs=True,
                                               masked_paths=["/proc/m"],
                                               readonly_paths=["/proc/r"])
    legacy = {name: cri.LinuxContainerSecurityContext(seccomp_profile_path=path) for name, path in
              (("runtime", "runtime/default"), ("docker", "docker/default"),
               ("localhost", f"localhost/{local}"), ("unconfined", "unconfined"))}
    return {name: (pod(), make_ctr(rootfs, sec=sec), HOST_V2) for name, sec in [
        ("privileged", priv),
        ("readonly-rootfs-no-new-privs-paths", locked),
        ("caps-add-drop", caps(["NET_ADMIN", "cap_sys_time", "CAP_CHOWN"], ["CAP_CHOWN", "kill"])),
        ("caps-add-all-drop-one", caps(["ALL"], ["CAP_SYS_ADMIN"])),
        ("caps-drop-all-add-one", caps(["NET_BIND_SERVICE"], ["ALL"])),
        ("caps-add-all-drop-all", caps(["ALL"], ["ALL"])),
        ("caps-drop-all-skips-name-check", caps(["CAP_FLY"], ["ALL"])),
        ("seccomp-runtime-default", profile(sp.RuntimeDefault)),
        ("seccomp-unconfined", profile(sp.Unconfined)),
        ("seccomp-localhost", profile(sp.Localhost, str(local))),
        ("seccomp-profile-wins-over-legacy-path", cri.LinuxContainerSecurityContext(
            seccomp=sp(profile_type=sp.Unconfined), seccomp_profile_path="runtime/default")),
        *((f"seccomp-legacy-{name}", sec) for name, sec in legacy.items()),
    ]}


def mount_cases(rootfs: Path, tmp: Path) -> dict[str, Case]:
    def bind(dest: str, prop: int = cri.PROPAGATION_PRIVATE, ro: bool = False) -> cri.Mount:
        return cri.Mount(container_path=dest, host_path=str(tmp), propagation=prop,
                         readonly=ro)

    h2c, bidi = cri.PROPAGATION_HOST_TO_CONTAINER, cri.PROPAGATION_BIDIRECTIONAL
    every = [bind("/private", ro=True), bind("/slave", h2c), bind("/shared", bidi),
             bind("/slave-again", h2c), bind("/etc/hosts")]
    return {name: (p, c, HOST_V2) for name, p, c in [
        ("mounts-each-propagation", full_pod(tmp), make_ctr(rootfs, mounts=every)),
        ("mount-host-to-container", pod(), make_ctr(rootfs, mounts=[bind("/slave", h2c)])),
        ("pod-files-in-container", full_pod(tmp), make_ctr(rootfs)),
        ("pod-files-in-sandbox", full_pod(tmp), make_ctr(rootfs, sandbox=True)),
        ("user-dev-shm", pod(), make_ctr(rootfs, mounts=[bind("/dev/shm")])),
        ("user-dev-shm-and-pod-shm", full_pod(tmp), make_ctr(rootfs, mounts=[bind("/dev/shm")])),
    ]}


def namespace_cases(rootfs: Path, tmp: Path) -> dict[str, Case]:
    def pid(mode: int) -> cri.LinuxContainerSecurityContext:
        return cri.LinuxContainerSecurityContext(
            namespace_options=cri.NamespaceOption(pid=mode))

    return {name: (p, c, HOST_V2) for name, p, c in [
        ("ns-pid-pod", full_pod(tmp), make_ctr(rootfs, sec=pid(cri.POD))),
        ("ns-pid-container", full_pod(tmp), make_ctr(rootfs, sec=pid(cri.CONTAINER))),
        ("ns-pid-target", full_pod(tmp), make_ctr(rootfs, sec=pid(cri.TARGET))),
        ("ns-no-linux-config", full_pod(tmp), make_ctr(rootfs)),
        ("ns-empty-linux-config", full_pod(tmp),
         make_ctr(rootfs, linux=cri.LinuxContainerConfig())),
        ("ns-sandbox", full_pod(tmp), make_ctr(rootfs, sec=pid(cri.POD), sandbox=True)),
        ("ns-node", node_pod(network=cri.NODE, pid=cri.NODE, ipc=cri.NODE),
         make_ctr(rootfs, sec=pid(cri.POD))),
        ("ns-node-ipc-only", node_pod(ipc=cri.NODE), make_ctr(rootfs, sec=pid(cri.POD))),
    ]}


def resource_cases(rootfs: Path, tmp: Path) -> dict[str, Case]:
    block = tmp / "blk"
    os.mknod(block, 0o640 | stat.S_IFBLK, os.makedev(7, 3))
    os.chmod(block, 0o640)  # whatever the umask
    devices = [cri.Device(container_path="/dev/mynull", host_path="/dev/null",
                          permissions="rw"),
               cri.Device(host_path="/dev/zero"), cri.Device(host_path=str(block))]
    res = cri.LinuxContainerResources
    pages = [cri.HugepageLimit(page_size="2MB", limit=4 << 20)]
    everything = res(cpu_shares=512, cpu_quota=50000, cpu_period=100000, cpuset_cpus="0-1",
                     cpuset_mems="0", memory_limit_in_bytes=64 << 20, oom_score_adj=500,
                     hugepage_limits=[*pages, cri.HugepageLimit(page_size="1GB", limit=0)],
                     unified={"memory.high": "max", "pids.max": "9", "io.max": "8:0 rbps=1"})
    swap = res(memory_limit_in_bytes=64 << 20, memory_swap_limit_in_bytes=128 << 20)
    v1 = res(cpu_shares=2, cpuset_cpus="0", memory_limit_in_bytes=64 << 20,
             memory_swap_limit_in_bytes=128 << 20, hugepage_limits=pages,
             unified={"memory.high": "max"})
    sysctls = cri.LinuxPodSandboxConfig(sysctls={"net.core.somaxconn": "1024"})
    privileged = cri.LinuxContainerSecurityContext(privileged=True)
    return {name: (p, c, host) for name, p, c, host in [
        ("devices", pod(), make_ctr(rootfs, devices=devices), HOST_V2),
        ("privileged-devices", pod(), make_ctr(rootfs, devices=devices, sec=privileged),
         HOST_V2),
        ("resources-v2", pod(), make_ctr(rootfs, res=everything), HOST_V2),
        ("resources-explicit-swap", pod(), make_ctr(rootfs, res=swap), HOST_V2),
        ("resources-v1-trimmed", pod(), make_ctr(rootfs, res=v1), HOST_V1),
        ("resources-no-controllers", pod(), make_ctr(rootfs, res=v1), HOST_BARE),
        ("resources-swap-without-accounting", pod(), make_ctr(rootfs, res=swap), HOST_V1),
        ("resources-empty", pod(), make_ctr(rootfs, res=res()), HOST_V2),
        ("oom-score-below-own", pod(), make_ctr(rootfs, res=res(oom_score_adj=-999)), HOST_V2),
        ("sysctls-sandbox", pod(linux=sysctls), make_ctr(rootfs, sandbox=True), HOST_V2),
        ("sysctls-container", pod(linux=sysctls), make_ctr(rootfs), HOST_V2),
    ]}


def golden_cases(rootfs: Path, tmp: Path) -> dict[str, Case]:
    return {name: case for make in (process_cases, security_cases, mount_cases,
                                    namespace_cases, resource_cases)
            for name, case in make(rootfs, tmp).items()}


def flatten(value: Any, key: str = "") -> dict[str, Any]:
    """{"a": {"b": [{"c": 1}]}} -> {"a.b[0].c": 1}. Lists of scalars stay whole, and so do
    maps keyed by dotted names (annotations, sysctls, unified)."""
    if isinstance(value, dict) and value and not any("." in k for k in value):
        items = [(f"{key}.{k}" if key else k, v) for k, v in value.items()]
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    else:
        return {key: value}
    return {k: v for sub_key, sub in items for k, v in flatten(sub, sub_key).items()}


def with_changes(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    flat = flatten(base)
    for key, value in delta.items():
        flat = {k: v for k, v in flat.items()
                if k != key and not k.startswith((f"{key}.", f"{key}["))}
        if value != GONE:
            flat.update(flatten(value, key))
    return flat


def normalized(spec: dict[str, Any], rootfs: Path, tmp: Path) -> dict[str, Any]:
    text = json.dumps(spec).replace(str(rootfs), "<rootfs>").replace(str(tmp), "<tmp>")
    return json.loads(text)


PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BASE_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
             "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
             "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]


def cap_sets(names: list[str]) -> dict[str, list[str]]:
    return {k: names for k in ("bounding", "effective", "permitted")}


def bind(dest: str, source: str, *options: str) -> dict[str, Any]:
    return {"destination": dest, "type": "bind", "source": source,
            "options": ["rbind", *(options or ("rprivate", "rw"))]}


def pod_files(first: int) -> dict[str, Any]:
    """What full_pod adds to a container's spec, its mounts from mounts[first] on."""
    files = [bind("/etc/hostname", "<tmp>/hostname"),
             bind("/etc/resolv.conf", "<tmp>/resolv_conf"), bind("/etc/hosts", "<tmp>/hosts"),
             bind("/dev/shm", "<tmp>/shm")]
    return {**{f"mounts[{first + i}]": m for i, m in enumerate(files)},
            "linux.namespaces[2].path": "/proc/9/ns/ipc",
            "linux.namespaces[3].path": "/proc/9/ns/uts"}


def char_device(major: int, minor: int, access: str = "rwm") -> dict[str, Any]:
    return {"allow": True, "type": "c", "major": major, "access": access, "minor": minor}


SHM_TMPFS = {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}
BASE: dict[str, Any] = {
    "ociVersion": "1.0.2",
    "process": {
        "terminal": False, "user": {"uid": 0, "gid": 0, "additionalGids": [0]}, "args": ["sh"],
        "env": [PATH_ENV, "HOSTNAME=podhost", "HOME=/root"], "cwd": "/",
        "capabilities": cap_sets(BASE_CAPS), "noNewPrivileges": False,
    },
    "root": {"path": "<rootfs>", "readonly": False},
    "hostname": "podhost",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        SHM_TMPFS,
    ],
    "annotations": {"io.kubernetes.cri.container-type": "container",
                    "io.kubernetes.cri.sandbox-id": "sid"},
    "linux": {
        "namespaces": [{"type": "mount"}, {"type": "network", "path": "/var/run/netns/x"},
                       {"type": "ipc"}, {"type": "uts"}, {"type": "pid"}],
        "resources": {"devices": [
            {"allow": False, "access": "rwm"}, char_device(1, 3), char_device(1, 5),
            char_device(1, 7), char_device(1, 8), char_device(1, 9), char_device(5, 0),
            char_device(5, 1), char_device(5, 2),
            {"allow": True, "type": "c", "major": 136, "access": "rwm"}, char_device(10, 200),
        ]},
        "cgroupsPath": "/shoal-test/cid",
        "devices": [],
        "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                        "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                        "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                        "/sys/devices/virtual/powercap"],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                          "/proc/sysrq-trigger"],
    },
}
APP_USER = {"process.user.uid": 1000, "process.env": [PATH_ENV, "HOSTNAME=podhost",
                                                      "HOME=/home/app"]}
SANDBOX = {"annotations": {"io.kubernetes.cri.container-type": "sandbox",
                           "io.kubernetes.cri.sandbox-id": "sid"}}
PRIVILEGED = {"process.capabilities": cap_sets(GRANTABLE_CAPS),
              "mounts[4].options": ["nosuid", "noexec", "nodev", "rw"],
              "linux.maskedPaths": GONE, "linux.readonlyPaths": GONE,
              "linux.resources.devices": [{"allow": True, "access": "rwm"}]}
LOCAL_PROFILE = {"linux.seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []}}
DEVICES = [{"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3, "fileMode": 0o666,
            "uid": 0, "gid": 0},
           {"path": "/dev/zero", "type": "c", "major": 1, "minor": 5, "fileMode": 0o666,
            "uid": 0, "gid": 0},
           {"path": "<tmp>/blk", "type": "b", "major": 7, "minor": 3, "fileMode": 0o640,
            "uid": 0, "gid": 0}]
GOLDEN: dict[str, dict[str, Any]] = {
    "minimal": {},
    "image-process": {
        "process.terminal": True, **APP_USER, "process.user.gid": 1000,
        "process.user.additionalGids": [1000, 44, 100], "process.args": ["/ep", "c1"],
        "process.env": [PATH_ENV, "A=cri", "B=extra", "C=3", "HOSTNAME=podhost",
                        "HOME=/home/app"],
        "process.cwd": "/img",
        "annotations": {"team": "x", "io.kubernetes.cri.container-type": "container",
                        "io.kubernetes.cri.sandbox-id": "sid"},
    },
    "command-replaces-entrypoint-and-cmd": {"process.args": ["/cmd"]},
    "args-replace-cmd": {"process.args": ["/ep", "a1", "a2"]},
    "command-and-args": {"process.args": ["/cmd", "x"]},
    "cri-env-and-workdir": {"process.env": ["PATH=/x", "HOSTNAME=mine", "HOME=/h"],
                            "process.cwd": "/w"},
    "run-as-user-and-group": {**APP_USER, "process.user.gid": 5,
                              "process.user.additionalGids": [5, 44, 100, 7]},
    "run-as-username": {**APP_USER, "process.user.gid": 1000,
                        "process.user.additionalGids": [1000, 44, 100, 7]},
    "image-user-and-group-names": {**APP_USER, "process.user.gid": 44,
                                   "process.user.additionalGids": [44, 100]},
    "image-uid-and-gid": {**APP_USER, "process.user.gid": 44,
                          "process.user.additionalGids": [44, 100]},
    "image-uid-without-entry": {"process.user.uid": 4242,
                                "process.env": [PATH_ENV, "HOSTNAME=podhost", "HOME=/"]},
    "host-network": {"hostname": "", "linux.namespaces": [
        {"type": "mount"}, {"type": "ipc", "path": "/proc/9/ns/ipc"}, {"type": "pid"}]},
    "no-hostname": {"process.env": [PATH_ENV, "HOME=/root"], "hostname": "",
                    "linux.namespaces[1].path": GONE},
    "privileged": PRIVILEGED,
    "readonly-rootfs-no-new-privs-paths": {
        "process.noNewPrivileges": True, "root.readonly": True,
        "linux.maskedPaths": ["/proc/m"], "linux.readonlyPaths": ["/proc/r"]},
    "caps-add-drop": {"process.capabilities": cap_sets(
        [c for c in BASE_CAPS if c not in ("CAP_CHOWN", "CAP_KILL")]
        + ["CAP_NET_ADMIN", "CAP_SYS_TIME"])},
    "caps-add-all-drop-one": {"process.capabilities": cap_sets(
        [c for c in GRANTABLE_CAPS if c != "CAP_SYS_ADMIN"])},
    "caps-drop-all-add-one": {"process.capabilities": cap_sets(["CAP_NET_BIND_SERVICE"])},
    "caps-add-all-drop-all": {"process.capabilities": cap_sets([])},
    "caps-drop-all-skips-name-check": {"process.capabilities": cap_sets(["CAP_FLY"])},
    "seccomp-runtime-default": {"linux.seccomp": SECCOMP_DEFAULT},
    "seccomp-unconfined": {},
    "seccomp-localhost": LOCAL_PROFILE,
    "seccomp-profile-wins-over-legacy-path": {},
    "seccomp-legacy-runtime": {"linux.seccomp": SECCOMP_DEFAULT},
    "seccomp-legacy-docker": {"linux.seccomp": SECCOMP_DEFAULT},
    "seccomp-legacy-localhost": LOCAL_PROFILE,
    "seccomp-legacy-unconfined": {},
    "mounts-each-propagation": {
        "mounts[6]": bind("/private", "<tmp>", "rprivate", "ro"),
        "mounts[7]": bind("/slave", "<tmp>", "rslave", "rw"),
        "mounts[8]": bind("/shared", "<tmp>", "rshared", "rw"),
        "mounts[9]": bind("/slave-again", "<tmp>", "rslave", "rw"),
        "mounts[10]": bind("/etc/hosts", "<tmp>"),
        "mounts[11]": bind("/etc/hostname", "<tmp>/hostname"),
        "mounts[12]": bind("/etc/resolv.conf", "<tmp>/resolv_conf"),
        "mounts[13]": bind("/dev/shm", "<tmp>/shm"),
        "linux.namespaces[2].path": "/proc/9/ns/ipc",
        "linux.namespaces[3].path": "/proc/9/ns/uts",
        "linux.rootfsPropagation": "rshared",
    },
    "mount-host-to-container": {"mounts[6]": bind("/slave", "<tmp>", "rslave", "rw"),
                                "mounts[7]": SHM_TMPFS, "linux.rootfsPropagation": "rslave"},
    "pod-files-in-container": pod_files(6),
    "pod-files-in-sandbox": SANDBOX,
    "user-dev-shm": {"mounts[6]": bind("/dev/shm", "<tmp>")},
    "user-dev-shm-and-pod-shm": {"mounts[6]": bind("/dev/shm", "<tmp>"), **pod_files(7)},
    "ns-pid-pod": {**pod_files(6), "linux.namespaces[4].path": "/proc/9/ns/pid"},
    "ns-pid-container": pod_files(6),
    "ns-pid-target": pod_files(6),
    "ns-no-linux-config": pod_files(6),
    # The zero value of NamespaceOption.pid is POD: an empty linux config joins the pod's.
    "ns-empty-linux-config": {**pod_files(6), "linux.namespaces[4].path": "/proc/9/ns/pid"},
    "ns-sandbox": SANDBOX,
    "ns-node": {"hostname": "", "linux.namespaces": [{"type": "mount"}]},
    "ns-node-ipc-only": {"linux.namespaces": [
        {"type": "mount"}, {"type": "network", "path": "/var/run/netns/x"},
        {"type": "uts", "path": "/proc/9/ns/uts"}, {"type": "pid", "path": "/proc/9/ns/pid"}]},
    "devices": {
        "linux.resources.devices[11]": char_device(1, 3, "rw"),
        "linux.resources.devices[12]": char_device(1, 5),
        "linux.resources.devices[13]": {**char_device(7, 3), "type": "b"},
        "linux.devices": DEVICES,
    },
    "privileged-devices": {**PRIVILEGED, "linux.devices": DEVICES},
    "resources-v2": {
        "process.oomScoreAdj": 500,
        "linux.resources.cpu": {"shares": 512, "quota": 50000, "period": 100000,
                                "cpus": "0-1", "mems": "0"},
        "linux.resources.memory": {"limit": 64 << 20, "swap": 64 << 20},
        "linux.resources.hugepageLimits": [{"pageSize": "2MB", "limit": 4 << 20},
                                           {"pageSize": "1GB", "limit": 0}],
        "linux.resources.unified": {"memory.high": "max", "pids.max": "9"},
    },
    "resources-explicit-swap": {"linux.resources.memory": {"limit": 64 << 20,
                                                           "swap": 128 << 20}},
    "resources-v1-trimmed": {"linux.resources.cpu": {"shares": 2},
                             "linux.resources.memory": {"limit": 64 << 20}},
    "resources-no-controllers": {},
    "resources-swap-without-accounting": {"linux.resources.memory": {"limit": 64 << 20}},
    "resources-empty": {},
    "oom-score-below-own": {"process.oomScoreAdj": max(-999, own_oom_score_adj())},
    "sysctls-sandbox": {**SANDBOX, "linux.sysctl": {"net.core.somaxconn": "1024"}},
    "sysctls-container": {},
}


@pytest.mark.usefixtures("root")  # mknod of a block device
@pytest.mark.parametrize("name", GOLDEN)
def test_golden_spec(rootfs: Path, tmp_path: Path, name: str) -> None:
    cases = golden_cases(rootfs, tmp_path)
    assert cases.keys() == GOLDEN.keys()
    spec = normalized(build_spec(*cases[name]), rootfs, tmp_path)
    assert flatten(spec) == with_changes(BASE, GOLDEN[name])


def refused_cases(rootfs: Path, tmp: Path) -> dict[str, Case]:
    """Inputs build_spec refuses; REFUSALS has the message of each."""
    (tmp / "file").write_text("")
    (tmp / "nodefault.json").write_text('{"syscalls": []}')
    (tmp / "bad.json").write_text("{")
    res, sp = cri.LinuxContainerResources, cri.SecurityProfile

    def local(name: str) -> cri.LinuxContainerSecurityContext:
        return profile(sp.Localhost, name if name.endswith("p.json") else str(tmp / name))

    return {name: (pod(), c, HOST_V2) for name, c in [
        ("no-command", container(rootfs)),
        ("unknown-caps", make_ctr(rootfs, sec=caps(["CAP_FLY"], ["swim"]))),
        ("unknown-user", make_ctr(rootfs, {"User": "nobody-here"})),
        ("unknown-group", make_ctr(rootfs, {"User": "app:nogroup"})),
        ("relative-mount", make_ctr(rootfs, mounts=[cri.Mount(container_path="data",
                                                              host_path=str(tmp))])),
        ("mount-without-source", make_ctr(rootfs, mounts=[cri.Mount(container_path="/d")])),
        ("missing-mount-source", make_ctr(rootfs, mounts=[
            cri.Mount(container_path="/d", host_path=str(tmp / "absent"))])),
        ("missing-device", make_ctr(rootfs, devices=[cri.Device(host_path=str(tmp / "no"))])),
        ("not-a-device", make_ctr(rootfs, devices=[cri.Device(host_path=str(tmp / "file"))])),
        ("relative-seccomp-profile", make_ctr(rootfs, sec=local("p.json"))),
        ("relative-legacy-profile", make_ctr(rootfs, sec=cri.LinuxContainerSecurityContext(
            seccomp_profile_path="localhost/p.json"))),
        ("missing-seccomp-profile", make_ctr(rootfs, sec=local("none.json"))),
        ("malformed-seccomp-profile", make_ctr(rootfs, sec=local("bad.json"))),
        ("seccomp-profile-without-default", make_ctr(rootfs, sec=local("nodefault.json"))),
        ("unknown-page-size", make_ctr(rootfs, res=res(hugepage_limits=[
            cri.HugepageLimit(page_size="3MB")]))),
        ("bad-unified-key", make_ctr(rootfs, res=res(unified={"../x": "1"}))),
    ]}


REFUSALS = {
    "no-command": "container 'c': no command specified (neither the CRI config nor the image "
                  "has one)",
    "unknown-caps": "unknown capabilities: CAP_FLY, CAP_SWIM",
    "unknown-user": "user 'nobody-here' not found in the image's /etc/passwd",
    "unknown-group": "group 'nogroup' not found in the image's /etc/group",
    "relative-mount": "mount container_path 'data' must be absolute",
    "mount-without-source": "mount for /d has no host_path",
    "missing-mount-source": "mount source <tmp>/absent does not exist",
    "missing-device": "device <tmp>/no: No such file or directory",
    "not-a-device": "device <tmp>/file is not a character or block device",
    "relative-seccomp-profile": "seccomp localhost profile 'p.json' must be an absolute path",
    "relative-legacy-profile": "seccomp localhost profile 'p.json' must be an absolute path",
    "missing-seccomp-profile": "seccomp profile <tmp>/none.json: [Errno 2] No such file or "
                               "directory: '<tmp>/none.json'",
    "malformed-seccomp-profile": "seccomp profile <tmp>/bad.json: Expecting property name "
                                 "enclosed in double quotes: line 1 column 2 (char 1)",
    "seccomp-profile-without-default": "seccomp profile <tmp>/nodefault.json has no "
                                       "defaultAction",
    "unknown-page-size": "hugepage limit for page size '3MB': this host's kernel offers "
                         "['1GB', '2MB']",
    "bad-unified-key": "unified resource '../x' is not a cgroup v2 file name",
}


@pytest.mark.parametrize("name", REFUSALS)
def test_golden_refusals(rootfs: Path, tmp_path: Path, name: str) -> None:
    cases = refused_cases(rootfs, tmp_path)
    assert cases.keys() == REFUSALS.keys()
    with pytest.raises(Invalid) as err:
        build_spec(*cases[name])
    assert err.value.message.replace(str(tmp_path), "<tmp>") == REFUSALS[name]
