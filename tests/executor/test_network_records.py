"""The executor's records of networks and of which sandboxes are on them (a real SQLite
database): what a network's removal and a pod's arrival check in their transactions, and a
database of the version before networks migrated with its rows kept."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sqlite3
from pathlib import Path

import pytest
from shoal_common.errors import AlreadyExists, FailedPrecondition, Invalid, NotFound
from shoal_executor.domain.cni import Cni, parse_network, without_default_route
from shoal_executor.domain.networks import (
    conflist,
    masquerade_subnets,
    parse_gateway,
    parse_subnet,
)
from shoal_executor.store.networks import NetworkRecord, NetworkStore
from shoal_executor.store.records import (
    MIGRATIONS,
    NO_NETWORK,
    READY,
    Records,
    SandboxRecord,
)


def record(name: str, subnet: str, request_id: str = "r1") -> NetworkRecord:
    return NetworkRecord(name=name, id=name * 4, request_id=request_id, driver="bridge",
                         subnet=subnet, gateway="", parent="", bridge="shl-x",
                         created_at=1.0)


def no_check(rows: list[NetworkRecord]) -> None:
    pass


@pytest.fixture
async def records(tmp_path: Path) -> Records:
    r = Records(tmp_path / "executor.db")
    await r.open()
    yield r
    await r.close()


async def test_a_network_in_use_is_not_removed_and_pods_need_one_that_exists(
        records: Records) -> None:
    store = NetworkStore(records.db)
    with pytest.raises(Invalid, match="unknown network 'blue'"):
        await records.put_sandbox(SandboxRecord(id="p1", network="blue"))
    assert await records.sandbox("p1") is None
    made = await store.create(record("blue", "10.237.0.0/24"), no_check)
    assert await store.create(record("blue", "10.237.0.0/24"), no_check) == made  # a retry
    with pytest.raises(AlreadyExists):
        await store.create(record("blue", "10.237.9.0/24", request_id="r2"), no_check)

    def refuse(rows: list[NetworkRecord]) -> None:
        raise Invalid(f"overlaps {rows[0].subnet}")

    with pytest.raises(Invalid, match=r"overlaps 10\.237\.0\.0/24"):
        await store.create(record("green", "10.237.0.0/25"), refuse)
    assert [n.name for n in await store.all()] == ["blue"]

    await records.put_sandbox(SandboxRecord(id="p1", network="blue", pod="default/a",
                                            netns_name="shoal-p1", ips=["10.237.0.2"]),
                              claim_netns=True)
    with pytest.raises(FailedPrecondition, match=r"in use by pod sandboxes p1 \(default/a\)"):
        await store.remove("blue")
    assert [(m.id, m.ips) for m in await store.members("blue")] == [("p1", ["10.237.0.2"])]
    assert await store.members("") == []
    # A joiner: on the maker's network, while the maker's namespace is claimed.
    await records.put_sandbox(SandboxRecord(id="j1", network="blue", joins="p1"))
    with pytest.raises(FailedPrecondition, match="namespace of pod sandbox p2 is gone"):
        await records.put_sandbox(SandboxRecord(id="j2", joins="p2"))
    # The maker removed first, its claim kept for the joiner: still in use.
    await records.delete_sandbox("p1")
    with pytest.raises(FailedPrecondition, match="j1"):
        await store.remove("blue")
    await records.delete_sandbox("j1")
    with pytest.raises(FailedPrecondition, match=r"p1 \(removed; its network is still held"):
        await store.remove("blue")
    await records.drop_netns_claim("shoal-p1")
    assert (await store.remove("blue")).name == "blue"
    with pytest.raises(NotFound):
        await store.remove("blue")


async def test_claims_say_which_network_and_a_pod_without_one_owes_no_del(
        records: Records) -> None:
    await records.put_sandbox(SandboxRecord(id="n1", network=NO_NETWORK, netns_name="shoal-n1",
                                            netns_path="/var/run/netns/shoal-n1"),
                              claim_netns=True)
    await records.put_sandbox(SandboxRecord(id="d1", netns_name="shoal-d1"), claim_netns=True)
    await records.put_sandbox(SandboxRecord(id="h1"))  # host network: no namespace
    claims = {c.sandbox_id: (c.attached, c.network) for c in await records.netns_claims()}
    assert claims == {"n1": (False, NO_NETWORK), "d1": (True, "")}
    store = NetworkStore(records.db)
    assert [m.id for m in await store.members("")] == ["d1"]


async def test_a_connect_is_recorded_before_cni_and_its_row_outlives_the_sandbox(
        records: Records) -> None:
    store = NetworkStore(records.db)
    await store.create(record("blue", "10.237.0.0/24"), no_check)
    pod = SandboxRecord(id="p1", netns_name="shoal-p1", netns_path="/run/netns/shoal-p1",
                        state=READY)
    with pytest.raises(FailedPrecondition, match="not ready"):
        await records.begin_attachment("p1", "blue")
    await records.put_sandbox(pod, claim_netns=True)
    with pytest.raises(Invalid, match="unknown network 'green'"):
        await records.begin_attachment("p1", "green")
    att, fresh = await records.begin_attachment("p1", "blue")
    assert (att.ifname, att.netns_path, att.attached, fresh) == ("eth1", pod.netns_path,
                                                                  False, True)
    # While its connect runs (its owner alive): no second one, no removal of the network.
    with pytest.raises(FailedPrecondition, match="being connected"):
        await records.begin_attachment("p1", "blue")
    with pytest.raises(FailedPrecondition, match="eth1 being connected"):
        await store.remove("blue")
    assert not att.abandoned()
    second, _ = await records.begin_attachment("p1", "")  # the default network: eth2
    assert second.ifname == "eth2"
    await records.attached(att, ["10.237.0.7"])
    again, fresh = await records.begin_attachment("p1", "blue")  # a retry finds it done
    assert (again.attached, again.ips, fresh) == (True, ["10.237.0.7"], False)
    assert [(m.id, m.ips) for m in await store.members("blue")] == [("p1", ["10.237.0.7"])]
    # A connect whose process died is abandoned: the sweep's, or a retry's to take over.
    await records.db.transaction(lambda c: c.execute(
        "UPDATE attachments SET owner='1:0' WHERE ifname='eth2'"))
    assert [a.abandoned() for a in await records.attachments("p1")] == [False, True]
    taken, fresh = await records.begin_attachment("p1", "")
    assert (taken.ifname, fresh) == ("eth2", False)
    await records.drop_attachment(second)
    # The sandbox gone with CNI DEL still owed: the row stays, the network stays in use.
    await records.delete_sandbox("p1")
    assert [a.ifname for a in await records.attachments()] == ["eth1"]
    assert await store.members("blue") == []
    with pytest.raises(FailedPrecondition, match=r"p1 \(eth1 being connected or removed"):
        await store.remove("blue")
    await records.drop_attachment(att)
    await records.drop_netns_claim("shoal-p1")
    assert (await store.remove("blue")).name == "blue"


async def test_a_database_from_before_networks_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        for script in MIGRATIONS[:2]:
            conn.executescript(script)
        conn.execute("PRAGMA user_version=2")
        conn.execute("INSERT INTO sandboxes VALUES ('old','shoal-old','/var/run/netns/shoal-old',"
                     "'[\"10.88.0.5\"]',42,'ready',1.0,'/d','{}','/shoal','')")
        conn.execute("INSERT INTO netns VALUES ('shoal-old','old','/p','{}',1)")
    records = Records(path)
    await records.open()
    try:
        old = await records.sandbox("old")
        assert old is not None and (old.pid, old.network, old.joins, old.ips) == (
            42, "", "", ["10.88.0.5"])
        assert [(c.name, c.network, c.attached) for c in await records.netns_claims()] == [
            ("shoal-old", "", True)]
        assert [m.id for m in await NetworkStore(records.db).members("")] == ["old"]
    finally:
        await records.close()


@pytest.mark.parametrize(("text", "message"), [
    ("10.0.0.1/24", "has host bits set"), ("10.0.0.0/31", "prefix length"),
    ("10.0.0.0/7", "prefix length"), ("224.1.0.0/16", "not a unicast"),
    ("169.254.0.0/16", "not a unicast"), ("::1/128", "not a unicast"), ("10.0.0.0/33", "subnet"),
])
def test_subnets_refused(text: str, message: str) -> None:
    with pytest.raises(Invalid, match=message):
        parse_subnet(text)


def test_gateways_and_the_configs_written() -> None:
    subnet = parse_subnet("10.237.3.0/24")
    assert parse_gateway("10.237.3.254", subnet) == "10.237.3.254"
    for bad in ("10.237.4.1", "10.237.3.0", "10.237.3.255", "fd00::1", "x"):
        with pytest.raises(Invalid):
            parse_gateway(bad, subnet)
    v6 = NetworkRecord(name="six", id="i", request_id="r", driver="ipvlan",
                       subnet="fd00:237::/64", gateway="fd00:237::1", parent="eth0",
                       bridge="", created_at=0.0)
    doc = conflist(v6, Path("/state/ipam"))
    assert doc["plugins"] == [{"type": "ipvlan", "master": "eth0", "mode": "l2", "ipam": {
        "type": "host-local", "dataDir": "/state/ipam",
        "ranges": [[{"subnet": "fd00:237::/64", "gateway": "fd00:237::1"}]],
        "routes": [{"dst": "::/0", "gw": "fd00:237::1"}]}}]


def test_a_bridge_network_is_masqueraded_by_the_executor_not_per_pod(tmp_path: Path) -> None:
    doc = conflist(record("blue", "10.237.4.0/24"), Path("/state/ipam"))
    assert doc["shoal"] == {"masquerade": True}
    assert doc["plugins"][0]["type"] == "bridge" and doc["plugins"][0]["ipMasq"] is False
    path = tmp_path / "blue.conflist"
    path.write_text(json.dumps(doc))
    net = parse_network(path)
    assert net.masquerade and without_default_route(net).masquerade
    assert masquerade_subnets(net) == [ipaddress.ip_network("10.237.4.0/24")]
    mac = NetworkRecord(name="mac", id="m", request_id="r", driver="macvlan",
                        subnet="10.237.5.0/24", gateway="", parent="eth0", bridge="",
                        created_at=0.0)
    doc = conflist(mac, Path("/state/ipam"))
    assert "shoal" not in doc and "ipMasq" not in doc["plugins"][0]
    path.write_text(json.dumps(doc))
    assert not parse_network(path).masquerade and masquerade_subnets(parse_network(path)) == []
    # An operator's file, or an older Shoal's (the plugin's own ipMasq): used as it is.
    for bad in (None, "yes", 1, [True], {}, {"masquerade": "true"}, {"masquerade": 1},
                {"masquerade": None}):
        bridge = conflist(record("blue", "10.237.4.0/24"), Path("/state/ipam"))
        bridge["shoal"] = bad
        path.write_text(json.dumps(bridge))
        assert parse_network(path).masquerade is False, bad
    del bridge["shoal"]
    path.write_text(json.dumps(bridge))
    assert masquerade_subnets(parse_network(path)) == []


async def test_a_broken_network_file_is_named(tmp_path: Path) -> None:
    cni = Cni(tmp_path, ["/usr/lib/cni"])
    cni.networks_dir.mkdir()
    cni.network_file("blue").write_text('{"name": "blue", "plugins": [{"kind": 1}]}')
    with pytest.raises(FailedPrecondition, match=r"network 'blue'.*blue\.conflist"):
        await asyncio.to_thread(cni.network, "blue")
    with pytest.raises(FailedPrecondition, match="'green'"):
        cni.network("green")
