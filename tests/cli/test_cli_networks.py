"""`shoal network create|ls|inspect|rm` and `shoal run --network NAME|host|none|container:ID`:
the real `shoal` binary against a real node (executor writing CNI configs, the real bridge,
macvlan, host-local and portmap plugins, runc, conmon, busybox containers that reach each
other). Subnets 10.237.x.0/24 and 10.238.x.0/24, bridges named by each network's random id
and parent interfaces named per test: other tests run beside these."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from shoal_common import subjects
from support.hostile import ask
from support.ports import free_port
from support.processes import SHOAL, CliResult, Node, ServiceSet, finished
from support.shoal import (  # noqa: F401
    cri_client,
    host_names,
    images_fixture,
    leftovers,
    remove_all_pods,
    running_node,
)

pytestmark = pytest.mark.e2e
SERVE = 'trap "exit 0" TERM; echo ready; while true; do sleep 0.1; done'
NETNS = Path("/var/run/netns")


@dataclass
class Shoal:
    node: Node
    services: ServiceSet


@pytest.fixture(scope="module")
async def shoal_node(nats_url: str, images: dict[str, str],
                     tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Shoal]:
    async with running_node(nats_url, tmp_path_factory.mktemp("net-node"),
                            f"tnet{os.getpid()}", images) as running:
        yield Shoal(running.services.node, running.services)


@dataclass
class Cli:
    node: Node
    runs: list[asyncio.subprocess.Process]

    async def spawn(self, *args: str) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            SHOAL, args[0], *self.node.flags(), *args[1:], stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self.runs.append(proc)
        return proc

    async def __call__(self, *args: str, timeout: float = 60) -> CliResult:
        # `network` takes the node's flags after its subcommand.
        head = list(args[:2]) if args[0] == "network" else [args[0]]
        return await finished(await asyncio.create_subprocess_exec(
            SHOAL, *head, *self.node.flags(), *args[len(head):],
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE), timeout)

    async def ok(self, *args: str) -> str:
        r = await self(*args)
        assert r.code == 0, f"shoal {' '.join(args)}: {r.err}"
        return r.out

    async def json(self, *args: str) -> Any:
        return json.loads(await self.ok(*args))

    async def running(self, name: str, timeout: float = 30) -> tuple[str, str]:
        """(container id, pod id) of the running container `name`, once it runs."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            cid = (await self.ok("ps", "-q", "--name", f"^{name}$")).strip()
            if cid:
                info = await self.json("inspect", cid)
                return cid, info["info"]["info"]["sandboxID"]
            await asyncio.sleep(0.2)
        raise AssertionError(f"container {name} not running after {timeout}s")

    async def pod_ip(self, pod_id: str) -> str:
        return (await self.json("inspect", pod_id))["status"]["network"]["ip"]

    async def sh(self, cid: str, script: str) -> CliResult:
        return await self("exec", "--timeout", "20", cid, "busybox", "sh", "-c", script)


@pytest.fixture
async def cli(shoal_node: Shoal) -> AsyncIterator[Cli]:
    c = Cli(shoal_node.node, [])
    yield c
    for proc in c.runs:  # a failed test's `shoal run`s: stopped by their pods' removal
        if proc.returncode is None:
            proc.terminate()
    async with cri_client(shoal_node.services) as api:
        await remove_all_pods(api)
    for proc in c.runs:
        await proc.wait()


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def ipam_dir(node: Node) -> Path:
    return node.state_root / "executor" / "cni" / "ipam"


def links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def host_ipv4() -> str:
    """An address of this host that is not loopback (portmap forwards those)."""
    out = json.loads(subprocess.run(["ip", "-j", "-4", "addr", "show"], check=True,
                                    capture_output=True).stdout)
    return next(a["local"] for link in out for a in link["addr_info"]
                if not a["local"].startswith("127."))


