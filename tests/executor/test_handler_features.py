"""User namespace, recursive read-only and supplemental group inputs: the checks (as
containerd's), what the OCI spec gets, and how handler features are found."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2 as cri
from shoal_common.errors import FailedPrecondition, Invalid
from shoal_executor.domain import features
from shoal_executor.domain.checks import check_container_config
from shoal_executor.domain.checks.userns import (
    IdMap,
    IdRange,
    check_container_userns,
    check_pod_userns,
    mount_id_maps,
)
from shoal_executor.domain.spec import ContainerContext, PodContext, build_spec

MAP = [cri.IDMapping(container_id=0, host_id=100000, length=65536)]
IDMAP = IdMap(IdRange(0, 100000, 65536), IdRange(0, 100000, 65536))


def userns_pod(**userns: object) -> cri.PodSandboxConfig:
    config = cri.PodSandboxConfig()
    config.linux.security_context.namespace_options.userns_options.CopyFrom(
        cri.UserNamespace(**userns))
    return config


def test_pod_user_namespace_modes() -> None:
    assert check_pod_userns(cri.PodSandboxConfig()) is None  # absent: the host's
    assert check_pod_userns(userns_pod(mode=cri.NODE)) is None
    idmap = check_pod_userns(userns_pod(mode=cri.POD, uids=MAP, gids=MAP))
    assert idmap == IDMAP and IdMap.from_json(idmap.to_json()) == idmap
    assert idmap.oci() == {"uidMappings": [{"containerID": 0, "hostID": 100000,
                                            "size": 65536}],
                           "gidMappings": [{"containerID": 0, "hostID": 100000,
                                            "size": 65536}]}
    assert idmap.proc_lines() == ("0 100000 65536\n",) * 2
    assert idmap.host_root() == (100000, 100000) and IdMap.from_json("") is None


@pytest.mark.parametrize(("config", "why"), [
    (userns_pod(mode=cri.POD, uids=MAP * 2, gids=MAP), "2 mappings"),
    (userns_pod(mode=cri.POD), "0 mappings"),
    (userns_pod(mode=cri.POD, uids=[cri.IDMapping(container_id=1, host_id=5, length=9)],
                gids=MAP), "container id 0 must be mapped"),
    (userns_pod(mode=cri.POD, uids=[cri.IDMapping(host_id=5)], gids=MAP), "at least one"),
    (userns_pod(mode=cri.POD, uids=[cri.IDMapping(host_id=2**32 - 2, length=9)], gids=MAP),
     "passes the last id"),
    (userns_pod(mode=cri.NODE, uids=MAP, gids=MAP), "takes no mappings"),
    (userns_pod(mode=cri.CONTAINER), "CONTAINER is not a user namespace mode"),
    (userns_pod(mode=cri.TARGET), "TARGET is not"),
    (userns_pod(mode=9), "9 is not"),
])
def test_bad_pod_user_namespaces(config: cri.PodSandboxConfig, why: str) -> None:
    with pytest.raises(Invalid, match=why):
        check_pod_userns(config)


@pytest.mark.parametrize("shared", ["network", "pid", "ipc"])
def test_pod_user_namespace_needs_pod_namespaces(shared: str) -> None:
    config = userns_pod(mode=cri.POD, uids=MAP, gids=MAP)
    setattr(config.linux.security_context.namespace_options, shared, cri.NODE)
    with pytest.raises(Invalid, match=f"host's {shared} namespace"):
        check_pod_userns(config)


def test_container_user_namespace_is_the_pod_s() -> None:
    ctr = cri.ContainerConfig()
    check_container_userns(ctr, IDMAP)  # none given: the pod's
    ctr.linux.security_context.namespace_options.userns_options.CopyFrom(
        cri.UserNamespace(mode=cri.POD, uids=MAP, gids=MAP))
    check_container_userns(ctr, IDMAP)
    with pytest.raises(Invalid, match="differs from the pod's"):
        check_container_userns(ctr, None)
    ctr.linux.security_context.namespace_options.userns_options.mode = cri.NODE
    with pytest.raises(Invalid, match="takes no mappings"):
        check_container_userns(ctr, IDMAP)


def test_mount_id_maps() -> None:
    ctr = cri.ContainerConfig(mounts=[
        cri.Mount(container_path="/a", host_path="/a"),
        cri.Mount(container_path="/b", host_path="/b", uidMappings=MAP, gidMappings=MAP)])
    assert mount_id_maps(ctr, IDMAP) == {1: IDMAP}
    with pytest.raises(Invalid, match=r"mounts\[1\]: uid/gid mappings need"):
        mount_id_maps(ctr, None)
    ctr.mounts[1].ClearField("gidMappings")
    with pytest.raises(Invalid, match=r"mounts\[1\].gidMappings: 0 mappings"):
        mount_id_maps(ctr, IDMAP)


@pytest.mark.parametrize(("mount", "why"), [
    (cri.Mount(container_path="/m", host_path="/m", recursive_read_only=True), "readonly"),
    (cri.Mount(container_path="/m", host_path="/m", recursive_read_only=True, readonly=True,
               propagation=cri.PROPAGATION_HOST_TO_CONTAINER),
     "propagation PROPAGATION_HOST_TO_CONTAINER"),
    (cri.Mount(container_path="/m", host_path="/m", recursive_read_only=True, readonly=True,
               propagation=cri.PROPAGATION_BIDIRECTIONAL), "PROPAGATION_BIDIRECTIONAL"),
])
def test_recursive_read_only_needs_read_only_and_private(mount: cri.Mount, why: str) -> None:
    with pytest.raises(Invalid, match=why):
        check_container_config(cri.ContainerConfig(mounts=[mount]))


def test_bad_supplemental_groups_policy() -> None:
    config = cri.ContainerConfig()
    config.linux.security_context.supplemental_groups_policy = 7
    with pytest.raises(Invalid, match="supplemental_groups_policy: 7 is not one of"):
        check_container_config(config)


def _spec(rootfs: Path, pod: PodContext, sources: dict[int, str] | None = None,
          **kw: object) -> dict:
    cfg = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"), command=["sh"], **kw)
    return build_spec(pod, ContainerContext("cid", cfg, {"config": {}}, str(rootfs),
                                            "/shoal-test/cid", mount_sources=sources or {}))


def test_spec_joins_the_pod_user_namespace(rootfs: Path) -> None:
    pod = PodContext("sid", cri.PodSandboxConfig(), netns_path="/n", userns=IDMAP,
                     userns_path="/pods/sid/userns")
    spec = _spec(rootfs, pod)
    assert {"type": "user", "path": "/pods/sid/userns"} in spec["linux"]["namespaces"]
    assert spec["linux"]["uidMappings"] == IDMAP.oci()["uidMappings"]
    assert spec["linux"]["gidMappings"] == IDMAP.oci()["gidMappings"]
    host = _spec(rootfs, PodContext("sid", cri.PodSandboxConfig(), netns_path="/n"))
    assert "uidMappings" not in host["linux"]
    assert all(ns["type"] != "user" for ns in host["linux"]["namespaces"])


def test_spec_refuses_ids_the_pod_does_not_map(rootfs: Path) -> None:
    small = IdMap(IdRange(0, 100000, 1000), IdRange(0, 100000, 1000))
    pod = PodContext("sid", cri.PodSandboxConfig(), userns=small, userns_path="/u")
    sec = cri.LinuxContainerSecurityContext(run_as_user=cri.Int64Value(value=1000))
    with pytest.raises(Invalid, match="uid 1000 is not mapped"):
        _spec(rootfs, pod, linux=cri.LinuxContainerConfig(security_context=sec))
    sec = cri.LinuxContainerSecurityContext(supplemental_groups=[5000])
    with pytest.raises(Invalid, match="supplemental gid 5000 is not mapped"):
        _spec(rootfs, pod, linux=cri.LinuxContainerConfig(security_context=sec))


def test_spec_mount_options(rootfs: Path, tmp_path: Path) -> None:
    pod = PodContext("sid", cri.PodSandboxConfig())
    mounts = [cri.Mount(container_path="/r", host_path=str(tmp_path), readonly=True,
                        recursive_read_only=True),
              cri.Mount(container_path="/o", host_path=str(tmp_path), readonly=True),
              cri.Mount(container_path="/i", host_path=str(tmp_path))]
    spec = _spec(rootfs, pod, {2: "/bundle/v/2"}, mounts=mounts)
    binds = {m["destination"]: m for m in spec["mounts"]}
    assert binds["/r"]["options"] == ["rbind", "rprivate", "rro"]
    assert binds["/o"]["options"] == ["rbind", "rprivate", "ro"]
    assert binds["/i"]["source"] == "/bundle/v/2" and binds["/o"]["source"] == str(tmp_path)


@pytest.mark.parametrize(("policy", "groups"), [(cri.Merge, [1000, 100, 7]),
                                                (cri.Strict, [1000, 7])])
def test_supplemental_groups_policy(rootfs: Path, policy: int, groups: list[int]) -> None:
    sec = cri.LinuxContainerSecurityContext(run_as_username="app", supplemental_groups=[7],
                                            supplemental_groups_policy=policy)
    spec = _spec(rootfs, PodContext("sid", cri.PodSandboxConfig()),
                 linux=cri.LinuxContainerConfig(security_context=sec))
    assert spec["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": groups}


def _fake_runtime(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


async def test_handler_features(tmp_path: Path) -> None:
    full = _fake_runtime(tmp_path, "full", """echo '{"mountOptions": ["ro", "rro"],
        "linux": {"namespaces": ["user", "pid"]}}'""")
    # A run dir whose parents (/run, /) anybody may pass through.
    found = await features.handler_features(full, str(tmp_path), "/run/shoal-never-made")
    assert found.has(features.RRO)
    kernel = await features.kernel_idmap_problem(str(tmp_path))
    assert found.has(features.USERNS) == (kernel is None), found.why_not
    bare = _fake_runtime(tmp_path, "bare", """echo '{"mountOptions": ["ro"],
        "linux": {"namespaces": ["pid"]}}'""")
    found = await features.handler_features(bare, str(tmp_path), str(tmp_path))
    assert not found.supported
    assert "rro" in found.why_not[features.RRO]
    assert "user namespace" in found.why_not[features.USERNS]
    old = _fake_runtime(tmp_path, "old", "echo 'unknown command features' >&2; exit 1")
    found = await features.handler_features(old, str(tmp_path), str(tmp_path))
    assert not found.supported and "exited 1" in found.why_not[features.RRO]
    with pytest.raises(FailedPrecondition, match="'old' does not support recursive"):
        await features.require(features.RRO, old, "old",
                               features.Where(str(tmp_path), str(tmp_path)))


def test_traverse_problem(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    (closed / "run").mkdir(parents=True)
    closed.chmod(0o700)
    try:
        assert "not traversable" in (features.traverse_problem(str(closed / "run")) or "")
        closed.chmod(0o711)
        parents_open = all(os.stat(p).st_mode & stat.S_IXOTH for p in tmp_path.parents)
        assert (features.traverse_problem(str(closed / "run")) is None) == (
            parents_open and bool(os.stat(tmp_path).st_mode & stat.S_IXOTH))
    finally:
        closed.chmod(0o755)
