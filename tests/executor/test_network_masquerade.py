"""The lifetime of the executor's masquerade rules (domain/masquerade.py) through Networks,
as the executor drives it (a real SQLite database, real iptables, no CNI run): ensured at
start and at create, kept over a clean stop while pods are on the network, removed with
the network or with a half-done removal's file."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

from shoal_common.messages.networks import NetworkCreateRequest, NetworkNameRequest
from shoal_executor.domain import masquerade
from shoal_executor.domain.cni import Cni, default_conflist
from shoal_executor.domain.networks import Networks
from shoal_executor.store.networks import NetworkStore
from shoal_executor.store.records import Records, SandboxRecord

DEFAULT, BLUE, GREEN = "10.244.218.0/24", "10.244.217.0/24", "10.244.219.0/24"


def rules(subnet: str) -> int:
    """How many nat rules of the executor's there are for `subnet` (5 when it is set up)."""
    chain = masquerade.chain(ipaddress.ip_network(subnet))
    out = subprocess.run(["iptables", "-w", "-t", "nat", "-S"], capture_output=True,
                         text=True, check=True).stdout
    return sum(chain in line for line in out.splitlines())


async def test_rules_live_with_the_executor_and_the_network(tmp_path: Path) -> None:
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-shoal.conflist").write_text(json.dumps(
        default_conflist(DEFAULT, f"shx{tmp_path.name[-8:]}")))
    records = Records(tmp_path / "executor.db")
    await records.open()
    store = NetworkStore(records.db)
    networks = Networks(Cni(conf_dir, ["/usr/lib/cni"]), store, tmp_path / "ipam", DEFAULT)
    try:
        await networks.reconcile()  # the start
        assert (rules(DEFAULT), rules(BLUE)) == (5, 0)
        await networks.create(NetworkCreateRequest(id="c1", name="blue", subnet=BLUE))
        await networks.create(NetworkCreateRequest(id="c1", name="blue", subnet=BLUE))
        assert rules(BLUE) == 5
        # A pod on the default network: a clean stop keeps its rules, drops blue's (by its
        # record: its file lost meanwhile, as the next start rewrites it).
        await records.put_sandbox(SandboxRecord(id="p1", netns_name="shoal-p1"),
                                  claim_netns=True)
        networks.cni.network_file("blue").unlink()
        await networks.close()
        assert (rules(DEFAULT), rules(BLUE)) == (5, 0)
        await networks.reconcile()
        assert rules(BLUE) == 5 and networks.cni.network_file("blue").exists()
        await networks.remove(NetworkNameRequest(name="blue"))
        assert rules(BLUE) == 0
        # A removal killed after its record went: the next start finishes it.
        await networks.create(NetworkCreateRequest(id="c2", name="green", subnet=GREEN))
        await store.remove("green")
        assert rules(GREEN) == 5
        await networks.reconcile()
        assert rules(GREEN) == 0 and not networks.cni.network_file("green").exists()
        await records.delete_sandbox("p1")
        await records.drop_netns_claim("shoal-p1")
        await networks.close()
        assert rules(DEFAULT) == 0
    finally:
        for subnet in (DEFAULT, BLUE, GREEN):
            await masquerade.remove(ipaddress.ip_network(subnet))
        await records.close()


async def test_an_operators_default_network_gets_no_rules(tmp_path: Path) -> None:
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    doc = default_conflist(DEFAULT, f"shx{tmp_path.name[-8:]}")
    del doc["shoal"]
    doc["plugins"][0]["ipMasq"] = True  # an older Shoal's file: the plugin masquerades
    path = conf_dir / "10-shoal.conflist"
    path.write_text(json.dumps(doc))
    written = path.read_text()
    records = Records(tmp_path / "executor.db")
    await records.open()
    networks = Networks(Cni(conf_dir, ["/usr/lib/cni"]), NetworkStore(records.db),
                        tmp_path / "ipam", DEFAULT)
    try:
        await networks.reconcile()
        assert rules(DEFAULT) == 0 and path.read_text() == written
        await networks.close()
    finally:
        await masquerade.remove(ipaddress.ip_network(DEFAULT))
        await records.close()