def http_get(addr: str, port: int) -> bytes:
    with socket.create_connection((addr, port), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    return data


async def serving(cli: Cli, name: str, *run_args: str, image: str) -> tuple[str, str]:
    await cli.spawn("run", "--name", name, *run_args, image, "sh", "-c", SERVE)
    return await cli.running(name)


def nat_rules() -> list[str]:
    return subprocess.run(["iptables", "-w", "-t", "nat", "-S"], check=True,
                          capture_output=True, text=True).stdout.splitlines()


def masquerade_rules(subnet: str) -> list[str]:
    """The executor's nat rules for a bridge network (its chain, the jump to it; see
    shoal_executor/domain/masquerade.py): five while they are there."""
    chain = "SHOAL-MASQ-" + hashlib.sha256(subnet.encode()).hexdigest()[:12]
    return [r for r in nat_rules() if chain in r]


def assert_gone(node: Node, info: dict[str, Any]) -> None:
    """Nothing of a removed network is left: file, bridge, leases, masquerade."""
    assert not Path(info["file"]).exists()
    if info["driver"] == "bridge":
        assert masquerade_rules(info["subnet"]) == []
    if info["bridge"]:
        assert info["bridge"] not in links()
    assert not (ipam_dir(node) / info["name"]).exists()


async def test_bridge_network_pods_reach_each_other_and_rm_waits_for_them(
        cli: Cli, shoal_node: Shoal, images: dict[str, str]) -> None:
    busybox, name = images["busybox"], unique("br")
    before = host_names()
    assert (await cli.ok("network", "create", "--subnet", "10.237.1.0/24", name)).strip() == name
    info = await cli.json("network", "inspect", name)
    assert (info["driver"], info["subnet"], info["gateway"]) == ("bridge", "10.237.1.0/24",
                                                                  "10.237.1.1")
    assert info["bridge"].startswith("shl-") and len(info["bridge"]) == 15
    assert info["pods"] == []
    conf = Path(info["file"])
    assert conf.parent.name == "shoal-networks" and conf.stat().st_mode & 0o777 == 0o600
    doc = json.loads(conf.read_text())
    assert doc["name"] == name
    assert [p["type"] for p in doc["plugins"]] == ["bridge", "portmap"]
    # NATed by the executor's one chain for the network, not a chain per pod.
    assert doc["shoal"] == {"masquerade": True} and doc["plugins"][0]["ipMasq"] is False
    assert len(masquerade_rules("10.237.1.0/24")) == 5
    assert doc["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.237.1.0/24",
                                                      "gateway": "10.237.1.1"}]]

    a_cid, a_pod = await serving(cli, f"{name}-a", "--network", name, image=busybox)
    # A published port on a named network, served from the pod: reached through the host.
    port = free_port()
    await cli.spawn("run", "--name", f"{name}-web", "--network", name, "-p", f"{port}:8080",
                    busybox, "sh", "-c", "mkdir /tmp/www; echo hello-net > /tmp/www/index.html;"
                    " exec busybox httpd -f -p 8080 -h /tmp/www")
    b_cid, b_pod = await cli.running(f"{name}-web")
    a_ip, b_ip = await cli.pod_ip(a_pod), await cli.pod_ip(b_pod)
    subnet = ipaddress.ip_network("10.237.1.0/24")
    assert ipaddress.ip_address(a_ip) in subnet and ipaddress.ip_address(b_ip) in subnet
    assert a_ip != b_ip
    r = await cli.sh(a_cid, f"busybox ping -c 1 -W 5 {b_ip} && busybox wget -qO- "
                            f"http://{b_ip}:8080/")
    assert r.code == 0 and "hello-net" in r.out, r
    r = await cli.sh(b_cid, f"busybox ping -c 1 -W 5 {a_ip}")
    assert r.code == 0, r
    for addr in (host_ipv4(), "127.0.0.1"):
        assert b"hello-net" in await asyncio.to_thread(http_get, addr, port), addr
    assert info["bridge"] in links()
    # No per-pod masquerade chain (the bridge plugin's jump names the pod; portmap's
    # DNAT rules for the published port do too, and stay).
    assert not [r for r in nat_rules() if r.startswith("-A POSTROUTING ")
                and (a_pod in r or b_pod in r)]

    listed = await cli.json("network", "inspect", name)
    assert {p["id"] for p in listed["pods"]} == {a_pod, b_pod}
    assert {p["pod"] for p in listed["pods"]} == {f"default/{name}-a", f"default/{name}-web"}
    assert {p["id"]: p["ips"] for p in listed["pods"]}[a_pod] == [a_ip]
    rows = (await cli.ok("network", "ls")).splitlines()
    assert rows[0].split() == ["NAME", "DRIVER", "SUBNET", "GATEWAY", "BRIDGE/PARENT", "PODS"]
    assert [name, "bridge", "10.237.1.0/24", "10.237.1.1", info["bridge"], "2"] in [
        row.split() for row in rows]
    assert any(row.split()[:2] == ["shoal", "(default)"] for row in rows), rows
    assert name in (await cli.ok("network", "ls", "-q")).split()

    refused = await cli("network", "rm", name)
    assert refused.code == 1 and "in use" in refused.err and f"{name}-a" in refused.err, refused
    assert Path(info["file"]).exists()
    await cli.ok("rm", "-f", a_pod)
    await cli.ok("rm", "-f", b_pod)
    leases = ipam_dir(cli.node) / name
    assert not [p for p in leases.iterdir() if p.name.startswith("10.237.")]
    assert await cli.ok("network", "rm", name) == f"{name}\n"
    assert_gone(cli.node, info)
    assert left(shoal_node, before) == []
    gone = await cli("network", "inspect", name)
    assert gone.code == 1 and f"no network {name!r}" in gone.err


