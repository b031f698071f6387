"""Pods in their own user namespace (`hostUsers: false`) through the real CRI socket: the
mappings are the pod's, its rootfs and idmapped volumes are owned right inside it, and the
mapping errors critest checks are refused with INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from support.shoal import (
    RunningShoal,
    images_fixture,  # noqa: F401
    pod_config,
    running_node,
)

pytestmark = pytest.mark.e2e

HOST_ID = 300_000 + (os.getpid() % 64) * 65536  # apart from other test runs' pods
LENGTH = 65536
MAPPING = [cri.IDMapping(container_id=0, host_id=HOST_ID, length=LENGTH)]


@pytest.fixture(scope="module")
async def running(nats_url: str, tmp_path_factory: pytest.TempPathFactory,
                  images: dict[str, str]) -> AsyncIterator[RunningShoal]:
    """A node whose run dir the pods' roots (unprivileged host uids) can reach: pytest's
    temporary directories are 0700, /run/shoal's parents are not."""
    root = tmp_path_factory.mktemp("node")
    chain = [root, *list(root.parents)[:2]]  # the node dir, pytest-<n>, pytest-of-<user>
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in chain}
    for path, mode in modes.items():
        path.chmod(mode | stat.S_IXOTH)
    try:
        async with running_node(nats_url, root, f"t{os.getpid()}-userns", images) as node:
            await node.api.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(
                image=images["busybox"])))
            yield node
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def userns_pod(tmp: Path, name: str, **userns: object) -> cri.PodSandboxConfig:
    config = pod_config(tmp, name)
    config.linux.security_context.namespace_options.userns_options.CopyFrom(
        cri.UserNamespace(**userns))
    return config


async def _run(node: RunningShoal, config: cri.PodSandboxConfig, image: str, script: str,
               mounts: list[cri.Mount] | None = None) -> tuple[str, str, str]:
    """A pod, and a container running `script` until it prints `done`: (pod id, container
    id, its output before that)."""
    pod_id = (await node.api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
              ).pod_sandbox_id
    ctr = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image=image),
        command=["sh", "-c", f"{script}; echo done; sleep 3600"], log_path="c.log",
        mounts=mounts or [],
        linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
            namespace_options=config.linux.security_context.namespace_options)))
    cid = (await node.api.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=ctr, sandbox_config=config))).container_id
    await node.api.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    log = Path(config.log_directory) / "c.log"
    lines: list[str] = []
    end = time.monotonic() + 20
    while time.monotonic() < end and "done" not in lines:
        await asyncio.sleep(0.1)
        if log.exists():
            lines = [line.split(" ", 3)[3] for line in log.read_text().splitlines()]
    assert "done" in lines, lines
    return pod_id, cid, "\n".join(lines[:lines.index("done")])


async def _remove(node: RunningShoal, pod_id: str) -> None:
    await node.api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    await node.api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return [line.split()[4] for line in fh if line.split()[4].startswith(str(path))]


async def test_status_advertises_user_namespaces(running: RunningShoal) -> None:
    status = await running.api.runtime.Status(cri.StatusRequest(verbose=True))
    handlers = {h.name: h.features for h in status.runtime_handlers}
    assert handlers[""].user_namespaces and handlers["runc"].user_namespaces
    components = json.loads(status.info["components"])
    assert components["feature:runc:user_namespaces"]["ok"]


