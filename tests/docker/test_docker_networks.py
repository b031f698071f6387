"""Docker networks through Debian's docker CLI and the SDK: network create/ls/inspect/rm/
prune, containers on a user network finding each other by name, alias and short id (the
gateway's DNS on the network's gateway address), connect/disconnect, and Docker's errors."""

from __future__ import annotations

import asyncio
import json
import time

import docker.errors
import pytest
from dnslib import QTYPE, RCODE, DNSRecord
from shoal_docker_gateway.domain import dns
from support.docker import docker_node_fixture
from support.ports import free_port
from support.shoal import images_fixture  # noqa: F401

dnode = docker_node_fixture("nets")


def _gone(dnode, *names: str, networks: tuple[str, ...] = ()) -> None:
    for name in names:
        dnode.docker("rm", "-f", name, check=False)
    for net in networks:
        dnode.docker("network", "rm", net, check=False)


def _lookup(dnode, images, net: str, name: str) -> tuple[int, str]:
    """`nslookup NAME` from a container of its own on `net`: (exit code, output)."""
    proc = dnode.docker("run", "--rm", "--network", net, images["busybox"], "nslookup", name,
                        check=False)
    return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")


def _ip(dnode, ctr: str, net: str) -> str:
    doc = json.loads(dnode.out("inspect", ctr))[0]
    return doc["NetworkSettings"]["Networks"][net]["IPAddress"]


def test_network_create_ls_inspect_rm(dnode) -> None:
    try:
        net_id = dnode.out("network", "create", "--label", "team=a", "tn_one")
        assert len(net_id) == 64
        rows = dnode.out("network", "ls", "--format", "{{.Name}} {{.Driver}} {{.Scope}}")
        assert {"bridge bridge local", "host host local", "none null local",
                "tn_one bridge local"} <= set(rows.splitlines()), rows
        assert dnode.out("network", "ls", "-q", "--filter", "type=custom") == net_id[:12]
        assert dnode.out("network", "ls", "-q", "--filter", "label=team=a",
                         "--filter", "name=one") == net_id[:12]
        assert dnode.out("network", "ls", "-q", "--filter", "label=team=b") == ""
        builtin = dnode.out("network", "ls", "--filter", "type=builtin", "--format",
                            "{{.Name}}").split()
        assert sorted(builtin) == ["bridge", "host", "none"]
        for ref in ("tn_one", net_id, net_id[:10]):
            doc = json.loads(dnode.out("network", "inspect", ref))[0]
            assert doc["Id"] == net_id and doc["Name"] == "tn_one", doc
        assert doc["Driver"] == "bridge" and doc["Labels"] == {"team": "a"}
        pool = doc["IPAM"]["Config"][0]
        assert pool["Subnet"].endswith("/24") and pool["Gateway"], doc["IPAM"]
        bridge = json.loads(dnode.out("network", "inspect", "bridge"))[0]
        assert bridge["Driver"] == "bridge" and bridge["IPAM"]["Config"][0]["Subnet"]
        again = dnode.docker("network", "create", "tn_one", check=False)
        assert again.returncode != 0 and b"network with name tn_one already exists" in \
            again.stderr, again
        refused = dnode.docker("network", "rm", "bridge", check=False)
        assert refused.returncode != 0 and b"pre-defined network" in refused.stderr
        dnode.docker("network", "rm", "tn_one")
        missing = dnode.docker("network", "inspect", "tn_one", check=False)
        assert missing.returncode != 0 and b"No such network" in missing.stderr, missing
    finally:
        _gone(dnode, networks=("tn_one",))


def test_subnet_gateway_and_prune(dnode) -> None:
    try:
        dnode.docker("network", "create", "--subnet", "10.231.7.0/24", "--gateway",
                     "10.231.7.254", "--label", "keep=no", "tn_sub")
        doc = json.loads(dnode.out("network", "inspect", "tn_sub"))[0]
        assert doc["IPAM"]["Config"] == [{"Subnet": "10.231.7.0/24",
                                          "Gateway": "10.231.7.254"}], doc["IPAM"]
        dnode.docker("network", "create", "--label", "keep=yes", "tn_kept")
        out = dnode.out("network", "prune", "-f", "--filter", "label=keep=no")
        assert "tn_sub" in out and "tn_kept" not in out, out
        names = dnode.out("network", "ls", "--format", "{{.Name}}").split()
        assert "tn_sub" not in names and "tn_kept" in names
    finally:
        _gone(dnode, networks=("tn_sub", "tn_kept"))