def left(shoal: Shoal, before: set[str]) -> list[str]:
    """What this node's pods left on the host (other nodes' pods come and go meanwhile)."""
    return leftovers(shoal.services, shoal.services.subnet_prefix, before)


async def test_none_has_only_loopback_and_host_is_the_hosts(
        cli: Cli, shoal_node: Shoal, images: dict[str, str]) -> None:
    busybox = images["busybox"]
    before = host_names()
    r = await cli("run", "--rm", "--network", "none", busybox, "busybox", "sh", "-c",
                  "busybox ip -o link | busybox cut -d: -f2; busybox ip -o -4 addr")
    assert r.code == 0, r.err
    lines = [line.strip() for line in r.out.splitlines()]
    assert lines[0] == "lo" and len(lines) == 2 and "127.0.0.1/8" in lines[1], r.out
    assert left(shoal_node, before) == []  # its namespace went with it

    host_ns = os.readlink("/proc/self/ns/net")
    r = await cli("run", "--rm", "--network", "host", busybox, "busybox", "sh", "-c",
                  "busybox readlink /proc/self/ns/net; busybox ip -o link")
    assert r.code == 0, r.err
    assert r.out.splitlines()[0] == host_ns
    names = {line.split(":")[1].strip().split("@")[0] for line in r.out.splitlines()[1:]}
    assert {"lo", *[n for n in ("eth0",) if n in links()]} <= names

    refused = await cli("run", "--rm", "--network", "host", "-p", "8080:80", busybox, "true")
    assert refused.code == 1 and "--network host" in refused.err
    refused = await cli("run", "--rm", "--network", "none", "-p", "18081:80", busybox, "true")
    assert refused.code == 1 and "publishes no ports" in refused.err, refused.err


