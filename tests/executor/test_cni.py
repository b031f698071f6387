"""Pod networking through the real CNI plugins in a real network namespace, and the
executor's one masquerade chain per network (real iptables) in place of the bridge plugin's
per-pod one."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from shoal_common.errors import FailedPrecondition, Internal
from shoal_executor.domain import masquerade, netns
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
    cni, bridge = default_network(conf_dir, "10.244.213.0/24")
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


def nat_rules(tool: str = "iptables") -> list[str]:
    return subprocess.run([tool, "-w", "-t", "nat", "-S"], capture_output=True, text=True,
                          check=True).stdout.splitlines()


def masquerade_rules(subnet: str, tool: str = "iptables") -> list[str]:
    """Every nat rule of the module's for `subnet`: its chain and the jumps to it."""
    chain = masquerade.chain(ipaddress.ip_network(subnet))
    return [r for r in nat_rules(tool) if chain in r]


def default_network(conf_dir: Path, subnet: str) -> tuple[Cni, str]:
    """Shoal's default conflist on `subnet` and a bridge of its own: (its Cni, the bridge)."""
    bridge = f"sht{uuid.uuid4().hex[:6]}"
    (conf_dir / "10-test.conflist").write_text(json.dumps(default_conflist(subnet, bridge)))
    return Cni(conf_dir, CNI_BIN), bridge


def expected_rules(subnet: str, multicast: str) -> list[str]:
    chain = masquerade.chain(ipaddress.ip_network(subnet))
    return [f"-N {chain}",
            f'-A POSTROUTING -s {subnet} -m comment --comment '
            f'"shoal: masquerade pod network {subnet}" -j {chain}',
            f"-A {chain} -d {subnet} -j RETURN", f"-A {chain} -d {multicast} -j RETURN",
            f"-A {chain} -j MASQUERADE"]


async def test_the_default_network_is_masqueraded_by_one_chain_not_one_per_pod(
        conf_dir: Path) -> None:
    text = "10.244.215.0/24"
    subnet = ipaddress.ip_network(text)
    cni, bridge = default_network(conf_dir, text)
    net = cni.network()
    assert net.masquerade and net.plugins[0]["ipMasq"] is False
    name = f"shoal-test-{uuid.uuid4().hex[:8]}"
    path = await netns.create(name)
    added = False
    try:
        result = await cni.add(name, path)
        added = True
        assert result.ip.startswith("10.244.215.")
        # The plugin's per-pod chain is jumped to by a rule whose comment names the pod.
        assert not [r for r in nat_rules() if name in r]
        assert masquerade_rules(text) == []
        await masquerade.ensure(subnet)
        await masquerade.ensure(subnet)  # idempotent: the chain rewritten, one jump
        assert sorted(masquerade_rules(text)) == sorted(expected_rules(text, "224.0.0.0/4"))
        await cni.delete(name, path)
        added = False
        assert masquerade_rules(text) != []  # the network's, not the pod's
        await masquerade.remove(subnet)
        assert masquerade_rules(text) == []
        await masquerade.remove(subnet)  # nothing left to remove: no error
    finally:
        await masquerade.remove(subnet)
        if added:
            with contextlib.suppress(Internal):
                await cni.delete(name, path)
        await netns.delete(name)
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True)


async def test_an_ipv6_network_is_masqueraded_with_ip6tables() -> None:
    text = "fd00:244:215::/64"
    subnet = ipaddress.ip_network(text)
    try:
        await masquerade.ensure(subnet)
        await masquerade.ensure(subnet)
        assert sorted(masquerade_rules(text, "ip6tables")) == sorted(
            expected_rules(text, "ff00::/8"))
        assert masquerade_rules(text) == []  # nothing in the IPv4 tables
    finally:
        await masquerade.remove(subnet)
    assert masquerade_rules(text, "ip6tables") == []


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


SEEN_SERVER = """
import socket
s = socket.socket()
s.bind(("198.51.100.2", 0))
s.listen()
print(s.getsockname()[1], flush=True)
while True:
    c, peer = s.accept()
    c.sendall(peer[0].encode())
    c.close()
"""

CLIENT = """
import socket, sys
with socket.create_connection(("198.51.100.2", int(sys.argv[1])), timeout=5) as c:
    print(c.recv(100).decode())
"""