def test_containers_resolve_each_other_by_name(dnode, images) -> None:
    try:
        net_id = dnode.out("network", "create", "tn_dns")
        web = dnode.out("run", "-d", "--name", "web", "--network", "tn_dns",
                        "--network-alias", "frontend", images["busybox"], "sh", "-c",
                        "mkdir /www && echo hello-web > /www/index.html && "
                        "exec busybox httpd -f -p 80 -h /www")
        doc = json.loads(dnode.out("inspect", "web"))[0]
        ep = doc["NetworkSettings"]["Networks"]["tn_dns"]
        assert ep["NetworkID"] == net_id and ep["IPAddress"] and ep["Gateway"], ep
        assert set(ep["Aliases"]) == {"frontend", web[:12]}, ep
        web_ip = ep["IPAddress"]
        for name in ("web", "frontend", web[:12], "WEB"):
            code, out = _lookup(dnode, images, "tn_dns", name)
            assert code == 0 and web_ip in out, (name, out)
        got = dnode.docker("run", "--rm", "--network", "tn_dns", images["busybox"], "wget",
                           "-q", "-O-", "http://frontend/")
        assert got.stdout == b"hello-web\n", got
        # A container made after the first one started is found too.
        dnode.docker("run", "-d", "--name", "db", "--network", "tn_dns", images["busybox"],
                     "sleep", "300")
        code, out = _lookup(dnode, images, "tn_dns", "db")
        assert code == 0 and _ip(dnode, "db", "tn_dns") in out, out
        listed = json.loads(dnode.out("network", "inspect", "tn_dns"))[0]["Containers"]
        assert listed[web]["Name"] == "web" and listed[web]["IPv4Address"].startswith(
            web_ip + "/"), listed
        in_use = dnode.docker("network", "rm", "tn_dns", check=False)
        assert in_use.returncode != 0 and b"has active endpoints" in in_use.stderr, in_use
        # Names of other networks and of the default one are not answered here.
        code, out = _lookup(dnode, images, "tn_dns", "nosuchname")
        assert code != 0 and "NXDOMAIN" in out, out
        dnode.docker("rm", "-f", "web")
        code, out = _lookup(dnode, images, "tn_dns", "web")
        assert code != 0 and web_ip not in out.split("Name:")[-1], out
    finally:
        _gone(dnode, "web", "db", networks=("tn_dns",))