async def test_container_mode_shares_the_pods_network_and_outlives_its_removal(
        cli: Cli, shoal_node: Shoal, images: dict[str, str]) -> None:
    busybox, name = images["busybox"], unique("own")
    before = host_names()
    await cli.spawn("run", "--name", f"{name}-owner", busybox, "sh", "-c",
                    "mkdir /tmp/www; echo from-owner > /tmp/www/index.html;"
                    " exec busybox httpd -f -p 127.0.0.1:8080 -h /tmp/www")
    o_cid, o_pod = await cli.running(f"{name}-owner")
    o_ip = await cli.pod_ip(o_pod)
    # By a container id prefix: the joiner shares the owner pod's namespace.
    j_cid, j_pod = await serving(cli, f"{name}-joiner", "--network", f"container:{o_cid[:12]}",
                                 image=busybox)
    assert await cli.pod_ip(j_pod) == o_ip
    r = await cli.sh(j_cid, "busybox ip -o -4 addr show eth0; busybox wget -qO- "
                            "http://127.0.0.1:8080/")
    assert r.code == 0 and o_ip in r.out and "from-owner" in r.out, r
    # A joiner of the joiner (by pod id) joins the owner's namespace too.
    k_cid, k_pod = await serving(cli, f"{name}-third", "--network", f"container:{j_pod}",
                                 image=busybox)
    assert await cli.pod_ip(k_pod) == o_ip
    default = await cli.json("network", "inspect", "shoal")
    joins = {p["id"]: p["joins"] for p in default["pods"]}
    assert joins[o_pod] == "" and joins[j_pod] == o_pod and joins[k_pod] == o_pod

    refused = await cli("run", "--rm", "--network", f"container:{o_pod}", "-p", "18082:80",
                        busybox, "true")
    assert refused.code == 1 and "publishes no ports" in refused.err, refused.err

    # The owner goes first: its namespace, address and lease stay for the joiners.
    owner_ns = NETNS / f"shoal-{o_pod[:32]}"
    lease = Path("/var/lib/cni/networks/shoal") / o_ip
    assert owner_ns.exists() and lease.exists()
    await cli.ok("rm", "-f", o_pod)
    assert owner_ns.exists() and lease.exists()
    r = await cli.sh(j_cid, "busybox ip -o -4 addr show eth0")
    assert r.code == 0 and o_ip in r.out, r
    await cli.ok("rm", "-f", j_pod)
    assert owner_ns.exists() and lease.exists()
    await cli.ok("rm", "-f", k_pod)  # the last: now everything goes
    assert not owner_ns.exists() and not lease.exists()
    r = await cli.sh(k_cid, "true")
    assert r.code != 0
    assert left(shoal_node, before) == []


async def test_macvlan_and_ipvlan_on_a_parent_interface(
        cli: Cli, shoal_node: Shoal, images: dict[str, str]) -> None:
    busybox, name = images["busybox"], unique("mv")
    parent = unique("shtp")
    subprocess.run(["ip", "link", "add", parent, "type", "veth", "peer", "name", parent + "x"],
                   check=True)
    try:
        for link in (parent, parent + "x"):
            subprocess.run(["ip", "link", "set", link, "up"], check=True)
        await cli.ok("network", "create", "--driver", "macvlan", "--parent", parent,
                     "--subnet", "10.238.1.0/24", "--gateway", "10.238.1.254", name)
        info = await cli.json("network", "inspect", name)
        assert (info["driver"], info["parent"], info["bridge"]) == ("macvlan", parent, "")
        plugin = json.loads(Path(info["file"]).read_text())["plugins"]
        assert [(p["type"], p["master"], p["mode"]) for p in plugin] == [
            ("macvlan", parent, "bridge")]
        assert plugin[0]["ipam"]["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.238.1.254"}]
        a_cid, a_pod = await serving(cli, f"{name}-a", "--network", name, image=busybox)
        _, b_pod = await serving(cli, f"{name}-b", "--network", name, image=busybox)
        b_ip = await cli.pod_ip(b_pod)
        assert b_ip.startswith("10.238.1.")
        r = await cli.sh(a_cid, f"busybox ping -c 1 -W 5 {b_ip}")
        assert r.code == 0, r
        refused = await cli("run", "--rm", "--network", name, "-p", "18083:80", busybox, "true")
        assert refused.code == 1 and "publishes no ports" in refused.err, refused.err
        await cli.ok("rm", "-f", a_pod, b_pod)
        await cli.ok("network", "rm", name)
        assert_gone(cli.node, info)

        ipvlan = unique("iv")
        await cli.ok("network", "create", "--driver", "ipvlan", "--parent", parent,
                     "--subnet", "10.238.2.0/24", ipvlan)
        info = await cli.json("network", "inspect", ipvlan)
        assert [p["type"] for p in json.loads(Path(info["file"]).read_text())["plugins"]] == [
            "ipvlan"]
        probe = subprocess.run(["ip", "link", "add", "link", parent, unique("shti"), "type",
                                "ipvlan"], capture_output=True, text=True)
        before = host_names()
        if probe.returncode == 0:  # the kernel has ipvlan: pods on it reach each other
            subprocess.run(["ip", "link", "delete", probe.args[4]], check=True)
            a_cid, _ = await serving(cli, f"{ipvlan}-a", "--network", ipvlan, image=busybox)
            _, b_pod = await serving(cli, f"{ipvlan}-b", "--network", ipvlan, image=busybox)
            r = await cli.sh(a_cid, f"busybox ping -c 1 -W 5 {await cli.pod_ip(b_pod)}")
            assert r.code == 0, r
        else:  # this machine's: the plugin's own error, and nothing is left of the pod
            r = await cli("run", "--rm", "--network", ipvlan, busybox, "true")
            assert r.code == 1 and "CNI plugin ipvlan ADD failed" in r.err, r.err
            assert (await cli.ok("pods", "-q")).strip() == ""
            assert left(shoal_node, before) == []
        await remove_pods(cli)
        await cli.ok("network", "rm", ipvlan)
        assert_gone(cli.node, info)
    finally:
        subprocess.run(["ip", "link", "delete", parent], capture_output=True)


