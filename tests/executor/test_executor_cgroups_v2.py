"""The executor's and the gateway's cgroup facts on v1 and v2 (fake hierarchies in the
kernel's documented formats), and the cgroup driver: the config setting, its refusal at
start where systemd is not PID 1, the cgroupsPath forms, and CRI RuntimeConfig's answer.

No v2 host and no systemd here: the v2 and systemd cases are verified only by these unit
tests; the refusal is verified for real (this host's PID 1 is not systemd)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from cri_api.v1 import api_pb2 as cri
from executor_support import write_mountinfo
from shoal_common.config import ConfigError, load_config
from shoal_common.errors import Invalid
from shoal_cri_gateway.domain import resources as gw_resources
from shoal_cri_gateway.grpc_api.runtime import RuntimeService
from shoal_executor.config import systemd_is_init
from shoal_executor.domain import cgroups
from shoal_executor.domain.cgroups import (
    HostCgroups,
    cgroup_dir,
    host_cgroups,
    systemd_cgroups_path,
    use_driver,
)
from shoal_executor.domain.spec import ContainerContext, PodContext, build_spec

POD_SLICE = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2_root(root: Path, *, swap: bool = True) -> Path:
    # The root has cgroup.controllers but never memory.swap.max (cgroup-v2.rst: the
    # memory interface files are "non-root" only); kubelet's tree offers fewer.
    write(root / "cgroup.controllers", "cpuset cpu io memory hugetlb pids rdma misc\n")
    write(root / "kubepods" / "cgroup.controllers", "cpuset cpu io memory hugetlb pids\n")
    write(root / "kubepods" / "burstable" / "cgroup.controllers", "cpu memory pids\n")
    if swap:
        write(root / "kubepods" / "memory.swap.max", "max\n")
    return root


# -- detection ------------------------------------------------------------------------------


def test_v2_detects_root_controllers_and_swap(tmp_path: Path) -> None:
    root = v2_root(tmp_path / "cg")
    info = write_mountinfo(tmp_path, (str(root), "cgroup2", "rw,nsdelegate,memory_recursiveprot"))
    host = HostCgroups.detect(mountinfo=info, root=str(root), hugepages=str(tmp_path / "no"))
    assert host.unified and host.version == 2 and host.root == str(root)
    assert host.controllers == {"cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma",
                                "misc"}
    assert host.swap_accounting
    root2 = v2_root(tmp_path / "cg2", swap=False)
    info2 = write_mountinfo(tmp_path, (str(root2), "cgroup2", "rw"))
    assert not HostCgroups.detect(mountinfo=info2, root=str(root2)).swap_accounting


def test_hybrid_and_stacked_mounts_decide_as_runc(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    write(root / "memory" / "memory.memsw.limit_in_bytes", "9223372036854771712\n")
    hybrid = write_mountinfo(tmp_path, (str(root), "tmpfs", "rw,mode=755"),
                             (f"{root}/memory", "cgroup", "rw,memory"),
                             (f"{root}/pids", "cgroup", "rw,pids"),
                             (f"{root}/unified", "cgroup2", "rw"))
    host = HostCgroups.detect(mountinfo=hybrid, root=str(root))
    assert not host.unified and host.controllers == {"memory", "pids"}
    assert host.swap_accounting  # v1: memory.memsw.*
    v2_root(root)
    stacked = write_mountinfo(tmp_path, (str(root), "tmpfs", "rw"), (str(root), "cgroup2", "rw"))
    assert HostCgroups.detect(mountinfo=stacked, root=str(root)).unified  # last mount wins


def test_this_host(tmp_path: Path) -> None:
    """The real /proc/self/mountinfo: this machine is v1 (hybrid), no v2 mounted at root."""
    host = HostCgroups.detect()
    text = Path("/proc/self/mountinfo").read_text()
    at_root = [ln.split(" - ")[1].split()[0] for ln in text.splitlines()
               if ln.split(" - ")[0].split()[4] == "/sys/fs/cgroup"]
    assert host.unified == (at_root[-1:] == ["cgroup2"])
    if not host.unified:
        assert "memory" in host.controllers


def test_parent_controllers_narrow_what_a_container_gets(tmp_path: Path) -> None:
    root = v2_root(tmp_path / "cg")
    host = HostCgroups(True, frozenset({"cpu", "memory", "hugetlb", "pids"}),
                       frozenset({"2MB"}), True, root=str(root))
    # The parent exists: its cgroup.controllers decides.
    assert host.below("/kubepods/burstable/c1").controllers == {"cpu", "memory", "pids"}
    # It does not exist yet: runc makes it with what the nearest ancestor offers.
    assert host.below("/kubepods/besteffort/pod9/c1").controllers == {
        "cpu", "memory", "hugetlb", "pids"}
    assert host.below("/nowhere/c1").controllers == host.controllers  # root's
    assert host.below("/../../etc/c1").controllers == host.controllers  # no escape
    v1 = HostCgroups(False, frozenset({"cpu"}), frozenset(), False, root=str(root))
    assert v1.below("/kubepods/burstable/c1") is v1
    by_hand = HostCgroups(True, frozenset({"hugetlb"}), frozenset(), False)
    assert by_hand.below("/kubepods/burstable/c1") is by_hand  # reads nothing


def spec(rootfs: Path, cgroups_path: str, host: HostCgroups,
         res: cri.LinuxContainerResources | None = None) -> dict[str, Any]:
    cfg = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"), command=["sh"],
                              linux=cri.LinuxContainerConfig(resources=res))
    ctr = ContainerContext("cid", cfg, {"config": {}}, str(rootfs), cgroups_path)
    return build_spec(PodContext("sid", cri.PodSandboxConfig(hostname="h")), ctr, host)


def test_spec_fits_resources_to_the_parent(rootfs: Path, tmp_path: Path) -> None:
    host = HostCgroups(True, frozenset({"cpu", "memory", "hugetlb", "pids"}),
                       frozenset({"2MB"}), True, root=str(v2_root(tmp_path / "cg")))
    res = cri.LinuxContainerResources(
        memory_limit_in_bytes=64 << 20,
        hugepage_limits=[cri.HugepageLimit(page_size="2MB", limit=0)])
    # kubepods/burstable offers no hugetlb: runc would refuse the container.
    r = spec(rootfs, "/kubepods/burstable/cid", host, res)["linux"]["resources"]
    assert "hugepageLimits" not in r
    assert r["memory"] == {"limit": 64 << 20, "swap": 64 << 20}  # swap.max = 0 on v2
    r2 = spec(rootfs, "/kubepods/cid", host, res)["linux"]["resources"]
    assert r2["hugepageLimits"] == [{"pageSize": "2MB", "limit": 0}]


# -- the cgroup driver ----------------------------------------------------------------------


def test_systemd_cgroups_path_form() -> None:
    assert systemd_cgroups_path(f"{POD_SLICE}/cid") == \
        "kubepods-burstable-pod1234.slice:cri-shoal:cid"
    assert systemd_cgroups_path("/kubepods.slice/cid") == "kubepods.slice:cri-shoal:cid"
    assert systemd_cgroups_path("/shoal/cid") == "shoal.slice:cri-shoal:cid"  # no parent given
    for bad in ("/kubepods/burstable/pod1/cid",  # cgroupfs form: kubelet's driver differs
                "/kubepods.slice/evil.slice/cid",  # not where systemd would put evil.slice
                "/.slice/cid"):
        with pytest.raises(Invalid, match="not a systemd slice"):
            systemd_cgroups_path(bad)
    systemd = HostCgroups(False, frozenset(), frozenset(), False, driver="systemd")
    assert cgroup_dir(f"{POD_SLICE}/cid", systemd) == f"{POD_SLICE}/cri-shoal-cid.scope"
    assert cgroup_dir("/shoal/cid", systemd) == "/shoal.slice/cri-shoal-cid.scope"
    cgroupfs = HostCgroups(False, frozenset(), frozenset(), False)
    assert cgroup_dir(f"{POD_SLICE}/cid", cgroupfs) == f"{POD_SLICE}/cid"


def test_spec_cgroups_path_follows_the_driver(rootfs: Path) -> None:
    cgroupfs = HostCgroups(False, frozenset({"memory"}), frozenset(), False)
    systemd = HostCgroups(False, frozenset({"memory"}), frozenset(), False, driver="systemd")
    assert spec(rootfs, f"{POD_SLICE}/cid", cgroupfs)["linux"]["cgroupsPath"] == \
        f"{POD_SLICE}/cid"
    assert spec(rootfs, f"{POD_SLICE}/cid", systemd)["linux"]["cgroupsPath"] == \
        "kubepods-burstable-pod1234.slice:cri-shoal:cid"
    with pytest.raises(Invalid, match="kubelet must use its systemd driver"):
        spec(rootfs, "/kubepods/burstable/pod1/cid", systemd)


def test_use_driver_sets_what_host_cgroups_reports() -> None:
    try:
        assert host_cgroups().driver == "cgroupfs"
        use_driver("systemd")
        assert host_cgroups().driver == "systemd"
        with pytest.raises(ValueError, match="not one of"):
            use_driver("openrc")
    finally:
        use_driver("cgroupfs")
    assert cgroups.host_cgroups().driver == "cgroupfs"


def test_config_refuses_systemd_without_systemd_as_pid1(tmp_path: Path) -> None:
    env = {"SHOAL_CONFIG": str(tmp_path / "none.toml")}
    write(tmp_path / "none.toml", "")
    assert load_config(env=env).services.executor.cgroup_driver == "cgroupfs"
    with pytest.raises(ConfigError, match="cgroup_driver: 'openrc' is not one of"):
        load_config(env=env, overrides=["services.executor.cgroup_driver=openrc"])
    if systemd_is_init():
        cfg = load_config(env=env, overrides=["services.executor.cgroup_driver=systemd"])
        assert cfg.services.executor.cgroup_driver == "systemd"
        return
    with pytest.raises(ConfigError, match="'systemd' needs systemd running as PID 1"):
        load_config(env=env, overrides=["services.executor.cgroup_driver=systemd"])
    assert not systemd_is_init(str(tmp_path / "absent"))
    (tmp_path / "run").mkdir()
    assert systemd_is_init(str(tmp_path / "run"))


@pytest.mark.skipif(systemd_is_init(), reason="systemd is PID 1: nothing to refuse")
def test_the_executor_refuses_to_start_with_systemd_here(tmp_path: Path) -> None:
    """The real service entry point, before it connects anywhere."""
    out = subprocess.run(
        [sys.executable, "-m", "shoal_executor", "--state-root", str(tmp_path / "s"),
         "--run-root", str(tmp_path / "r"), "--set", "services.executor.cgroup_driver=systemd"],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "SHOAL_CONFIG": "/dev/null"})
    assert out.returncode != 0
    assert "invalid configuration" in out.stderr and "PID 1" in out.stderr, out.stderr
    assert not (tmp_path / "s").exists()  # refused before anything was made


# -- the gateway -----------------------------------------------------------------------------


def test_gateway_swap_accounting_on_v1_and_v2(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    write(v1 / "memory" / "memory.memsw.limit_in_bytes", "9223372036854771712\n")
    assert gw_resources.swap_accounting(v1, unified=False)
    assert not gw_resources.swap_accounting(tmp_path / "none", unified=False)
    assert gw_resources.swap_accounting(v2_root(tmp_path / "v2"), unified=True)
    assert not gw_resources.swap_accounting(v2_root(tmp_path / "v2n", swap=False),
                                            unified=True)
    hybrid = write_mountinfo(tmp_path, ("/sys/fs/cgroup", "tmpfs", "rw"),
                             ("/sys/fs/cgroup/unified", "cgroup2", "rw"))
    assert not gw_resources.cgroup2_mounted(Path("/sys/fs/cgroup"), hybrid)
    unified = write_mountinfo(tmp_path, ("/sys/fs/cgroup", "cgroup2", "rw"))
    assert gw_resources.cgroup2_mounted(Path("/sys/fs/cgroup"), unified)


class _Context:
    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def send_initial_metadata(self, metadata: object) -> None:
        pass


async def runtime_config(config: Any) -> cri.RuntimeConfigResponse:
    service = RuntimeService(SimpleNamespace(bus=SimpleNamespace(config=config), pods=None,
                                             streams=None))  # type: ignore[arg-type]
    return await service.RuntimeConfig(cri.RuntimeConfigRequest(), _Context())


async def test_runtime_config_answers_the_driver_in_use(tmp_path: Path) -> None:
    write(tmp_path / "none.toml", "")
    cfg = load_config(env={"SHOAL_CONFIG": str(tmp_path / "none.toml")})
    assert (await runtime_config(cfg)).linux.cgroup_driver == cri.CGROUPFS
    # A config the executor accepted with systemd (on a systemd host; built here by hand).
    executor = msgspec.structs.replace(cfg.services.executor, cgroup_driver="systemd")
    cfg.services = msgspec.structs.replace(cfg.services, executor=executor)
    assert (await runtime_config(cfg)).linux.cgroup_driver == cri.SYSTEMD
    # The proposed shared [runtime] cgroup_driver wins once it exists.
    shared = SimpleNamespace(runtime=SimpleNamespace(cgroup_driver="cgroupfs"),
                             service=cfg.service)
    assert (await runtime_config(shared)).linux.cgroup_driver == cri.CGROUPFS