async def seen_from(pod: str, port: int) -> str:
    """The peer address the outside server saw a connection from the pod come from."""
    done = await asyncio.to_thread(subprocess.run, [
        "ip", "netns", "exec", pod, sys.executable, "-c", CLIENT, str(port)],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@contextlib.asynccontextmanager
async def outside() -> AsyncIterator[str]:
    """A namespace standing for the world outside the host, name yielded: 198.51.100.2 on
    a veth whose host side is 198.51.100.1/30."""
    name = f"shoal-test-out-{uuid.uuid4().hex[:8]}"
    host_side, far_side = f"sho{uuid.uuid4().hex[:8]}", f"shf{uuid.uuid4().hex[:8]}"
    await netns.create(name)
    try:
        run("ip", "link", "add", host_side, "type", "veth", "peer", "name", far_side,
            "netns", name)
        run("ip", "addr", "add", "198.51.100.1/30", "dev", host_side)
        run("ip", "link", "set", host_side, "up")
        run("ip", "-n", name, "addr", "add", "198.51.100.2/30", "dev", far_side)
        run("ip", "-n", name, "link", "set", far_side, "up")
        yield name
    finally:
        subprocess.run(["ip", "link", "delete", host_side], capture_output=True)
        await netns.delete(name)


async def test_a_pod_leaves_as_the_host_only_while_its_network_is_masqueraded(
        conf_dir: Path) -> None:
    text = "10.244.216.0/24"
    subnet = ipaddress.ip_network(text)
    cni, bridge = default_network(conf_dir, text)
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    was = forward.read_text().strip()
    pod = f"shoal-test-{uuid.uuid4().hex[:8]}"
    server = None
    try:
        if was == "0":
            forward.write_text("1")
        async with outside() as far:
            # Back to the pod's own address through the host: a connection not NATed then
            # succeeds too (no timeout to wait out) and shows the address it came from.
            run("ip", "-n", far, "route", "add", text, "via", "198.51.100.1")
            server = subprocess.Popen(["ip", "netns", "exec", far, sys.executable, "-c",
                                       SEEN_SERVER], stdout=subprocess.PIPE, text=True)
            assert server.stdout is not None
            port = int(server.stdout.readline())
            path = await netns.create(pod)
            pod_ip = (await cni.add(pod, path)).ip
            try:
                await masquerade.ensure(subnet)
                assert await seen_from(pod, port) == "198.51.100.1"
                await masquerade.remove(subnet)
                assert await seen_from(pod, port) == pod_ip
            finally:
                await cni.delete(pod, path)
    finally:
        await masquerade.remove(subnet)
        if server is not None:
            server.kill()
            server.wait()
        await netns.delete(pod)
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True)
        if was == "0":
            forward.write_text(was)
    assert masquerade_rules(text) == []


async def test_portmap_runs_only_for_a_pod_with_port_mappings(conf_dir: Path,
                                                               tmp_path: Path) -> None:
    """The real plugins, portmap behind a wrapper that logs each call: a pod without
    mappings never starts it (ADD or DEL), one with mappings does both ways."""
    bin_dir = tmp_path / "cni-bin"
    bin_dir.mkdir()
    calls = tmp_path / "portmap-calls"
    for plugin in ("bridge", "host-local", "loopback"):
        (bin_dir / plugin).symlink_to(Path(CNI_BIN[0]) / plugin)
    wrapper = bin_dir / "portmap"
    wrapper.write_text(f'#!/bin/sh\necho "$CNI_COMMAND" >> {calls}\n'
                       f'exec {CNI_BIN[0]}/portmap "$@"\n')
    wrapper.chmod(0o755)
    bridge = f"sht{uuid.uuid4().hex[:6]}"
    (conf_dir / "10-test.conflist").write_text(
        json.dumps(default_conflist("10.244.217.0/24", bridge)))
    cni = Cni(conf_dir, [str(bin_dir)])
    mapped = {"portMappings": [{"hostPort": free_port(), "containerPort": 80,
                                "protocol": "tcp"}]}
    try:
        async with scratch_netns() as (name, path):
            result = await cni.add(name, path, runtime_config={"portMappings": []})
            assert result.ip.startswith("10.244.217.")
            await cni.delete(name, path, runtime_config={"portMappings": []})
        assert not calls.exists()
        async with scratch_netns() as (name, path):
            await cni.add(name, path, runtime_config=mapped)
            await cni.delete(name, path, runtime_config=mapped)
        assert calls.read_text().split() == ["ADD", "DEL"]
    finally:
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True)