async def remove_pods(cli: Cli) -> None:
    pods = (await cli.ok("pods", "-q")).split()
    if pods:
        await cli.ok("rm", "-f", *pods)


@pytest.mark.parametrize(("args", "message"), [
    (["--subnet", "10.237.9.1/24"], "has host bits set"),
    (["--subnet", "10.237.9.0/31"], "prefix length"),
    (["--subnet", "127.0.0.0/24"], "not a unicast range"),
    (["--subnet", "10.237.9.0/24", "--gateway", "10.237.10.1"], "is not in subnet"),
    (["--subnet", "10.237.9.0/24", "--gateway", "10.237.9.255"], "broadcast"),
    (["--subnet", "nonsense"], "subnet"),
    (["--driver", "macvlan"], "needs --parent"),
    (["--driver", "macvlan", "--parent", "shtnosuch0"], "does not exist"),
    (["--parent", "eth0"], "for macvlan and ipvlan"),
])
async def test_create_refuses_bad_input(cli: Cli, args: list[str], message: str) -> None:
    r = await cli("network", "create", *args, unique("bad"))
    assert r.code == 1 and message in r.err, r.err
    assert "bad" not in (await cli.ok("network", "ls", "-q"))


async def test_names_overlaps_and_the_default_network(cli: Cli, shoal_node: Shoal) -> None:
    for reserved in ("none", "host", "default", "shoal"):
        r = await cli("network", "create", reserved)
        assert r.code == 1 and "reserved" in r.err, r.err
    r = await cli("network", "create", "Upper")
    assert r.code == 2 and "not a network name" in r.err
    first = unique("ov")
    await cli.ok("network", "create", "--subnet", "10.237.20.0/24", first)
    r = await cli("network", "create", "--subnet", "10.237.20.128/25", unique("ov"))
    assert r.code == 1 and f"overlaps 10.237.20.0/24, network {first!r}" in r.err, r.err
    r = await cli("network", "create", "--subnet", "10.237.30.0/24", first)
    assert r.code == 1 and "already exists" in r.err
    default_subnet = shoal_node.services.subnet_prefix + "0.0/16"
    r = await cli("network", "create", "--subnet", default_subnet, unique("ov"))
    assert r.code == 1 and "the default pod network" in r.err, r.err
    auto = unique("auto")
    await cli.ok("network", "create", auto)
    picked = ipaddress.ip_network((await cli.json("network", "inspect", auto))["subnet"])
    assert picked.prefixlen == 24 and picked.subnet_of(ipaddress.ip_network("10.89.0.0/16"))
    r = await cli("network", "rm", "shoal")
    assert r.code == 1 and "default network" in r.err
    default = await cli.json("network", "inspect", "shoal")
    assert default["default"] is True and default["driver"] == "bridge"
    assert default["subnet"] == shoal_node.services.subnet_prefix + "0.0/24"
    assert len(masquerade_rules(default["subnet"])) == 5  # the default network Shoal installed
    for net in (first, auto):
        await cli.ok("network", "rm", net)


