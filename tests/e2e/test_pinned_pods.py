"""Pods without a pause process (the executor's `drop_infra`, CRI-O's drop_infra_ctr):
their IPC and UTS namespaces pinned by bind mounts, which every container of the pod joins,
through the real CRI socket, executor, supervisor (conmon + runc) and CNI. A pod that
shares a PID namespace or sets sysctls still gets its pause process."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2 as cri
from support.shoal import (
    RunningShoal,
    exited,
    host_names,
    leftovers,
    pod_config,
    shared_node,
)

pytestmark = pytest.mark.e2e

running = shared_node("pinned")


def kubelets(config: cri.PodSandboxConfig) -> cri.PodSandboxConfig:
    """The namespace options kubelet sends for a pod without shareProcessNamespace (the
    CRI's default, POD, shares one PID namespace)."""
    config.linux.security_context.namespace_options.pid = cri.CONTAINER
    return config


async def _run(node: RunningShoal, config: cri.PodSandboxConfig, image: str,
               *containers: tuple[str, list[str]]) -> tuple[str, list[str]]:
    api = node.api
    await api.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
    pod_id = (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
              ).pod_sandbox_id
    ids = []
    for name, command in containers:
        ctr = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name),
                                  image=cri.ImageSpec(image=image), command=command,
                                  log_path=f"{name}.log")
        # As kubelet does: the container's namespace options are the pod's.
        ctr.linux.security_context.namespace_options.CopyFrom(
            config.linux.security_context.namespace_options)
        cid = (await api.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, sandbox_config=config, config=ctr))).container_id
        await api.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
        ids.append(cid)
    return pod_id, ids


def _log(config: cri.PodSandboxConfig, name: str) -> str:
    return (Path(config.log_directory) / f"{name}.log").read_text()


def _sandbox_row(node: RunningShoal, pod_id: str) -> tuple[int, int]:
    """(pid, pinned) of the executor's record of the pod."""
    db = node.services.node.state_root / "executor" / "executor.db"
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT pid, pinned FROM sandboxes WHERE id=?",
                            (pod_id,)).fetchone()


async def _task_ids(node: RunningShoal) -> set[str]:
    """The supervisor's tasks (its records)."""
    db = node.services.node.state_root / "supervisor" / "tasks.db"
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM tasks")}


async def test_a_pod_without_a_pause_process_shares_ipc_and_uts(
        running: RunningShoal, images: dict[str, str], tmp_path: Path) -> None:
    before = host_names()
    config = kubelets(pod_config(tmp_path, "pinned-a"))
    script = ("busybox hostname; for ns in ipc uts net; do busybox readlink /proc/self/ns/$ns;"
              " done; busybox ip -o -4 addr show eth0; exec busybox sleep 300")
    pod_id, (one, two) = await _run(running, config, images["busybox"],
                                    ("one", ["sh", "-c", script]),
                                    ("two", ["sh", "-c", script]))
    status = (await running.api.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(
        pod_sandbox_id=pod_id, verbose=True))).status
    assert status.state == cri.SANDBOX_READY and status.network.ip
    assert _sandbox_row(running, pod_id) == (0, 1)
    tasks = await _task_ids(running)
    assert {one, two} <= tasks and pod_id not in tasks  # no pause task
    pod_dir = running.services.node.run_root / "executor" / "sandboxes" / pod_id
    mounts = Path("/proc/self/mountinfo").read_text()
    for kind in ("ipc", "uts"):
        assert f" {pod_dir}/ns/{kind} " in mounts, kind

    for _ in range(100):
        if all(_log(config, n).count("\n") >= 5 for n in ("one", "two")):
            break
        await asyncio.sleep(0.1)
    seen = [[json.loads(line)["log"] if line.startswith("{") else line.split(" ", 3)[-1]
             for line in _log(config, n).splitlines()] for n in ("one", "two")]
    assert seen[0][0].strip() == "pinned-a" and seen[0][:4] == seen[1][:4], seen
    own_ipc = os.readlink("/proc/self/ns/ipc")
    assert seen[0][1].strip() != own_ipc and "ipc:[" in seen[0][1], seen
    assert status.network.ip in seen[0][4], seen

    # Stopped: NOTREADY, its containers gone; removed: nothing left, pinned files too.
    await running.api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    status = (await running.api.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(
        pod_sandbox_id=pod_id))).status
    assert status.state == cri.SANDBOX_NOTREADY
    assert (await exited(running.api, one)).state == cri.CONTAINER_EXITED
    await running.api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(
        pod_sandbox_id=pod_id))
    assert f"{pod_dir}/ns/" not in Path("/proc/self/mountinfo").read_text()
    assert not pod_dir.exists()
    assert leftovers(running.services, running.services.subnet_prefix, before) == []


@pytest.mark.parametrize("why", ["shared-pid", "sysctls"])
async def test_a_pod_that_needs_a_pause_process_has_one(
        running: RunningShoal, images: dict[str, str], tmp_path: Path, why: str) -> None:
    config = kubelets(pod_config(tmp_path, f"paused-{why}"))
    if why == "shared-pid":
        config.linux.security_context.namespace_options.pid = cri.POD
    else:
        config.linux.sysctls["kernel.shm_rmid_forced"] = "1"
    pod_id, _ = await _run(running, config, images["busybox"],
                           ("main", ["sh", "-c", "busybox cat /proc/sys/kernel/shm_rmid_forced;"
                                     " busybox ps -o pid,comm; exec busybox sleep 300"]))
    for _ in range(100):
        if "PID" in _log(config, "main"):
            break
        await asyncio.sleep(0.1)
    out = _log(config, "main")
    if why == "sysctls":  # set by runc, in the IPC namespace the pause process made
        assert " 1\n" in out, out
    else:  # the pause process is the pod's init, seen by its containers
        assert " 1 catatonit" in out or " 1 pause" in out, out
    if why == "sysctls":  # its own PID namespace, as the pod asked
        assert "catatonit" not in out, out
    pid, is_pinned = _sandbox_row(running, pod_id)
    assert pid > 0 and is_pinned == 0
    assert pod_id in await _task_ids(running)
    status = (await running.api.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(
        pod_sandbox_id=pod_id))).status
    assert status.state == cri.SANDBOX_READY
    await running.api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    await running.api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(
        pod_sandbox_id=pod_id))