async def test_pod_runs_with_its_mappings_and_owns_its_rootfs(
        running: RunningShoal, images: dict[str, str], tmp_path: Path) -> None:
    config = userns_pod(tmp_path, "userns", mode=cri.POD, uids=MAPPING, gids=MAPPING)
    script = ("cat /proc/self/uid_map /proc/self/gid_map; stat -c %u:%g / /bin/busybox "
              "/etc/passwd; touch /new && stat -c %u:%g /new; id -u")
    pod_id, cid, out = await _run(running, config, images["busybox"], script)
    try:
        lines = [line.split() for line in out.splitlines()]
        assert lines[0] == lines[1] == ["0", str(HOST_ID), str(LENGTH)], out
        assert lines[2:7] == [["0:0"]] * 4 + [["0"]], out
        # On the host the process is the mapped root; ContainerStatus maps it back.
        reply = await running.api.runtime.ContainerStatus(cri.ContainerStatusRequest(
            container_id=cid, verbose=True))
        user = reply.status.user.linux
        assert (user.uid, user.gid, list(user.supplemental_groups)) == (0, 0, [0])
        pid = json.loads(reply.info["info"])["pid"]
        uid_line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(HOST_ID)] * 4
        pod_dir = running.services.node.run_root / "executor" / "sandboxes" / pod_id
        assert json.loads((pod_dir / "userns.json").read_text())["uids"] == [0, HOST_ID,
                                                                             LENGTH]
    finally:
        await _remove(running, pod_id)
    leftover = _mounts_under(running.services.node.run_root / "executor")
    assert not [m for m in leftover if pod_id in m or cid in m], leftover


async def test_idmapped_volume(running: RunningShoal, images: dict[str, str],
                               tmp_path: Path) -> None:
    """A volume with the pod's mappings shows host files owned by 0 as owned by root, and a
    file root writes there is owned by 0 on the host; without mappings, by nobody."""
    volume = tmp_path / "volume"
    volume.mkdir()
    volume.chmod(0o755)
    (volume / "file").write_text("x")
    config = userns_pod(tmp_path, "volume", mode=cri.POD, uids=MAPPING, gids=MAPPING)
    mounts = [cri.Mount(container_path="/idmapped", host_path=str(volume),
                        uidMappings=MAPPING, gidMappings=MAPPING),
              cri.Mount(container_path="/plain", host_path=str(volume), readonly=True)]
    pod_id, _, out = await _run(running, config, images["busybox"],
                                "stat -c %u /idmapped/file /plain/file; "
                                "echo hi > /idmapped/written && echo ok", mounts)
    try:
        assert out.split() == ["0", "65534", "ok"], out
        st = (volume / "written").stat()
        assert (st.st_uid, st.st_gid) == (0, 0)
    finally:
        await _remove(running, pod_id)


async def test_node_mode_is_the_host_user_namespace(running: RunningShoal,
                                                    images: dict[str, str],
                                                    tmp_path: Path) -> None:
    config = userns_pod(tmp_path, "node-mode", mode=cri.NODE)
    pod_id, _, out = await _run(running, config, images["busybox"], "cat /proc/self/uid_map")
    try:
        assert out.split() == Path("/proc/self/uid_map").read_text().split()
    finally:
        await _remove(running, pod_id)


def _host_network(config: cri.PodSandboxConfig) -> cri.PodSandboxConfig:
    config.linux.security_context.namespace_options.network = cri.NODE
    return config


@pytest.mark.parametrize("make", [
    lambda t: userns_pod(t, "two", mode=cri.POD, uids=MAPPING * 2, gids=MAPPING * 2),
    lambda t: userns_pod(t, "no-root", mode=cri.POD, uids=[cri.IDMapping(
        container_id=1, host_id=HOST_ID, length=LENGTH)], gids=MAPPING),
    lambda t: userns_pod(t, "none", mode=cri.POD),
    lambda t: userns_pod(t, "node-maps", mode=cri.NODE, uids=MAPPING, gids=MAPPING),
    lambda t: userns_pod(t, "container", mode=cri.CONTAINER),
    lambda t: userns_pod(t, "target", mode=cri.TARGET),
    lambda t: _host_network(userns_pod(t, "hostnet", mode=cri.POD, uids=MAPPING,
                                       gids=MAPPING)),
], ids=["two-mappings", "container-id-1", "no-mappings", "node-with-mappings", "container",
        "target", "host-network"])
async def test_bad_user_namespaces_are_refused(running: RunningShoal, tmp_path: Path,
                                               make: object) -> None:
    config = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running.api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "userns_options" in (err.value.details() or "")
    pods = await running.api.runtime.ListPodSandbox(cri.ListPodSandboxRequest())
    assert config.metadata.uid not in [p.metadata.uid for p in pods.items]