async def test_unknown_network_or_pod_is_refused_and_leaves_nothing(
        cli: Cli, shoal_node: Shoal, images: dict[str, str]) -> None:
    busybox = images["busybox"]
    before = host_names()
    r = await cli("run", "--rm", "--network", "nosuchnet", busybox, "true")
    assert r.code == 1 and "unknown network 'nosuchnet'" in r.err, r.err
    r = await cli("run", "--rm", "--network", "container:ffff0000", busybox, "true")
    assert r.code == 1 and "no container or pod sandbox with id 'ffff0000'" in r.err, r.err
    r = await cli("run", "--rm", "--network", "Bad_Name", busybox, "true")
    assert r.code == 1 and "not a network name" in r.err, r.err
    assert (await cli.ok("pods", "-q")).strip() == ""
    assert left(shoal_node, before) == []


def hostile_bodies() -> Iterator[tuple[str, dict[str, Any]]]:
    good = {"id": uuid.uuid4().hex, "name": "fine", "subnet": "10.237.40.0/24"}
    for name in ("../../etc", "-rf", "a/b", "A", "x" * 64, "", "a b", "ok\n", "é"):
        yield "network.create", {**good, "name": name}
        yield "network.remove", {"name": name}
        yield "network.get", {"name": name}
    for subnet in ("10.237.40.0/24\n", "x" * 100, "::/0", "0.0.0.0/0", "224.0.0.0/8",
                   "10.237.40.0/99", "10.237.40.0", "1.2.3.4/8"):
        yield "network.create", {**good, "subnet": subnet}
    for field, value in (("driver", "host-device"), ("driver", "bridge\n"),
                         ("parent", "../eth0"), ("parent", "x" * 16), ("gateway", "::g"),
                         ("gateway", "10.237.41.1"), ("id", "../x"), ("id", 5)):
        yield "network.create", {**good, field: value}
    yield "network.create", {**good, "parent": "eth0"}
    for verb in ("sandbox.connect", "sandbox.disconnect"):
        for body in ({"id": "../x", "network": "fine"}, {"id": "a" * 200, "network": ""},
                     {"id": "abc", "network": "../../etc"}, {"id": "abc", "network": "A"},
                     {"id": "abc", "network": 5}, {"id": "abc"}, {"network": "fine"},
                     {"id": "nosuchpod", "network": ""}):
            yield verb, body


async def test_hostile_bodies_are_invalid_and_change_nothing(shoal_node: Shoal) -> None:
    node = shoal_node.node
    nc = await nats.connect(node.nats_url)
    networks_dir = node.state_root / "executor" / "cni" / "net.d" / "shoal-networks"
    before = sorted(os.listdir(networks_dir)) if networks_dir.exists() else []
    try:
        wrong = []
        for verb, body in hostile_bodies():
            status, message = await ask(nc, subjects.command(node.node_id, "tasks", verb),
                                        msgspec.msgpack.encode(body))
            if status not in ("invalid", "not_found"):
                wrong.append(f"{verb} {body}: {status} {message}")
        assert wrong == []
    finally:
        await nc.close()
    after = sorted(os.listdir(networks_dir)) if networks_dir.exists() else []
    assert after == before


async def test_a_restarted_executor_repairs_the_network_files(
        cli: Cli, shoal_node: Shoal) -> None:
    name = unique("rep")
    await cli.ok("network", "create", "--subnet", "10.237.50.0/24", name)
    info = await cli.json("network", "inspect", name)
    conf = Path(info["file"])
    written = conf.read_text()
    conf.unlink()  # lost: rewritten from the record
    # A removal killed after its record went: the file, its bridge and leases go at start.
    ghost = conf.parent / "ghostnet.conflist"
    ghost_bridge = unique("shl-")[:15]
    subprocess.run(["ip", "link", "add", ghost_bridge, "type", "bridge"], check=True)
    (ipam_dir(cli.node) / "ghostnet").mkdir(parents=True)
    ghost.write_text(json.dumps({"cniVersion": "1.0.0", "name": "ghostnet", "plugins": [
        {"type": "bridge", "bridge": ghost_bridge, "ipam": {"type": "host-local"}}]}))
    default = shoal_node.services.subnet_prefix + "0.0/24"
    try:
        executor = next(sp for sp in shoal_node.services if sp.service == "executor"
                        and sp.proc.poll() is None)
        assert len(masquerade_rules(info["subnet"])) == len(masquerade_rules(default)) == 5
        executor.terminate()
        # A clean stop drops the masquerade of networks no pod is on; the start puts it back.
        assert masquerade_rules(info["subnet"]) == masquerade_rules(default) == []
        sp = shoal_node.services.start("executor", extra=shoal_node.services.extra)
        await asyncio.to_thread(shoal_node.services.wait_serving, sp)
        assert len(masquerade_rules(info["subnet"])) == len(masquerade_rules(default)) == 5
        assert conf.read_text() == written and conf.stat().st_mode & 0o777 == 0o600
        assert not ghost.exists() and ghost_bridge not in links()
        assert not (ipam_dir(cli.node) / "ghostnet").exists()
        await cli.ok("network", "rm", name)
        assert_gone(cli.node, info)
    finally:
        subprocess.run(["ip", "link", "delete", ghost_bridge], capture_output=True)


