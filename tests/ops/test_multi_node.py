"""Two Shoal nodes sharing one three-server NATS cluster: commands reach only the addressed
node, and `shoal events --all-nodes` shows the events of both."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from shoal_common.bus import Bus
from shoal_common.config import load_config
from shoal_common.errors import ShoalError
from shoal_common.messages import PingReply, PingRequest
from shoal_common.messages.images import PullReply, PullRequest
from support.images import LayerBuilder, build_image, push
from support.ports import free_port
from support.processes import SHOAL, Node, ServiceSet
from support.registry import Registry

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
NATS = str(Path(sys.executable).parent / "nats-server")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """deploy/nats/cluster/node-*.conf, moved to free ports and a temp store."""
    root = tmp_path_factory.mktemp("cluster")
    ports = [free_port() for _ in range(3)]
    routes = [free_port() for _ in range(3)]
    procs = []
    for i in range(3):
        text = (REPO / "deploy" / "nats" / "cluster" / f"node-{i + 1}.conf").read_text()
        text = re.sub(r"port: \d+", f"port: {ports[i]}", text)
        text = re.sub(r"store_dir: \S+", f"store_dir: {root}/js-{i}", text)
        text = re.sub(r"listen: 127.0.0.1:\d+", f"listen: 127.0.0.1:{routes[i]}", text)
        text = re.sub(r"routes: \[.*\]", "routes: [" + ", ".join(
            f"nats-route://127.0.0.1:{r}" for r in routes) + "]", text)
        conf = root / f"node-{i}.conf"
        conf.write_text(text)
        log = open(root / f"node-{i}.log", "wb")
        procs.append((subprocess.Popen([NATS, "-c", str(conf)], stdout=log, stderr=log), log))
    try:
        for port in ports:
            end = time.monotonic() + 15
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    assert time.monotonic() < end, "cluster member did not start"
                    time.sleep(0.1)
        time.sleep(2)  # routes and the JetStream meta leader
        yield [f"nats://127.0.0.1:{p}" for p in ports]
    finally:
        for proc, log in procs:
            proc.terminate()
            proc.wait(timeout=10)
            log.close()


async def test_two_nodes_share_a_cluster_without_crosstalk(
        cluster: list[str], registry: Registry, tmp_path: Path) -> None:
    image = build_image([LayerBuilder().file("multi", uuid.uuid4().bytes).build()])
    push(registry.url, "multi/node", "1", image)
    nodes = [Node(f"mn{i}-{uuid.uuid4().hex[:4]}", cluster[i], tmp_path / f"n{i}")
             for i in range(2)]
    sets = [ServiceSet(n) for n in nodes]
    buses = []
    try:
        for s in sets:
            sp = s.start("puller")
            await asyncio.to_thread(s.wait_serving, sp)
        for n in nodes:
            bus = Bus(load_config(env={}, flags={"node_id": n.node_id, "nats.url": n.nats_url}),
                      service="test", replica=n.node_id)
            await bus.connect(wait=10)
            buses.append(bus)
        # Each node's commands reach that node's replica only, from either server.
        for bus, n in zip(buses, nodes, strict=True):
            reply = await bus.request("images", "ping", PingRequest(), PingReply)
            assert reply.replica == "puller-0"
            other = nodes[1] if n is nodes[0] else nodes[0]
            reply = await bus.request("images", "ping", PingRequest(), PingReply,
                                      node=other.node_id)
            assert reply.replica == "puller-0"
        with pytest.raises(ShoalError, match="no replica"):
            await buses[0].request("images", "ping", PingRequest(), PingReply,
                                   node="nobody", retries=0, attempt_timeout=1)
        for bus in buses:
            await bus.request("images", "pull", PullRequest(
                ref=f"{registry.host}/multi/node:1", pull_id=uuid.uuid4().hex), PullReply,
                namespace="k8s.io", timeout=60, attempt_timeout=60)
        # Each node's content went only to its own store.
        for n in nodes:
            blobs = n.state_root / "puller" / "content" / "blobs" / "sha256"
            assert (blobs / image.layers[0].digest.removeprefix("sha256:")).exists()

        def events(*extra: str) -> list[dict[str, object]]:
            out = subprocess.run(
                [SHOAL, "events", "--node-id", nodes[0].node_id, "--nats-url", cluster[2],
                 "--state-root", str(nodes[0].state_root), "--since", "5m", "--json",
                 "--topic", "images.create", *extra],
                capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            return [json.loads(line) for line in out.stdout.splitlines()]

        mine = await asyncio.to_thread(events)
        every = await asyncio.to_thread(events, "--all-nodes")
        ours = {n.node_id for n in nodes}
        assert {e["node"] for e in mine} == {nodes[0].node_id}
        assert {e["node"] for e in every} & ours == ours
        assert all(e["topic"] == "images.create" for e in every)
        assert {e["event"]["config_digest"] for e in every  # type: ignore[index]
                if e["node"] in ours} == {image.config_digest}
    finally:
        for bus in buses:
            await bus.close()
        for s in sets:
            s.stop_all()