def test_connect_and_disconnect(dnode, images) -> None:
    try:
        dnode.docker("network", "create", "tn_move")
        dnode.docker("network", "create", "tn_other")
        cid = dnode.out("create", "--name", "mover", images["busybox"], "sleep", "300")
        dnode.docker("network", "connect", "--alias", "moved", "tn_move", "mover")
        nets = json.loads(dnode.out("inspect", "mover"))[0]["NetworkSettings"]["Networks"]
        assert list(nets) == ["bridge", "tn_move"] and set(nets["tn_move"]["Aliases"]) == {
            "moved", cid[:12]}, nets
        dnode.docker("start", "mover")
        code, out = _lookup(dnode, images, "tn_move", "moved")
        assert code == 0 and _ip(dnode, "mover", "tn_move") in out, out
        # Running: one more network, reached at once (an interface of its pod).
        dnode.docker("network", "connect", "tn_other", "mover")
        other_ip = _ip(dnode, "mover", "tn_other")
        assert other_ip and other_ip != _ip(dnode, "mover", "tn_move")
        links = dnode.out("exec", "mover", "ip", "-o", "-4", "addr")
        assert other_ip in links and _ip(dnode, "mover", "tn_move") in links, links
        members = json.loads(dnode.out("network", "inspect", "tn_other"))[0]["Containers"]
        assert members[cid]["IPv4Address"].startswith(other_ip + "/"), members
        same = dnode.docker("network", "connect", "tn_move", "mover", check=False)
        assert same.returncode != 0 and b"already exists" in same.stderr, same
        first = dnode.docker("network", "disconnect", "bridge", "mover", check=False)
        assert first.returncode != 0 and b"disconnect those first" in first.stderr, first
        in_use = dnode.docker("network", "rm", "tn_other", check=False)
        assert in_use.returncode != 0 and b"has active endpoints" in in_use.stderr, in_use
        dnode.docker("network", "disconnect", "tn_other", "mover")
        assert other_ip not in dnode.out("exec", "mover", "ip", "-o", "-4", "addr")
        dnode.docker("network", "rm", "tn_other")
        dnode.docker("network", "disconnect", "tn_move", "mover")
        nets = json.loads(dnode.out("inspect", "mover"))[0]["NetworkSettings"]["Networks"]
        assert list(nets) == ["bridge"], nets
        dnode.docker("network", "rm", "tn_move")  # no container on it any more
        # Off the network it was made on: its pod made again, so not while it runs.
        busy = dnode.docker("network", "disconnect", "bridge", "mover", check=False)
        assert busy.returncode != 0 and b"stop it first" in busy.stderr, busy
        dnode.docker("stop", "-t", "0", "mover")
        dnode.docker("network", "disconnect", "bridge", "mover")
        nets = json.loads(dnode.out("inspect", "mover"))[0]["NetworkSettings"]["Networks"]
        assert list(nets) == ["none"], nets
        assert dnode.out("start", "mover") == "mover"
    finally:
        _gone(dnode, "mover", networks=("tn_move", "tn_other"))


def test_a_container_on_two_networks_resolves_names_on_both(dnode, images) -> None:
    try:
        for net in ("tn_front", "tn_back"):
            dnode.docker("network", "create", net)
        for name, net in (("fronty", "tn_front"), ("backy", "tn_back"), ("middle", "tn_front")):
            dnode.docker("run", "-d", "--name", name, "--network", net, images["busybox"],
                         "sleep", "300")
        dnode.docker("network", "connect", "tn_back", "middle")
        # Asked of its first network's server: names on either network, each network's
        # address of it.
        for name, net in (("fronty", "tn_front"), ("backy", "tn_back")):
            out = dnode.out("exec", "middle", "nslookup", name)
            assert _ip(dnode, name, net) in out.split("Name:")[-1], (name, out)
        ping = dnode.docker("exec", "middle", "busybox", "ping", "-c", "1", "-W", "5", "backy")
        assert ping.returncode == 0, ping
        # A container on one of them only does not find the other's names.
        code, out = _lookup(dnode, images, "tn_front", "backy")
        assert code != 0 and "NXDOMAIN" in out, out
    finally:
        _gone(dnode, "fronty", "backy", "middle", networks=("tn_front", "tn_back"))


@pytest.mark.parametrize(("kwargs", "status", "text"), [
    ({"name": "bad name"}, 400, "invalid network name"),
    ({"name": "tn_bad", "driver": "overlay"}, 501, "not supported"),
    ({"name": "tn_bad", "internal": True}, 501, "internal"),
    ({"name": "tn_bad", "options": {"com.docker.network.bridge.name": "eth0"}}, 501,
     "not supported"),
    ({"name": "host"}, 403, "predefined"),
])
def test_create_refuses_what_shoal_cannot_do(dnode, kwargs, status, text) -> None:
    api = dnode.sdk().api
    with pytest.raises(docker.errors.APIError) as err:
        api.create_network(**kwargs)
    assert err.value.status_code == status and text in str(err.value), err.value
    assert "tn_bad" not in dnode.out("network", "ls", "--format", "{{.Name}}")