def leases(node: Node, network: str) -> set[str]:
    """The addresses host-local holds on a `shoal network create` network."""
    directory = ipam_dir(node) / network
    return {p.name for p in directory.iterdir() if p.name[0].isdigit()} if \
        directory.exists() else set()


async def test_a_ready_pod_is_connected_to_more_networks_and_disconnected(
        cli: Cli, shoal_node: Shoal, images: dict[str, str]) -> None:
    busybox, name = images["busybox"], unique("cn")
    before = host_names()
    front, back = f"{name}-f", f"{name}-b"
    await cli.ok("network", "create", "--subnet", "10.237.60.0/24", front)
    await cli.ok("network", "create", "--subnet", "10.237.61.0/24", back)
    try:
        await _connect_and_disconnect(cli, shoal_node, busybox, name, front, back, before)
    finally:  # a failed run's bridges would refuse the next run's subnets
        async with cri_client(shoal_node.services) as api:
            await remove_all_pods(api)
        for net in (front, back):
            await cli("network", "rm", net)


async def _connect_and_disconnect(cli: Cli, shoal_node: Shoal, busybox: str, name: str,
                                  front: str, back: str, before: set[str]) -> None:
    a_cid, a_pod = await serving(cli, f"{name}-a", "--network", front, image=busybox)
    b_cid, b_pod = await serving(cli, f"{name}-b", "--network", back, image=busybox)
    b_ip = await cli.pod_ip(b_pod)

    out = (await cli.ok("network", "connect", back, a_pod)).split()
    assert out[0] == "eth1" and ipaddress.ip_address(out[1]) in ipaddress.ip_network(
        "10.237.61.0/24"), out
    a_back_ip = out[1]
    # A retry (a lost reply) gets the same interface and address.
    assert (await cli.ok("network", "connect", back, a_pod)).split() == out
    r = await cli.sh(a_cid, f"busybox ping -c 1 -W 5 {b_ip} && busybox ip -o -4 addr show eth1"
                            " && busybox ip route")
    assert r.code == 0 and a_back_ip in r.out and "ttl=64" in r.out, r  # on the link: no hop
    # The pod's default route stays on the network it was made on.
    default = [line for line in r.out.splitlines() if line.startswith("default")]
    assert default == [line for line in default if "10.237.60.1" in line and "eth0" in line]
    assert len(default) == 1, r.out
    r = await cli.sh(b_cid, f"busybox ping -c 1 -W 5 {a_back_ip}")
    assert r.code == 0, r
    listed = {p["id"]: p["ips"] for p in (await cli.json("network", "inspect", back))["pods"]}
    assert listed == {b_pod: [b_ip], a_pod: [a_back_ip]}
    assert await cli.pod_ip(a_pod) != a_back_ip  # the CRI's address is eth0's
    refused = await cli("network", "rm", back)
    assert refused.code == 1 and "in use" in refused.err and a_pod[:12] in refused.err

    # The pod's own network stays; the default network is one more it may join.
    refused = await cli("network", "disconnect", front, a_pod)
    assert refused.code == 1 and "stays on it" in refused.err, refused.err
    assert (await cli.ok("network", "connect", "", a_pod)).split()[0] == "eth2"
    await cli.ok("network", "disconnect", "", a_pod)
    await cli.ok("network", "disconnect", back, a_pod)
    await cli.ok("network", "disconnect", back, a_pod)  # again: nothing left to do
    r = await cli.sh(a_cid, "busybox ip -o link")
    assert r.code == 0 and "eth1" not in r.out and "eth2" not in r.out, r.out
    assert leases(cli.node, back) == {b_ip}

    # Connected again, then the pod removed while connected: everything given back.
    await cli.ok("network", "connect", back, a_pod)
    assert len(leases(cli.node, back)) == 2
    await cli.ok("rm", "-f", a_pod)
    assert leases(cli.node, back) == {b_ip}
    await cli.ok("rm", "-f", b_pod)
    for net in (front, back):
        await cli.ok("network", "rm", net)
    assert left(shoal_node, before) == []


