"""The snapshotter as a real process on a real NATS: the snapshot API over the bus, unpack
requests and image events (content served on the bus by a stand-in for the puller, and by
the real puller when it can pull), kill -9 mid-unpack, replicas sharing work."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sqlite3
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.msg import Msg
from shoal_common import codec, subjects
from shoal_common.bus import Bus
from shoal_common.errors import AlreadyExists, FailedPrecondition, Invalid, NotFound
from shoal_common.messages import Empty
from shoal_common.messages.images import ImageCreate, ImageDelete, PullReply, PullRequest
from shoal_common.messages.snapshots import (
    CommitRequest,
    FsUsageReply,
    FsUsageRequest,
    MountsReply,
    PrepareRequest,
    SnapshotCommitted,
    SnapshotInfo,
    SnapshotKeyRequest,
    SnapshotListReply,
    SnapshotListRequest,
    SnapshotRemoved,
    SnapshotUsage,
    UnpackReply,
    UnpackRequest,
    ViewRequest,
)
from snapshotter_support import (
    FakeContent,
    eventually,
    layer_infos,
    mounted,
    mounted_paths,
    node_config,
    serve_content,
    tree,
    workers_alive,
)
from support.images import Layer, LayerBuilder, busybox_image, push
from support.processes import Node, ServiceProcess, ServiceSet

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("root")]  # mounts, chown

NS = "k8s.io"


@pytest.fixture(autouse=True)
def no_mounts_left(node: Node) -> Iterator[None]:
    """Whatever happens, nothing stays mounted under the test's node (so reruns pass)."""
    yield
    for target in sorted(mounted_paths(node.root), key=len, reverse=True):
        os.system(f"umount {target} 2>/dev/null || umount -l {target}")


async def start(services: ServiceSet, replica: str | None = None,
                **settings: str) -> ServiceProcess:
    """A snapshotter with `services.snapshotter.<key>=<value>` settings."""
    extra = [a for k, v in settings.items() for a in ("--set", f"services.snapshotter.{k}={v}")]
    sp = services.start("snapshotter", replica, extra=extra)
    await asyncio.to_thread(services.wait_serving, sp)
    return sp


async def request(bus: Bus, verb: str, msg: object, reply: type, **kw: object) -> object:
    kw.setdefault("timeout", 30)
    kw.setdefault("attempt_timeout", 30)
    return await bus.request("snapshots", verb, msg, reply, namespace=NS, **kw)  # type: ignore[arg-type]


class EventLog:
    """Snapshot events seen on the node (core NATS subscription to the stream's subjects)."""

    def __init__(self) -> None:
        self.committed: list[str] = []
        self.removed: list[str] = []

    async def on_msg(self, msg: Msg) -> None:
        topic = subjects.parse_event(msg.subject)[2]
        if topic == SnapshotCommitted.TOPIC:
            self.committed.append(codec.decode(msg.data, SnapshotCommitted).key)
        elif topic == SnapshotRemoved.TOPIC:
            self.removed.append(codec.decode(msg.data, SnapshotRemoved).key)


async def watch(bus: Bus, node: Node) -> EventLog:
    log = EventLog()
    await bus.nc.subscribe(subjects.event_filter(node.node_id, topic="snapshots.*"),
                           cb=log.on_msg)
    return log


def image_event(name: str, layers: list[Layer]) -> ImageCreate:
    digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
    return ImageCreate(name=name, target_digest=digest, manifest_digest=digest,
                       config_digest=digest, layers=layer_infos(layers))