def test_sdk_networks_and_ipam_checks(dnode) -> None:
    client = dnode.sdk()
    api = client.api
    bad = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet="10.1.2.3/99")])
    with pytest.raises(docker.errors.APIError) as err:
        api.create_network("tn_ipam", ipam=bad)
    assert err.value.status_code == 400, err.value
    net = client.networks.create("tn_sdk", labels={"x": "1"})
    try:
        assert client.networks.get(net.id).name == "tn_sdk"
        assert [n.name for n in client.networks.list(names=["tn_sdk"])] == ["tn_sdk"]
        with pytest.raises(docker.errors.NotFound):
            client.networks.get("tn_nosuch")
    finally:
        net.remove()
    end = time.monotonic() + 5
    while "tn_sdk" in dnode.out("network", "ls", "--format", "{{.Name}}"):
        assert time.monotonic() < end
        time.sleep(0.2)


async def test_dns_server_answers_udp_and_tcp_and_refuses_bad_targets() -> None:
    """The gateway's DNS server on its own, on loopback: names, reverse names, NXDOMAIN for
    unknown single labels, SERVFAIL when nothing may be forwarded; and which addresses it
    will not bind."""
    async def names(_net_id: str) -> dns.Names:
        found = dns.Names()
        found.by_name["web"] = ["127.0.0.7"]
        found.by_reverse["7.0.0.127.in-addr.arpa"] = "web"
        found.by_name["many"] = [f"127.0.1.{i}" for i in range(1, 60)]  # > 512 bytes
        return found

    port = free_port()
    server = dns.NetworkDns(dns.Target("n1", "127.0.0.1", "127.0.0.0/8", "shl-0123456789a"),
                            names, lambda: [], port=port)
    await server.open()
    try:
        loop = asyncio.get_running_loop()

        async def udp(qname: str, qtype: str = "A") -> DNSRecord:
            reply: asyncio.Future[bytes] = loop.create_future()

            class Client(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: object) -> None:
                    reply.set_result(data)

            transport, _ = await loop.create_datagram_endpoint(
                Client, remote_addr=("127.0.0.1", port))
            try:
                transport.sendto(DNSRecord.question(qname, qtype).pack())
                return DNSRecord.parse(await asyncio.wait_for(reply, 5))
            finally:
                transport.close()

        got = await udp("WEB")
        assert [str(r.rdata) for r in got.rr] == ["127.0.0.7"], got
        assert (await udp("web", "AAAA")).rr == []
        ptr = await udp("7.0.0.127.in-addr.arpa", "PTR")
        assert [str(r.rdata) for r in ptr.rr] == ["web."], ptr
        assert (await udp("gone")).header.rcode == RCODE.NXDOMAIN
        assert (await udp("example.com")).header.rcode == RCODE.SERVFAIL  # no upstream
        many = await udp("many")
        assert many.header.tc and not many.rr, many  # too long for UDP: ask over TCP
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for qname, count in (("web", 1), ("many", 59)):
                query = DNSRecord.question(qname).pack()
                writer.write(len(query).to_bytes(2) + query)
                size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 5))
                answer = DNSRecord.parse(await reader.readexactly(size))
                assert answer.q.qtype == QTYPE.A and len(answer.rr) == count, answer
            assert str(answer.rr[0].rdata) == "127.0.1.1"
        finally:
            writer.close()
    finally:
        await server.close()
    ok = dns.Target("n1", "10.250.0.1", "10.250.0.0/24", "shl-0123456789a")
    assert dns.check_target(ok, {}) == ""
    assert dns.check_target(ok, {"10.250.0.1": "shl-0123456789a"}) == ""
    assert "eth0" in dns.check_target(ok, {"10.250.0.1": "eth0"})
    assert "not one the executor made" in dns.check_target(
        dns.Target("n1", "10.250.0.1", "10.250.0.0/24", "eth0"), {})
    assert "not a unicast address" in dns.check_target(
        dns.Target("n1", "10.9.9.9", "10.250.0.0/24", "shl-0123456789a"), {})
    assert "not a unicast address" in dns.check_target(
        dns.Target("n1", "127.0.0.1", "127.0.0.0/8", "shl-0123456789a"), {})