async def test_connect_refuses_what_cannot_take_a_network(
        cli: Cli, shoal_node: Shoal, images: dict[str, str]) -> None:
    busybox, name = images["busybox"], unique("cr")
    _, h_pod = await serving(cli, f"{name}-h", "--network", "host", image=busybox)
    _, o_pod = await serving(cli, f"{name}-o", image=busybox)
    _, j_pod = await serving(cli, f"{name}-j", "--network", f"container:{o_pod}",
                                 image=busybox)
    for pod, message in ((h_pod, "on the host's network"),
                         (j_pod, f"shares the network namespace of pod sandbox {o_pod}"),
                         ("ffff0000", "not found")):
        r = await cli("network", "connect", "", pod)
        assert r.code == 1 and message in r.err, (pod, r.err)
    r = await cli("network", "connect", "nosuchnet", o_pod)
    assert r.code == 1 and "unknown network 'nosuchnet'" in r.err, r.err
    r = await cli("network", "connect", "Bad_Name", o_pod)
    assert r.code == 2 and "not a network name" in r.err, r.err
    # Its own network (the default, by its name) already: eth0, as it is.
    assert (await cli.ok("network", "connect", "shoal", o_pod)).split()[0] == "eth0"


async def test_an_executor_killed_mid_connect_leaks_no_address(
        cli: Cli, shoal_node: Shoal, images: dict[str, str], tmp_path: Path) -> None:
    """Killed after CNI ADD, before the attachment was recorded done: the caller's resend,
    answered by the next executor, ends with the pod connected once (one lease)."""
    services, name = shoal_node.services, unique("kc")
    await cli.ok("network", "create", "--subnet", "10.237.62.0/24", name)
    executor = next(sp for sp in services if sp.service == "executor" and sp.proc.poll() is None)
    try:
        _, pod = await serving(cli, f"{name}-a", image=images["busybox"])
        executor.terminate()
        armed = services.start("executor", extra=services.extra, env={
            "SHOAL_FAULTS": "executor.sandbox.connected=kill",
            "SHOAL_FAULTS_DIR": str(tmp_path)})
        await asyncio.to_thread(services.wait_serving, armed)
        connect = asyncio.ensure_future(cli("network", "connect", name, pod, timeout=90))
        await asyncio.to_thread(armed.proc.wait, 30)
        assert (tmp_path / "fault-executor.sandbox.connected").exists()
        assert len(leases(cli.node, name)) == 1  # ADD ran; its record says not yet
        executor = services.start("executor", extra=services.extra)
        await asyncio.to_thread(services.wait_serving, executor)
        done = await connect
        assert done.code == 0 and done.out.startswith("eth1 "), done
        ip = done.out.split()[1]
        assert leases(cli.node, name) == {ip}
        info = await cli.json("network", "inspect", name)
        assert [(p["id"], p["ips"]) for p in info["pods"]] == [(pod, [ip])]
        await cli.ok("rm", "-f", pod)
        assert leases(cli.node, name) == set()
    finally:
        if executor.proc.poll() is not None:
            executor = services.start("executor", extra=services.extra)
            await asyncio.to_thread(services.wait_serving, executor)
        async with cri_client(services) as api:
            await remove_all_pods(api)
        await cli("network", "rm", name)
