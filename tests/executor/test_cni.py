"""Pod networking through the real CNI plugins in a real network namespace."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from shoal_common.errors import FailedPrecondition, Internal
from shoal_executor.domain import netns
from shoal_executor.domain.cni import Cni, default_conflist
from support.ports import free_port

CNI_BIN = ["/usr/lib/cni"]


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    d = tmp_path / "net.d"
    d.mkdir()
    return d


@contextlib.asynccontextmanager
async def scratch_netns() -> AsyncIterator[tuple[str, str]]:
    """A new network namespace, (name, path), deleted at the end."""
    name = f"shoal-test-{uuid.uuid4().hex[:8]}"
    path = await netns.create(name)
    try:
        yield name, path
    finally:
        await netns.delete(name)


async def test_add_gives_the_pod_an_ip_reachable_from_the_host_and_del_cleans_up(
        conf_dir: Path) -> None:
    bridge = f"sht{uuid.uuid4().hex[:6]}"
    (conf_dir / "10-test.conflist").write_text(json.dumps(
        default_conflist("10.244.213.0/24", bridge=bridge)))
    cni = Cni(conf_dir, CNI_BIN)
    name = f"shoal-test-{uuid.uuid4().hex[:8]}"
    path = await netns.create(name)
    server = None
    try:
        host_port = free_port()
        result = await cni.add(name, path, runtime_config={"portMappings": [
            {"hostPort": host_port, "containerPort": 8080, "protocol": "tcp"}]})
        assert result.ip.startswith("10.244.213.")
        addrs = subprocess.run(["ip", "-n", name, "-4", "addr", "show", "eth0"],
                               capture_output=True, text=True, check=True).stdout
        assert result.ip in addrs
        server = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, "-c",
             "import socket\ns=socket.socket()\n"
             "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
             "s.bind(('0.0.0.0', 8080))\ns.listen()\nprint('up', flush=True)\n"
             "c, _ = s.accept()\nc.sendall(b'hello from the pod')\nc.close()\n"],
            stdout=subprocess.PIPE)
        assert server.stdout is not None and server.stdout.readline() == b"up\n"
        with socket.create_connection((result.ip, 8080), timeout=5) as conn:
            assert conn.recv(100) == b"hello from the pod"
        await cni.delete(name, path, runtime_config={"portMappings": [
            {"hostPort": host_port, "containerPort": 8080, "protocol": "tcp"}]})
        addrs = subprocess.run(["ip", "-n", name, "-4", "addr"], capture_output=True,
                               text=True).stdout
        assert result.ip not in addrs
    finally:
        if server is not None:
            server.kill()
            server.wait()
        await netns.delete(name)
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True)
    assert not Path(netns.netns_path(name)).exists()


async def test_missing_or_broken_config_is_a_clear_error(conf_dir: Path) -> None:
    with pytest.raises(FailedPrecondition, match="no usable CNI network config"):
        Cni(conf_dir, CNI_BIN).network()
    (conf_dir / "00-bad.conflist").write_text("{not json")
    (conf_dir / "10-noplugin.conflist").write_text(json.dumps({"name": "x", "plugins": []}))
    with pytest.raises(FailedPrecondition, match=r"00-bad\.conflist"):
        Cni(conf_dir, CNI_BIN).network()
    (conf_dir / "20-missing.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "m", "plugins": [{"type": "no-such-plugin"}]}))
    async with scratch_netns() as (name, path):
        with pytest.raises(FailedPrecondition, match="no-such-plugin"):
            await Cni(conf_dir, CNI_BIN).add(name, path)


async def test_failed_plugin_error_carries_its_message(conf_dir: Path) -> None:
    (conf_dir / "10-bad.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "b", "plugins": [
            {"type": "bridge", "bridge": "shoalbad0", "ipam": {"type": "host-local",
                                                              "ranges": [[{"subnet": "nope"}]]}}]}))
    try:
        async with scratch_netns() as (name, path):
            with pytest.raises(Internal, match="CNI plugin bridge ADD failed"):
                await Cni(conf_dir, CNI_BIN).add(name, path)
    finally:
        await asyncio.to_thread(subprocess.run, ["ip", "link", "delete", "shoalbad0"],
                                capture_output=True)
