"""Container secrets stay private: with a pod running whose container has a password in
its environment, an unprivileged local user walks Shoal's state and run roots (placed in
a world-readable directory, so only Shoal's own modes protect them) and finds no file it
can read that holds the secret, nor any database, bundle or credential it can read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2 as cri
from support.shoal import RunningShoal, images_fixture, pod_config, running_node  # noqa: F401

pytestmark = pytest.mark.e2e

SECRET = f"s3cret-{uuid.uuid4().hex}"
NOBODY = 65534

# Run as nobody: which of the given paths (every file root sees under Shoal's roots: an
# attacker may know the names without listing the directories) it can open, and which of
# those hold SECRET.
WALKER = """
import json, sys
secret, paths = sys.argv[1].encode(), sys.argv[2:]
readable, leaking = [], []
for path in paths:
    try:
        with open(path, "rb") as fh:
            data = fh.read(1 << 24)
    except OSError:
        continue
    readable.append(path)
    if secret in data:
        leaking.append(path)
print(json.dumps({"readable": readable, "leaking": leaking}))
"""


@pytest.fixture
async def exposed(nats_url: str, images: dict[str, str]) -> AsyncIterator[RunningShoal]:
    """A node whose roots sit in a world-readable directory (pytest's tmp is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="shoal-modes-", dir="/tmp"))
    base.chmod(0o755)
    try:
        async with running_node(nats_url, base, f"modes{os.getpid()}", images) as node:
            yield node
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_an_unprivileged_user_reads_no_secret(exposed: RunningShoal,
                                                    images: dict[str, str]) -> None:
    api = exposed.api
    logs = exposed.services.node.root / "pod-logs"
    logs.mkdir()
    config = pod_config(logs, "secretive")
    pod_id = (await api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
              ).pod_sandbox_id
    await api.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(
        image=images["busybox"])))
    cid = (await api.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=pod_id, sandbox_config=config, config=cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="app"),
            image=cri.ImageSpec(image=images["busybox"]), command=["sleep", "600"],
            envs=[cri.KeyValue(key="DB_PASSWORD", value=SECRET)])))).container_id
    await api.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
    node = exposed.services.node
    files = [str(p) for root in (node.state_root, node.run_root) for p in root.rglob("*")
             if p.is_file() and not p.is_symlink()]
    holding = [f for f in files if SECRET.encode() in Path(f).read_bytes()]
    assert holding, "the secret should be somewhere (the bundle, the database)"
    # Those files are owner-only themselves, not just behind owner-only directories.
    assert [f for f in holding if os.stat(f).st_mode & 0o077] == []
    walk = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-I", "-c", WALKER, SECRET, *files],
        capture_output=True, text=True, timeout=120, check=True)
    found = json.loads(walk.stdout)
    assert found["leaking"] == []
    # Nothing of the services' own is readable: databases (and their WAL), bundles' specs,
    # passwords. By design readable: the pod's hostname/hosts/resolv.conf (containers of
    # any user read them) and the mounted images' own files (a user-namespaced pod's root
    # is an unprivileged host uid that must reach its rootfs).
    pod_files = {"hostname", "hosts", "resolv.conf"}
    assert [p for p in found["readable"]
            if Path(p).name not in pod_files and "/rootfs/" not in p] == []
    for db in node.state_root.glob("*/*.db*"):
        assert db.stat().st_mode & 0o077 == 0, db
    await api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