def metric(sp: ServiceProcess, name: str, **labels: str) -> float | None:
    """A sample from the process's /metrics, matched by name and labels (any label order)."""
    text = urllib.request.urlopen(f"http://{sp.metrics_addr}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        got, _, rest = sample.partition("{")
        if got == name and dict(re.findall(r'(\w+)="([^"]*)"', rest)) == labels:
            return float(value)
    return None


def db_rows(node: Node) -> list[tuple[str, str, str]]:
    conn = sqlite3.connect(f"file:{node.state_root}/snapshotter/metadata.db?mode=ro", uri=True)
    try:
        return list(conn.execute("SELECT key, kind, labels FROM snapshots ORDER BY id"))
    finally:
        conn.close()


async def view_tree(bus: Bus, chain: str, where: Path) -> dict[str, dict[str, object]]:
    key = f"view-{uuid.uuid4().hex[:8]}"
    reply = await request(bus, "view", ViewRequest(key=key, parent=chain), MountsReply)
    assert isinstance(reply, MountsReply)
    try:
        with mounted(reply.mounts, where / key) as target:
            return tree(target)
    finally:
        await request(bus, "remove", SnapshotKeyRequest(key=key), Empty)


# -- the API over the bus -------------------------------------------------------------------

async def test_snapshot_api_over_the_bus(node: Node, services: ServiceSet, bus: Bus) -> None:
    sp = await start(services)
    assert '"driver": "overlayfs"' in sp.log_text()
    m = await request(bus, "prepare", PrepareRequest(key="c1", labels={"x": "y"}), MountsReply)
    assert m == await request(bus, "prepare", PrepareRequest(key="c1"), MountsReply)
    assert isinstance(m, MountsReply) and m.mounts[0].type == "bind"
    with mounted(m.mounts, node.root / "c1") as target:
        (target / "hello").write_text("hello")
    info = await request(bus, "commit", CommitRequest(name="layer", key="c1"), SnapshotInfo)
    assert isinstance(info, SnapshotInfo) and info.kind == "committed"
    with pytest.raises(FailedPrecondition):
        await request(bus, "commit", CommitRequest(name="again", key="layer"), SnapshotInfo)
    m2 = await request(bus, "prepare", PrepareRequest(key="c2", parent="layer"), MountsReply)
    assert isinstance(m2, MountsReply) and m2.mounts[0].type == "overlay"
    with pytest.raises(AlreadyExists):
        await request(bus, "prepare", PrepareRequest(key="c2", parent=""), MountsReply)
    with pytest.raises(NotFound):
        await request(bus, "stat", SnapshotKeyRequest(key="nope"), SnapshotInfo)
    with pytest.raises(FailedPrecondition):
        await request(bus, "remove", SnapshotKeyRequest(key="layer"), Empty)
    assert await request(bus, "mounts", SnapshotKeyRequest(key="c2"), MountsReply) == m2
    listed = await request(bus, "list", SnapshotListRequest(parent="layer"), SnapshotListReply)
    assert isinstance(listed, SnapshotListReply) and [s.key for s in listed.snapshots] == ["c2"]
    usage = await request(bus, "usage", SnapshotKeyRequest(key="layer"), SnapshotUsage)
    assert isinstance(usage, SnapshotUsage) and usage.inodes == 2
    fs = await request(bus, "fsusage", FsUsageRequest(), FsUsageReply)
    assert isinstance(fs, FsUsageReply)
    assert fs.mountpoint == str(node.state_root / "snapshotter")
    assert fs.used_bytes > 0 and fs.inodes_used > 5
    assert metric(sp, "shoal_snapshotter_snapshots", kind="active") == 1.0
    assert metric(sp, "shoal_snapshotter_snapshots", kind="committed") == 1.0
    await request(bus, "remove", SnapshotKeyRequest(key="c2"), Empty)
    await request(bus, "remove", SnapshotKeyRequest(key="layer"), Empty)
    assert sp.terminate() == 0


# -- unpack: requests and events ------------------------------------------------------------

async def test_unpack_by_events_and_requests(node: Node, services: ServiceSet, bus: Bus) -> None:
    base = LayerBuilder().dir("etc").file("etc/os", "shoal").file("etc/gone", "x").build()
    top = LayerBuilder().whiteout("etc/gone").hardlink("etc/os-link", "etc/os").build()
    evil = LayerBuilder(sort=False).symlink("etc", "/etc").file("../etc/shoal-owned", "x").build()
    content = FakeContent([base, top, evil])
    events = await watch(bus, node)
    async with serve_content(node, content):
        sp = await start(services)
        chains = [i.chain_id for i in layer_infos([base, top])]
        await bus.publish_event(image_event("app:1", [base, top]), namespace=NS)
        await eventually(lambda: events.committed == chains, what="snapshots.commit events")
        reply = await request(bus, "unpack", UnpackRequest(
            image="app:alias", layers=layer_infos([base, top])), UnpackReply)
        assert reply == UnpackReply(chain_id=chains[-1], unpacked=0)
        files = await view_tree(bus, chains[-1], node.root)
        assert "etc/gone" not in files and files["etc/os-link"]["link_of"] == "etc/os"

        # An unsafe image is refused, naming the entry and the image, and not retried.
        with pytest.raises(Invalid) as err:
            await request(bus, "unpack", UnpackRequest(
                image="evil:1", layers=layer_infos([evil])), UnpackReply)
        assert "etc/shoal-owned" in err.value.message and "evil:1" in err.value.message
        await bus.publish_event(image_event("evil:2", [evil]), namespace=NS)
        await eventually(lambda: metric(
            sp, "shoal_bus_events_consumed_total", topic="images.create", outcome="term"),
            what="the unsafe image's event terminated")
        assert not Path("/etc/shoal-owned").exists()
        assert [k for k, kind, _ in db_rows(node) if kind != "committed"] == []

        # Deleting names: layers go with the last one.
        await bus.publish_event(ImageDelete(name="app:1", config_digest="x"), namespace=NS)
        await bus.publish_event(ImageDelete(name="app:alias", config_digest="x"), namespace=NS)
        # Both deletes may be handled at once, so the two removals may be announced in
        # either order.
        await eventually(lambda: sorted(events.removed) == sorted(chains),
                         what="snapshots.remove events")
        assert db_rows(node) == []
        assert metric(sp, "shoal_snapshotter_layers_unpacked_total", outcome="unsafe") == 2
    assert sp.terminate() == 0


async def test_kill_9_mid_unpack_then_redelivery_completes_it(
        node: Node, services: ServiceSet, bus: Bus) -> None:
    base = LayerBuilder().file("base", "base").build()
    big_data = os.urandom(48 << 20)
    big = LayerBuilder().file("big", big_data).file("after", "after").build(compression=None)
    content = FakeContent([base, big])
    events = await watch(bus, node)
    chains = [i.chain_id for i in layer_infos([base, big])]
    # One worker: layers are applied one after another, each through a mounted overlay of
    # its parents (the parallel unpack has its own test below).
    env = {"events_ack_wait": "2", "unpack_workers": "1"}
    snaps = node.state_root / "snapshotter" / "snapshots"
    async with serve_content(node, content):
        first = await start(services, **env)
        await bus.publish_event(image_event("big:1", [base, big]), namespace=NS)
        await eventually(lambda: events.committed == chains[:1], what="base layer committed")
        content.delay = 0.1  # slow the big layer down enough to catch it in the middle
        await eventually(lambda: content.reads[big.digest] >= 8, what="big layer being read")
        assert len(list(snaps.iterdir())) == 2
        first.kill9()

        # Dead mid-layer: the big chain is only an active unpack snapshot, its overlay still
        # mounted, half its files written.
        rows = db_rows(node)
        assert [(k, kind) for k, kind, _ in rows if kind == "committed"] == [(chains[0],
                                                                              "committed")]
        assert [kind for k, kind, labels in rows if chains[1] in labels] == ["active"]
        assert chains[1] not in [k for k, _, _ in rows]
        assert mounted_paths(snaps)

        content.delay = 0
        second = await start(services, **env)
        assert "removing unfinished unpack" in second.log_text()
        assert not mounted_paths(snaps)
        # The event the dead process held is redelivered after ack_wait; it completes.
        await eventually(lambda: events.committed == chains, timeout=20,
                         what="big layer committed after redelivery")
        await eventually(lambda: metric(
            second, "shoal_bus_events_consumed_total", topic="images.create",
            outcome="ack"),
            what="event acked")
        rows = db_rows(node)
        assert [(k, kind) for k, kind, _ in rows] == [(c, "committed") for c in chains]
        assert len(list(snaps.iterdir())) == 2
        files = await view_tree(bus, chains[1], node.root)
        assert files["big"]["sha256"] == hashlib.sha256(big_data).hexdigest()
        assert files["after"]["sha256"] == hashlib.sha256(b"after").hexdigest()
    assert second.terminate() == 0


async def test_kill_9_mid_parallel_unpack_leaves_no_half_layer(
        node: Node, services: ServiceSet, bus: Bus) -> None:
    base = LayerBuilder().file("base", "base").build()
    data = [os.urandom(16 << 20) for _ in range(3)]
    bigs = [LayerBuilder().file(f"big{i}", d).file(f"after{i}", "after").build(compression=None)
            for i, d in enumerate(data)]
    layers = [base, *bigs]
    content = FakeContent(layers)
    events = await watch(bus, node)
    chains = [i.chain_id for i in layer_infos(layers)]
    env = {"events_ack_wait": "2"}
    snaps = node.state_root / "snapshotter" / "snapshots"

    def actives() -> list[str]:
        return [labels for _, kind, labels in db_rows(node) if kind == "active"]

    async with serve_content(node, content):
        first = await start(services, **env)
        content.delay = 0.1  # every big layer reads for seconds
        await bus.publish_event(image_event("big:1", layers), namespace=NS)
        await eventually(lambda: all(content.reads[x.digest] >= 4 for x in bigs)
                         and len(actives()) == 3, what="three layers being applied at once")
        assert workers_alive(node.root)  # the big layers are applied in worker processes
        first.kill9()
        # ...which die with the snapshotter, so nothing writes into a snapshot after it.
        await eventually(lambda: not workers_alive(node.root), what="workers gone")

        # Whatever was committed is a bottom run of whole layers; the rest are active unpack
        # snapshots, each labelled with its chain.
        rows = db_rows(node)
        committed = [k for k, kind, _ in rows if kind == "committed"]
        assert committed == chains[:len(committed)] and len(committed) <= 1
        assert sorted(actives()) == sorted(f'{{"shoal/unpack": "{c}"}}' for c in chains[1:])

        content.delay = 0
        second = await start(services, **env)
        assert "removing unfinished unpack" in second.log_text()
        await eventually(lambda: events.committed[-3:] == chains[1:], timeout=30,
                         what="the big layers committed after redelivery")
        assert [(k, kind) for k, kind, _ in db_rows(node)] == [(c, "committed") for c in chains]
        assert len(list(snaps.iterdir())) == len(chains)
        assert not mounted_paths(snaps)
        files = await view_tree(bus, chains[-1], node.root)
        for i, d in enumerate(data):
            assert files[f"big{i}"]["sha256"] == hashlib.sha256(d).hexdigest()
            assert files[f"after{i}"]["sha256"] == hashlib.sha256(b"after").hexdigest()
    assert second.terminate() == 0


def unsynced_marks(node: Node) -> dict[str, str]:
    """Each snapshot's key -> the boot its files were committed unflushed in ('' flushed)."""
    conn = sqlite3.connect(f"file:{node.state_root}/snapshotter/metadata.db?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT key, unsynced_boot FROM snapshots ORDER BY id"))
    finally:
        conn.close()


async def test_layers_flushed_in_the_background_and_torn_ones_removed_after_a_reboot(
        node: Node, services: ServiceSet, bus: Bus) -> None:
    layers = [LayerBuilder().file(f"l{i}", os.urandom(1 << 20)).build() for i in range(3)]
    chains = [i.chain_id for i in layer_infos(layers)]
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    snaps = node.state_root / "snapshotter" / "snapshots"
    content = FakeContent(layers)
    events = await watch(bus, node)
    async with serve_content(node, content):
        # A flush far away: the layers stay committed and marked unflushed while it runs.
        first = await start(services, consume_events="false", flush_delay="600",
                            flush_max_wait="900")
        reply = await request(bus, "unpack", UnpackRequest(image="x:1",
                                                          layers=layer_infos(layers)),
                              UnpackReply)
        assert reply == UnpackReply(chain_id=chains[-1], unpacked=3)
        await request(bus, "prepare", PrepareRequest(key="ctr-rootfs", parent=chains[-1]),
                      MountsReply)
        assert unsynced_marks(node) == {**dict.fromkeys(chains, boot), "ctr-rootfs": ""}
        first.kill9()

        # As a power loss right after the commits would leave it: the middle layer written
        # in an earlier boot and never flushed (the bottom one still of this boot).
        conn = sqlite3.connect(node.state_root / "snapshotter" / "metadata.db")
        with conn:
            conn.execute("UPDATE snapshots SET unsynced_boot = 'an-earlier-boot' WHERE key = ?",
                         (chains[1],))
        conn.close()
        dirs_before = len(list(snaps.iterdir()))
        second = await start(services, consume_events="false", flush_delay="0.2")
        # The torn layer and everything on it are gone, announced; the bottom one is kept
        # and flushed without another commit.
        assert list(unsynced_marks(node)) == chains[:1]
        assert second.log_text().count("layer files may be torn") == 3
        assert sorted(events.removed) == sorted(chains[1:])
        assert len(list(snaps.iterdir())) == dirs_before - 3
        assert metric(second, "shoal_snapshotter_torn_snapshots_removed_total") == 3
        await eventually(lambda: unsynced_marks(node) == {chains[0]: ""},
                         what="the layer of this boot flushed at start")
        # The image's next unpack makes the removed layers again, and flushes them.
        reply = await request(bus, "unpack", UnpackRequest(image="x:1",
                                                          layers=layer_infos(layers)),
                              UnpackReply)
        assert reply == UnpackReply(chain_id=chains[-1], unpacked=2)
        await eventually(lambda: unsynced_marks(node) == dict.fromkeys(chains, ""),
                         what="the new layers flushed")
        assert metric(second, "shoal_snapshotter_flush_seconds_count") == 2
        files = await view_tree(bus, chains[-1], node.root)
        assert sorted(f for f in files if f.startswith("l")) == ["l0", "l1", "l2"]
    assert second.terminate() == 0


async def test_two_processes_unpack_one_chain_once(node: Node, services: ServiceSet,
                                                   bus: Bus) -> None:
    # Two snapshotter processes on one state root, addressed separately (second node id, same
    # files): one unpack request each, at once, for images sharing their layers.
    layers = [LayerBuilder().file("a", os.urandom(4 << 20)).build(compression=None),
              LayerBuilder().file("b", os.urandom(4 << 20)).build(compression=None)]
    content = FakeContent(layers)
    content.delay = 0.02
    twin = Node(f"{node.node_id}b", node.nats_url, node.root)
    twin_services = ServiceSet(twin)
    twin_bus = Bus(node_config(twin), service="test", replica="twin")
    await twin_bus.connect(wait=10)
    try:
        async with serve_content(node, content), serve_content(twin, content):
            env = {"consume_events": "false"}
            one = await start(services, **env)
            two = await start(twin_services, "twin-snapshotter", **env)
            replies = await asyncio.gather(
                request(bus, "unpack", UnpackRequest(image="x:1", layers=layer_infos(layers)),
                        UnpackReply),
                request(twin_bus, "unpack", UnpackRequest(image="x:2",
                                                          layers=layer_infos(layers)),
                        UnpackReply))
            assert sum(r.unpacked for r in replies) == 2  # type: ignore[attr-defined]
            assert all(content.full_reads(layer) == 1 for layer in layers)
            unpacked_logs = one.log_text().count('"layer unpacked"') + two.log_text().count(
                '"layer unpacked"')
            assert unpacked_logs == 2
            assert one.terminate() == 0 and two.terminate() == 0
    finally:
        twin_services.stop_all()
        await twin_bus.close()


async def test_replicas_share_image_events(node: Node, services: ServiceSet, bus: Bus) -> None:
    images = {f"img{i}:1": [LayerBuilder().file("shared", "s").build(),
                            LayerBuilder().file(f"own{i}", os.urandom(1 << 20)).build()]
              for i in range(4)}
    content = FakeContent([layer for layers in images.values() for layer in layers])
    content.delay = 0.01
    events = await watch(bus, node)
    async with serve_content(node, content):
        replicas = [await start(services), await start(services)]
        for name, layers in images.items():
            await bus.publish_event(image_event(name, layers), namespace=NS)
        expected = {c.chain_id for layers in images.values() for c in layer_infos(layers)}
        await eventually(lambda: set(events.committed) == expected, timeout=20,
                         what="every image unpacked")
        assert len(events.committed) == len(expected)  # each chain committed exactly once
        handled = [sp.log_text().count('"image unpacked"') for sp in replicas]
        assert sum(handled) == len(images)
        for sp in replicas:
            assert sp.terminate() == 0


# -- with the real puller -------------------------------------------------------------------

async def test_pull_then_unpack_with_the_real_puller(node: Node, services: ServiceSet, bus: Bus,
                                                     registry: object) -> None:
    image = busybox_image()
    push(registry.url, "snap/busybox", "latest", image)  # type: ignore[attr-defined]
    events = await watch(bus, node)
    puller = services.start("puller")
    await asyncio.to_thread(services.wait_serving, puller)
    await start(services)
    pulled = await bus.request(
        "images", "pull", PullRequest(ref=f"{registry.host}/snap/busybox:latest",  # type: ignore[attr-defined]
                                      pull_id=uuid.uuid4().hex),
        PullReply, namespace=NS, timeout=60, attempt_timeout=60)
    chains = [layer.chain_id for layer in pulled.image.layers]
    await eventually(lambda: events.committed == chains, timeout=30,
                     what="unpacked from the images.create event")
    reply = await request(bus, "unpack", UnpackRequest(image=pulled.image.names[0],
                                                      layers=pulled.image.layers), UnpackReply)
    assert reply == UnpackReply(chain_id=chains[-1], unpacked=0)
    files = await view_tree(bus, chains[-1], node.root)
    assert files["bin/busybox"]["mode"] == oct(0o755)
