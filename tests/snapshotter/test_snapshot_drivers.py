"""The snapshotter's domain without processes: snapshot API semantics, both drivers, layer
unpack from an in-process content source (whiteouts, hardlinks across layers, devices,
unsafe layers, diff IDs), identical trees from both drivers, single-flight unpacks, image
references and layer removal, crash cleanup. Runs as root on a real filesystem with real
overlay mounts."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from shoal_common.errors import AlreadyExists, FailedPrecondition, Invalid, NotFound
from shoal_common.messages.images import ContentInfo, LayerInfo
from shoal_common.messages.snapshots import SnapshotCommitted, SnapshotRemoved
from shoal_common.oci import chain_ids
from shoal_snapshotter.domain import metrics
from shoal_snapshotter.domain.drivers import (
    NativeDriver,
    OverlayDriver,
    choose_driver,
    probe_overlay,
)
from shoal_snapshotter.domain.layers import PROCESS_MIN_BYTES
from shoal_snapshotter.domain.snapshots import LABEL_UNPACK
from snapshotter_support import (
    NS,
    UNPACK_PATHS,
    Domain,
    FakeContent,
    eventually,
    mounted,
    mounted_paths,
    open_domain,
    workers_alive,
    zstd_layer,
)
from support.images import Layer, LayerBuilder, busybox_layer

pytestmark = pytest.mark.usefixtures("root")  # mounts, chown, mknod


@pytest.fixture
async def domain(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Domain]:
    async with open_domain(tmp_path / "state", request.param) as d:
        yield d


def by_driver(fn: Any) -> Any:
    return pytest.mark.parametrize("domain", ["overlayfs", "native"], indirect=True)(fn)


# -- test images --------------------------------------------------------------------------

def whiteout_layers() -> list[Layer]:
    l1 = (LayerBuilder().dir("etc").file("etc/a", "a").file("etc/b", "b")
          .dir("dir").file("dir/x", "x").dir("dir/sub").file("dir/sub/y", "y")
          .dir("opq", mode=0o750).file("opq/1", "1").file("opq/2", "2").dir("opq/deep")
          .file("opq/deep/3", "3")
          .dir("gone").file("gone/z", "z").file("keep", "keep"))
    l2 = (LayerBuilder().whiteout("etc/a").opaque("opq").file("opq/new", "new")
          .whiteout("gone").whiteout("dir/sub").file("late", "late"))
    l3 = LayerBuilder().dir("gone", mode=0o700).file("gone/again", "again").whiteout("keep")
    return [l1.build(), zstd_layer(l2), l3.build(compression=None)]


def hardlink_layers() -> list[Layer]:
    l1 = (LayerBuilder().file("a", "A", mode=0o640, uid=7).dir("dir").file("dir/x", "X")
          .file("c", "C"))
    l2 = (LayerBuilder().hardlink("b", "a").dir("dir").hardlink("dir/y", "dir/x")
          .dir("newdir").hardlink("newdir/c2", "c"))
    l3 = LayerBuilder().file("unrelated", "u")
    return [l1.build(), l2.build(), l3.build()]


def device_layers() -> list[Layer]:
    l1 = (LayerBuilder().dir("dev").char_device("dev/null", 1, 3).block_device("dev/sda", 8, 0)
          .fifo("run/fifo", mode=0o600).dir("tmp", mode=0o1777)
          .file("bin/su", "su", mode=0o4755).file("home/app/secret", "s", mode=0o600,
                                                  uid=1000, gid=1000)
          .file("xattr", "x", xattrs={"user.note": "hello"})
          .symlink("abs", "/etc/passwd").symlink("rel", "bin/su").symlink("dangling", "nowhere")
          .file("replaced-by-dir", "f").dir("replaced-by-link").file("replaced-by-link/f", "f"))
    l2 = (LayerBuilder().dir("tmp", mode=0o755, uid=5, gid=6).dir("replaced-by-dir")
          .file("replaced-by-dir/inner", "i").symlink("replaced-by-link", "tmp")
          .char_device("dev/zero", 1, 5, mode=0o640, gid=5))
    return [l1.build(), l2.build(compression=None)]


def lower_dir_layers() -> list[Layer]:
    """What an upper layer keeps of lower directories, and deletions and re-creations inside
    one layer: what a layer applied alone (in parallel) must get right after the fact."""
    l1 = (LayerBuilder().dir("srv", mode=0o750, uid=5, gid=6, xattrs={"user.tag": "lower"})
          .file("srv/old", "o").dir("srv/sub", mode=0o700, uid=7).file("srv/sub/x", "x")
          .dir("etc", xattrs={"user.a": "1", "user.b": "2"}).file("etc/conf", "c")
          .dir("gone", mode=0o711).file("gone/f", "f")
          .dir("recreated", mode=0o700).file("recreated/lower", "l")
          .file("file-then-dir", "f").dir("dir-then-file").file("dir-then-file/x", "x")
          .dir("opq", mode=0o701, uid=3, xattrs={"user.o": "lower"}).file("opq/lower", "l")
          .dir("opq/sub", mode=0o700).file("opq/sub/lower", "l"))
    l2 = (LayerBuilder(sort=False)
          # implied parents: owner, mode and xattrs of the lower directories
          .file("srv/sub/new", "n")
          # listed: its own owner and mode, the lower xattrs it does not set
          .dir("etc", mode=0o755, xattrs={"user.b": "upper"}).file("etc/more", "m")
          # deleted, then implied again in the same layer: a new, empty directory
          .whiteout("gone").file("gone/again", "a")
          # deleted, then listed again in the same layer
          .whiteout("recreated").dir("recreated", mode=0o755).file("recreated/new", "n")
          # a file replaced by a directory and the other way round
          .dir("file-then-dir", mode=0o700).file("file-then-dir/in", "i")
          .file("dir-then-file", "now a file")
          # opaque marker first, then an implied directory below it: nothing from below
          .opaque("opq").file("opq/sub/new", "n"))
    l3 = (LayerBuilder(sort=False)
          .file("srv/sub/top", "t")  # two levels of implied directories over two layers
          .file("file-then-dir/in2", "i2").whiteout("etc/conf"))
    return [l1.build(), l2.build(), l3.build(compression=None)]


def root_opaque_layers() -> list[Layer]:
    # overlayfs ignores an opaque root directory: the layer must be applied onto its parents.
    l1 = LayerBuilder().dir("etc").file("etc/a", "a").file("b", "b")
    l2 = LayerBuilder(sort=False).opaque("").file("kept", "k").dir("etc").file("etc/c", "c")
    return [l1.build(), l2.build(), LayerBuilder().file("top", "t").build()]


IMAGES = {
    "busybox": lambda: [busybox_layer()],
    "whiteouts": whiteout_layers,
    "hardlinks": hardlink_layers,
    "devices": device_layers,
    "lower-dirs": lower_dir_layers,
    "root-opaque": root_opaque_layers,
}


def top_chain(layers: list[Layer]) -> str:
    return chain_ids([layer.diff_id for layer in layers])[-1]


# -- layer semantics, per driver ------------------------------------------------------------

@by_driver
async def test_whiteouts(domain: Domain) -> None:
    layers = whiteout_layers()
    reply = await domain.unpack("whiteouts", layers)
    assert reply.unpacked == 3 and reply.chain_id == top_chain(layers)
    files = await domain.tree_of(reply.chain_id)
    # deleted in an upper layer
    assert "etc/a" not in files and "etc/b" in files
    # opaque directory: lower contents hidden at every depth, own contents and mode kept
    assert sorted(p for p in files if p.startswith("opq/")) == ["opq/new"]
    assert files["opq"]["mode"] == oct(0o750)
    # a directory of a lower layer deleted, nested and at the top, then recreated
    assert "dir/sub" not in files and "dir/sub/y" not in files and "dir/x" in files
    assert sorted(p for p in files if p.startswith("gone")) == ["gone", "gone/again"]
    assert files["gone"]["mode"] == oct(0o700)
    assert "keep" not in files and "late" in files


@by_driver
async def test_hardlinks_across_layers(domain: Domain) -> None:
    layers = hardlink_layers()
    reply = await domain.unpack("hardlinks", layers)
    files = await domain.tree_of(reply.chain_id)
    assert files["b"]["link_of"] == "a" and files["b"]["sha256"] == files["a"]["sha256"]
    assert files["b"]["uid"] == 7 and files["b"]["mode"] == oct(0o640)
    assert files["dir/y"]["link_of"] == "dir/x"
    assert files["newdir/c2"]["link_of"] == "c"


@by_driver
async def test_devices_modes_owners(domain: Domain) -> None:
    reply = await domain.unpack("devices", device_layers())
    files = await domain.tree_of(reply.chain_id)
    assert files["dev/null"]["type"] == stat.S_IFCHR and files["dev/null"]["rdev"] == (1, 3)
    assert files["dev/sda"]["type"] == stat.S_IFBLK and files["dev/sda"]["rdev"] == (8, 0)
    assert files["dev/zero"]["rdev"] == (1, 5) and files["dev/zero"]["gid"] == 5
    assert files["run/fifo"]["type"] == stat.S_IFIFO
    assert files["bin/su"]["mode"] == oct(0o4755)
    assert (files["home/app/secret"]["uid"], files["home/app/secret"]["mode"]) == (1000, "0o600")
    assert files["xattr"]["xattrs"] == {"user.note": b"hello".hex()}
    assert files["abs"]["target"] == "/etc/passwd" and files["dangling"]["target"] == "nowhere"
    # a directory entry over a lower directory changes its metadata
    assert (files["tmp"]["mode"], files["tmp"]["uid"], files["tmp"]["gid"]) == ("0o755", 5, 6)
    assert files["replaced-by-dir"]["type"] == stat.S_IFDIR
    assert files["replaced-by-link"]["target"] == "tmp"
    assert "replaced-by-link/f" not in files


# -- both drivers agree ---------------------------------------------------------------------

@pytest.mark.parametrize("image", sorted(IMAGES))
async def test_overlay_and_native_give_identical_trees(tmp_path: Path, image: str) -> None:
    layers = IMAGES[image]()
    trees = {}
    for driver in ("overlayfs", "native"):
        async with open_domain(tmp_path / driver / "state", driver) as d:
            reply = await d.unpack(image, layers)
            assert reply.unpacked == len(layers)
            # Hardlink identity is compared by the per-driver tests: overlayfs (index=off)
            # keeps it for links made by one layer, but a later copy-up splits a link group.
            trees[driver] = await d.tree_of(reply.chain_id, links=False)
    assert len(trees["native"]) > 3
    assert trees["overlayfs"] == trees["native"]


# -- unpack failures ------------------------------------------------------------------------

@by_driver
async def test_unsafe_layer_is_refused_and_thrown_away(domain: Domain, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("root")
    good = LayerBuilder().file("ok", "ok").build()
    # The symlink out is followed inside the root; the `..` name is refused.
    evil = (LayerBuilder(sort=False).symlink("etc", str(outside)).file("etc/passwd", "mine")
            .file("../outside/passwd", "owned"))
    layers = [good, evil.build()]
    with pytest.raises(Invalid) as err:
        await domain.unpack("evil:latest", layers)
    assert "../outside/passwd" in err.value.message and "evil:latest" in err.value.message
    assert err.value.details["entry"] == "../outside/passwd"
    assert (outside / "passwd").read_text() == "root"
    snaps = await domain.snapshots.list_snapshots()
    assert [(s.key, s.kind) for s in snaps] == [(good.diff_id, "committed")]
    assert sorted(p.name for p in (domain.root / "snapshots").iterdir()) == ["1"]
    assert not mounted_paths(domain.root)


@by_driver
async def test_wrong_diff_id_is_refused(domain: Domain) -> None:
    layer = LayerBuilder().file("f", "x").build()
    bad = LayerInfo(digest=layer.digest, diff_id="sha256:" + "0" * 64,
                    chain_id="sha256:" + "0" * 64, size=layer.size, media_type=layer.media_type)
    with pytest.raises(Invalid, match="diff ID"):
        await domain.images.unpack(NS, "img", [bad], FakeContent([layer]))
    assert await domain.snapshots.list_snapshots() == []
    wrong_chain = LayerInfo(digest=layer.digest, diff_id=layer.diff_id,
                            chain_id="sha256:" + "1" * 64, size=layer.size,
                            media_type=layer.media_type)
    with pytest.raises(Invalid, match="chain ID"):
        await domain.images.unpack(NS, "img", [wrong_chain], FakeContent([layer]))


@by_driver
async def test_missing_content_and_corrupt_blob(domain: Domain) -> None:
    layer = LayerBuilder().file("f", "x" * 1000).build()
    with pytest.raises(NotFound, match="not found"):
        await domain.unpack("img", [layer], FakeContent())
    content = FakeContent([layer])
    content.blobs[layer.digest] = layer.blob[:-20] + b"\0" * 20  # same size, broken gzip
    with pytest.raises(Invalid):
        await domain.unpack("img", [layer], content)
    assert await domain.snapshots.list_snapshots() == []


@by_driver
async def test_cancelled_unpack_leaves_nothing(domain: Domain) -> None:
    big = LayerBuilder().file("big", os.urandom(3 << 20)).build(compression=None)
    content = FakeContent([big])
    content.delay = 0.05
    task = asyncio.create_task(domain.unpack("img", [big], content))
    await eventually(lambda: content.reads[big.digest], what="first read")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await domain.snapshots.list_snapshots() == []
    assert list((domain.root / "snapshots").iterdir()) == []
    content.delay = 0
    assert (await domain.unpack("img", [big], content)).unpacked == 1


async def test_blob_files_on_this_machine_are_read_directly(tmp_path: Path) -> None:
    """Where the content store names a blob file this process can open with the right size,
    the unpack reads it (a worker process takes it as stdin, a thread reads it): no chunk
    comes over the bus. A file of the wrong size, or none, falls back to the bus."""
    big = LayerBuilder().file("big", os.urandom(5 << 20)).build(compression=None)
    small = LayerBuilder().file("small", b"s" * 1000).symlink("link", "small").build()
    content = FakeContent([big, small], files=tmp_path / "blobs")
    async with open_domain(tmp_path / "state", "overlayfs") as d:
        assert (await d.unpack("img", [big, small], content)).unpacked == 2
        assert content.reads == {}
        seen = await d.tree_of(top_chain([big, small]))
        assert seen["small"]["sha256"] == hashlib.sha256(b"s" * 1000).hexdigest()
        assert seen["link"]["target"] == "small"
        assert "big" in seen
        # Truncated (not the committed blob any more) and missing: read over the bus.
        other = LayerBuilder().file("other", os.urandom(5 << 20)).build(compression=None)
        gone = LayerBuilder().file("gone", b"g").build()
        content.add(other, gone)
        content.path(other.digest).write_bytes(other.blob[:100])
        content.path(gone.digest).unlink()
        assert (await d.unpack("img2", [other, gone], content)).unpacked == 2
        assert content.full_reads(other) == 1 and content.reads[gone.digest] == 1
        # A path that is not the content store's file of that digest is never opened.
        third = LayerBuilder().file("third", b"3").build()
        content.add(third)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.write_bytes(third.blob)
        real_info = content.info

        async def pointing_elsewhere(digest: str) -> ContentInfo:
            info = await real_info(digest)
            return ContentInfo(digest=info.digest, size=info.size, path=str(elsewhere))

        content.info = pointing_elsewhere  # type: ignore[method-assign]
        assert (await d.unpack("img3", [third], content)).unpacked == 1
        assert content.reads[third.digest] == 1


async def test_concurrent_unpacks_of_one_chain_do_the_work_once(tmp_path: Path) -> None:
    layers = [LayerBuilder().file("a", os.urandom(1 << 20)).build(),
              LayerBuilder().file("b", os.urandom(1 << 20)).build()]
    content = FakeContent(layers)
    content.delay = 0.01
    async with open_domain(tmp_path / "state", "overlayfs") as d:
        replies = await asyncio.gather(*(d.unpack(f"img{i}", layers, content) for i in range(4)))
        assert sum(r.unpacked for r in replies) == 2
        assert {r.chain_id for r in replies} == {top_chain(layers)}
        assert all(content.full_reads(layer) == 1 for layer in layers)
        assert d.committed(SnapshotCommitted) == chain_ids([x.diff_id for x in layers])


# -- the snapshot API -----------------------------------------------------------------------

@by_driver
async def test_snapshot_api_semantics(domain: Domain) -> None:
    s = domain.snapshots
    m1 = await s.prepare("c1", "", {"a": "b"})
    assert await s.prepare("c1", "", {}) == m1  # idempotent retry
    with pytest.raises(NotFound):
        await s.prepare("c2", "missing", {})
    with pytest.raises(FailedPrecondition):
        await s.prepare("c2", "c1", {})  # parent not committed
    with pytest.raises(Invalid):
        await s.prepare("", "", {})
    with pytest.raises(Invalid):
        await s.prepare("x", "", {LABEL_UNPACK: "y"})
    target = domain.root.parent / "m1"
    with mounted(m1, target):
        (target / "file").write_text("hi")
    layer = await s.commit("layer1", "c1", {"l": "1"})
    assert (layer.kind, layer.parent, layer.labels) == ("committed", "", {"l": "1"})
    assert await s.commit("layer1", "c1", {}) == layer  # a retried commit
    with pytest.raises(AlreadyExists):
        await s.prepare("layer1", "", {})
    with pytest.raises(FailedPrecondition):
        await s.mounts("layer1")
    m2 = await s.prepare("c2", "layer1", {})
    assert await s.mounts("c2") == m2
    with pytest.raises(AlreadyExists):
        await s.prepare("c2", "", {})  # same key, other parent
    v = await s.view("v1", "layer1", {})
    with mounted(v, domain.root.parent / "v1") as target:
        assert (target / "file").read_text() == "hi"
        with pytest.raises(OSError):
            (target / "new").write_text("no")
    with pytest.raises(FailedPrecondition):
        await s.commit("other", "v1", {})  # views cannot be committed
    with pytest.raises(AlreadyExists):
        await s.commit("layer1", "c2", {})
    with pytest.raises(FailedPrecondition):
        await s.remove("layer1", NS)  # has children
    assert {x.key for x in await s.list_snapshots(parent="layer1")} == {"c2", "v1"}
    assert [x.key for x in await s.list_snapshots(kind="committed")] == ["layer1"]
    with pytest.raises(Invalid):
        await s.list_snapshots(kind="bogus")
    info = await s.stat("c2")
    assert (info.kind, info.parent) == ("active", "layer1")
    usage = await s.usage("layer1")
    assert usage.inodes == 2 and usage.size >= 2  # fs/ and the file
    for key in ("c2", "v1", "layer1"):
        await s.remove(key, NS)
    with pytest.raises(NotFound):
        await s.stat("layer1")
    assert domain.committed(SnapshotRemoved) == ["layer1"]
    assert sorted(p.name for p in (domain.root / "snapshots").iterdir()) == []


async def test_mount_shapes(tmp_path: Path) -> None:
    root = tmp_path / "snapshots"
    d = [root / str(i) for i in range(4)]
    overlay = OverlayDriver([])
    assert overlay.mounts(d[0], [], readonly=False)[0].options == ["rbind", "rw"]
    assert overlay.mounts(d[0], [], readonly=True)[0].options == ["rbind", "ro"]
    one = overlay.mounts(d[1], [d[0]], readonly=True)[0]
    assert (one.type, one.source, one.options) == ("bind", f"{d[0]}/fs", ["rbind", "ro"])
    view = overlay.mounts(d[3], [d[2], d[1]], readonly=True)[0]
    assert (view.type, view.options) == ("overlay", ["index=off",
                                                     f"lowerdir={d[2]}/fs:{d[1]}/fs"])
    rw = overlay.mounts(d[3], [d[2], d[1], d[0]], readonly=False)[0]
    assert (rw.type, rw.source) == ("overlay", "overlay")
    assert rw.options == ["index=off", f"lowerdir={d[2]}/fs:{d[1]}/fs:{d[0]}/fs",
                          f"upperdir={d[3]}/fs", f"workdir={d[3]}/work"]
    native = NativeDriver()
    assert native.mounts(d[3], [d[2]], readonly=False)[0].options == ["rbind", "rw"]
    assert native.mounts(d[3], [d[2]], readonly=True)[0].source == f"{d[3]}/fs"


async def test_driver_choice(tmp_path: Path) -> None:
    assert probe_overlay(tmp_path).ok
    assert list(tmp_path.iterdir()) == []  # the probe cleans up
    assert choose_driver("auto", tmp_path, None, False).name == "overlayfs"
    assert choose_driver("auto", tmp_path, "native", True).name == "native"
    with pytest.raises(FailedPrecondition, match="made by 'native'"):
        choose_driver("overlayfs", tmp_path, "native", True)
    with pytest.raises(FailedPrecondition):
        choose_driver("zfs", tmp_path, None, False)
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert choose_driver("auto", odd, None, False).name == "native"


# -- image references and layer removal -------------------------------------------------------

async def test_layers_go_with_their_last_image(tmp_path: Path) -> None:
    base = LayerBuilder().file("base", "b").build()
    a_top = LayerBuilder().file("a", "a").build()
    b_top = LayerBuilder().file("b", "b").build()
    chain_a = chain_ids([base.diff_id, a_top.diff_id])
    chain_b = chain_ids([base.diff_id, b_top.diff_id])
    async with open_domain(tmp_path / "state", "overlayfs") as d:
        await d.unpack("a:1", [base, a_top], seq=1)
        await d.unpack("a:alias", [base, a_top], seq=2)
        await d.unpack("b:1", [base, b_top], seq=3)
        assert await d.images.delete(NS, "a:1", seq=4) == []  # a:alias still uses them
        assert await d.images.delete(NS, "a:alias", seq=5) == [chain_a[1]]
        # A container on b's top keeps it (and its parents) past b's deletion...
        await d.snapshots.prepare("ctr", chain_b[1], {})
        assert await d.images.delete(NS, "b:1", seq=6) == []
        # ...until the container's snapshot goes.
        await d.snapshots.remove("ctr", NS)
        assert await d.snapshots.list_snapshots() == []
        assert d.committed(SnapshotRemoved) == [chain_a[1], chain_b[1], chain_b[0]]
        # A late redelivery of b's create (older than its delete) changes nothing.
        assert await d.unpack("b:1", [base, b_top], seq=3) is None
        assert await d.snapshots.list_snapshots() == []
        # An update re-points a name: the layers only the old version used go.
        await d.unpack("c:1", [base, a_top], seq=10)
        await d.unpack("c:1", [base, b_top], seq=11)
        assert {s.key for s in await d.snapshots.list_snapshots()} == set(chain_b)


# -- crash cleanup --------------------------------------------------------------------------

@by_driver
async def test_startup_cleanup_after_a_crash(domain: Domain) -> None:
    base = LayerBuilder().file("base", "b").build()
    await domain.unpack("img", [base])
    # What a process killed mid-unpack leaves: an active unpack snapshot, mounted (overlay),
    # with files in it; plus a half-built directory and a half-deleted one.
    chain = "sha256:" + "9" * 64
    row, parents = await domain.snapshots.create("unpack/dead", base.diff_id, "active",
                                                 {LABEL_UNPACK: chain})
    snap_dir = domain.snapshots.snap_dir(row.id)
    cm = domain.snapshots.driver.apply_root(snap_dir, [domain.snapshots.snap_dir(p.id)
                                                       for p in parents])
    applied = await cm.__aenter__()
    (applied / "half").write_text("half")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (domain.root / "snapshots" / f"77.tmp-{dead.pid}-x" / "fs").mkdir(parents=True)
    (domain.root / "snapshots" / "78" / "fs").mkdir(parents=True)
    (domain.root / "trash" / "5-x" / "fs").mkdir(parents=True)
    # A live unpack (lock held) is left alone.
    live, _ = await domain.snapshots.create("unpack/live", base.diff_id, "active",
                                            {LABEL_UNPACK: "sha256:" + "8" * 64})
    fd = domain.locks.try_acquire("sha256:" + "8" * 64)
    assert fd is not None
    try:
        await domain.snapshots.cleanup(domain.locks, NS)
    finally:
        domain.locks.release(fd)
    assert {s.key for s in await domain.snapshots.list_snapshots()} == {base.diff_id, "unpack/live"}
    assert sorted(p.name for p in (domain.root / "snapshots").iterdir()) == ["1", str(live.id)]
    assert list((domain.root / "trash").iterdir()) == []
    assert not mounted_paths(domain.root)
    # the committed layer is intact
    assert (await domain.tree_of(base.diff_id))["base"]["sha256"]


async def test_usage_counts_blocks_and_inodes_once(tmp_path: Path) -> None:
    layer = (LayerBuilder().file("data", os.urandom(256 * 1024)).hardlink("link", "data")
             .build())
    async with open_domain(tmp_path / "state", "native") as d:
        await d.unpack("img", [layer])
        usage = await d.snapshots.usage(layer.diff_id)
        assert usage.inodes == 2  # fs/ and one file with two names
        assert 256 * 1024 <= usage.size < 256 * 1024 + 64 * 1024


# -- parallel unpack (overlayfs) ------------------------------------------------------------

def reapplied() -> float:
    return metrics.LAYERS_REAPPLIED._value.get()  # type: ignore[attr-defined]


async def committed_parents(d: Domain) -> dict[str, str]:
    return {s.key: s.parent for s in await d.snapshots.list_snapshots(kind="committed")}


@pytest.mark.parametrize("image", sorted(IMAGES))
async def test_parallel_unpack_matches_sequential_and_native(tmp_path: Path, image: str) -> None:
    layers = IMAGES[image]()
    trees = {}
    for name, driver, workers, in_process in UNPACK_PATHS:
        async with open_domain(tmp_path / name / "state", driver, workers=workers,
                               process_min_bytes=in_process) as d:
            reply = await d.unpack(image, layers)
            assert reply.unpacked == len(layers)
            trees[name] = await d.tree_of(reply.chain_id, links=False)
            chains = chain_ids([x.diff_id for x in layers])
            assert await committed_parents(d) == dict(zip(chains, ["", *chains[:-1]],
                                                          strict=True))
            assert await d.snapshots.list_snapshots(kind="active") == []
    assert trees["parallel"] == trees["native"]  # layers applied in worker processes
    assert trees["sequential"] == trees["native"]  # in threads


@by_driver
async def test_lower_directories_and_deletions_inside_a_layer(domain: Domain) -> None:
    reply = await domain.unpack("lower-dirs", lower_dir_layers())
    files = await domain.tree_of(reply.chain_id)

    def meta(path: str) -> tuple[str, int, int, dict[str, str]]:
        rec = files[path]
        return rec["mode"], rec["uid"], rec["gid"], rec["xattrs"]

    assert meta("srv") == ("0o750", 5, 6, {"user.tag": b"lower".hex()})
    assert meta("srv/sub")[:2] == ("0o700", 7)
    assert sorted(p for p in files if p.startswith("srv/")) == [
        "srv/old", "srv/sub", "srv/sub/new", "srv/sub/top", "srv/sub/x"]
    assert meta("etc") == ("0o755", 0, 0, {"user.a": b"1".hex(), "user.b": b"upper".hex()})
    assert sorted(p for p in files if p.startswith("etc/")) == ["etc/more"]
    assert sorted(p for p in files if p.startswith("gone")) == ["gone", "gone/again"]
    assert meta("gone")[:2] == ("0o755", 0)
    assert sorted(p for p in files if p.startswith("recreated")) == ["recreated",
                                                                     "recreated/new"]
    assert files["file-then-dir"]["type"] == stat.S_IFDIR
    assert sorted(p for p in files if p.startswith("file-then-dir/")) == [
        "file-then-dir/in", "file-then-dir/in2"]
    assert files["dir-then-file"]["type"] == stat.S_IFREG
    assert not any(p.startswith("dir-then-file/") for p in files)
    # opaque, with the lower directory's own metadata kept; nothing from below inside it
    assert meta("opq") == ("0o701", 3, 0, {"user.o": b"lower".hex()})
    assert sorted(p for p in files if p.startswith("opq/")) == ["opq/sub", "opq/sub/new"]
    assert meta("opq/sub")[:2] == ("0o755", 0)


async def test_hardlinks_to_lower_layers_fall_back(tmp_path: Path) -> None:
    l1 = LayerBuilder().file("a", "A", mode=0o640, uid=7).dir("deep").file("deep/x", "X")
    l2 = (LayerBuilder().file("big", os.urandom(1 << 20)).hardlink("b", "a")
          .file("c", "C").hardlink("own", "c"))
    l3 = LayerBuilder().dir("deep").hardlink("deep/y", "deep/x").hardlink("b2", "b")
    l4 = LayerBuilder().file("top", "t")
    layers = [l1.build(), l2.build(), l3.build(), l4.build()]
    before = reapplied()
    async with open_domain(tmp_path / "state", "overlayfs") as d:
        reply = await d.unpack("links", layers)
        assert reply.unpacked == 4
        assert reapplied() - before == 2  # l2 and l3; l4 and l1 are applied alone
        chains = chain_ids([x.diff_id for x in layers])
        files = await d.tree_of(chains[1])
        assert files["b"]["link_of"] == "a" and files["b"]["uid"] == 7
        assert files["own"]["link_of"] == "c"
        # On top, l3's copy-up of b (to link b2 to it) splits it from a, as overlayfs does.
        files = await d.tree_of(reply.chain_id)
        assert files["deep/y"]["link_of"] == "deep/x"
        assert files["b2"]["link_of"] == "b" and files["b2"]["sha256"] == files["a"]["sha256"]
        assert d.committed(SnapshotCommitted) == chains
        # A hardlink to nothing at all is still refused once applied onto its parents.
        bad = LayerBuilder().hardlink("h", "etc/missing").build()
        with pytest.raises(Invalid) as err:
            await d.unpack("bad", [layers[0], bad])
        assert err.value.details["entry"] == "h"
        assert await d.snapshots.list_snapshots(kind="active") == []


@by_driver
async def test_a_lower_symlink_out_is_followed_inside_the_root(domain: Domain,
                                                               tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    base = LayerBuilder().symlink("etc", str(outside)).build()
    top = LayerBuilder().file("etc/passwd", "mine").build()
    reply = await domain.unpack("clamped", [base, top])
    files = await domain.tree_of(reply.chain_id)
    assert files["etc"]["target"] == str(outside)
    inside = str(outside).lstrip("/")
    assert files[f"{inside}/passwd"]["sha256"] == hashlib.sha256(b"mine").hexdigest()
    assert list(outside.iterdir()) == []
    assert not mounted_paths(domain.root)


class GatedContent(FakeContent):
    """Reads of one blob wait until `gate` is set."""

    def __init__(self, layers: list[Layer], gated: Layer) -> None:
        super().__init__(layers)
        self.gated = gated.digest
        self.gate = asyncio.Event()

    async def read(self, digest: str, offset: int, size: int) -> bytes:
        if digest == self.gated:
            await self.gate.wait()
        return await super().read(digest, offset, size)


async def test_layers_apply_at_once_and_commit_in_chain_order(tmp_path: Path) -> None:
    layers = [LayerBuilder().file(f"f{i}", os.urandom(1 << 20)).build() for i in range(4)]
    chains = chain_ids([x.diff_id for x in layers])
    content = GatedContent(layers, layers[0])
    async with open_domain(tmp_path / "state", "overlayfs") as d:
        task = asyncio.create_task(d.unpack("img", layers, content))
        # The layers above are read to the end while the bottom one cannot start...
        await eventually(lambda: all(content.full_reads(x) >= 1 for x in layers[1:]),
                         what="upper layers read")
        actives = await d.snapshots.list_snapshots(kind="active")
        assert sorted(s.labels[LABEL_UNPACK] for s in actives) == sorted(chains)
        assert all(s.parent == "" for s in actives)  # prepared before their parents exist
        await asyncio.sleep(0.2)
        # ...and none is committed before the layer below it.
        assert d.committed(SnapshotCommitted) == []
        assert await d.snapshots.list_snapshots(kind="committed") == []
        content.gate.set()
        reply = await task
        assert reply.unpacked == 4
        assert d.committed(SnapshotCommitted) == chains
        assert await committed_parents(d) == dict(zip(chains, ["", *chains[:-1]], strict=True))


@pytest.mark.parametrize("in_process", [PROCESS_MIN_BYTES, 0], ids=["threads", "processes"])
async def test_a_failing_layer_stops_those_above_and_keeps_those_below(
        tmp_path: Path, in_process: int) -> None:
    good = [LayerBuilder().file(f"g{i}", os.urandom(256 << 10)).build() for i in range(2)]
    evil = (LayerBuilder(sort=False).symlink("etc", "/etc").file("../etc/shoal-owned", "x")
            .build())
    above = LayerBuilder().file("above", os.urandom(4 << 20)).build(compression=None)
    layers = [*good, evil, above]
    async with open_domain(tmp_path / "state", "overlayfs", process_min_bytes=in_process) as d:
        with pytest.raises(Invalid) as err:
            await d.unpack("img", layers)
        assert err.value.details["entry"] == "../etc/shoal-owned"
        chains = chain_ids([x.diff_id for x in layers])
        assert d.committed(SnapshotCommitted) == chains[:2]
        assert [(s.key, s.kind) for s in await d.snapshots.list_snapshots()] == [
            (c, "committed") for c in chains[:2]]
        assert len(list((d.root / "snapshots").iterdir())) == 2
        assert not Path("/etc/shoal-owned").exists()


@pytest.mark.parametrize("in_process", [PROCESS_MIN_BYTES, 0], ids=["threads", "processes"])
async def test_cancelled_parallel_unpack_leaves_only_whole_layers(tmp_path: Path,
                                                                  in_process: int) -> None:
    layers = [LayerBuilder().file(f"f{i}", os.urandom(2 << 20)).build(compression=None)
              for i in range(4)]
    content = FakeContent(layers)
    content.delay = 0.05
    async with open_domain(tmp_path / "state", "overlayfs", process_min_bytes=in_process) as d:
        task = asyncio.create_task(d.unpack("img", layers, content))
        await eventually(lambda: all(content.reads[x.digest] for x in layers),
                         what="every layer being read")
        assert len(await d.snapshots.list_snapshots(kind="active")) == 4
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await d.snapshots.list_snapshots(kind="active") == []
        committed = [s.key for s in await d.snapshots.list_snapshots(kind="committed")]
        chains = chain_ids([x.diff_id for x in layers])
        assert committed == chains[:len(committed)]
        assert len(list((d.root / "snapshots").iterdir())) == len(committed)
        assert not mounted_paths(d.root)
        assert not workers_alive(d.root)
        content.delay = 0
        reply = await d.unpack("img", layers, content)
        assert reply.unpacked == 4 - len(committed)
        files = await d.tree_of(chains[-1])
        assert sorted(p for p in files if p.startswith("f")) == ["f0", "f1", "f2", "f3"]


async def test_worker_process_errors_map_like_thread_errors(tmp_path: Path) -> None:
    base = LayerBuilder().file("f", "x" * 1000).build()
    corrupt = FakeContent([base])
    corrupt.blobs[base.digest] = base.blob[:-20] + b"\0" * 20  # same size, broken gzip
    async with open_domain(tmp_path / "state", "overlayfs", process_min_bytes=0) as d:
        with pytest.raises(Invalid, match="corrupt gzip"):
            await d.unpack("img", [base], corrupt)
        bad = LayerBuilder().file("g", "y").build()
        wrong = LayerInfo(digest=bad.digest, diff_id=base.diff_id, chain_id=base.diff_id,
                          size=bad.size, media_type=bad.media_type)
        with pytest.raises(Invalid, match="diff ID"):
            await d.images.unpack(NS, "img", [wrong], FakeContent([bad]))
        evil = LayerBuilder(sort=False).symlink("etc", "/etc").file("../etc/x", "x").build()
        with pytest.raises(Invalid) as err:
            await d.unpack("evil", [evil])
        assert err.value.details["entry"] == "../etc/x"
        assert await d.snapshots.list_snapshots() == []
        assert not workers_alive(d.root)


class DownloadingContent(FakeContent):
    """Every blob still downloading: `info` names its ingest file, which holds `ingested`
    (whole: the watch lets the follower read it all at once)."""

    def __init__(self, layer: Layer, ingested: bytes, files: Path) -> None:
        super().__init__([layer])
        self.ingest = files / "ingest" / f"{layer.digest.split(':')[1]}.data"
        self.ingest.parent.mkdir(parents=True)
        self.ingest.write_bytes(ingested)

    async def info(self, digest: str) -> ContentInfo:
        return ContentInfo(digest=digest, size=await self.size(digest), path=str(self.ingest),
                           committed=False)


@pytest.mark.parametrize("process_min_bytes", [0, PROCESS_MIN_BYTES], ids=["process", "thread"])
async def test_a_followed_download_becomes_a_layer_only_with_its_diff_id(
        tmp_path: Path, process_min_bytes: int) -> None:
    """What a followed download decompresses to decides: another valid gzip of the blob's size
    (a registry's other bytes) is refused by its diff ID; the blob itself is committed."""
    noise = random.Random(14).randbytes(20_000)  # fixed: the search below always ends
    layer = LayerBuilder().file("f", noise).file("g", "kept").build()
    # A valid tar with one byte of f changed (another diff ID) whose gzip is as long as the
    # blob: a follower reads the manifest's size.
    start = layer.tar.index(noise)
    candidates = (Layer.from_tar(layer.tar[:at] + bytes([layer.tar[at] ^ 1]) +
                                 layer.tar[at + 1:]) for at in range(start, start + 20_000, 97))
    other = next(c for c in candidates if len(c.blob) == len(layer.blob))
    async with open_domain(tmp_path / "state", "overlayfs",
                           process_min_bytes=process_min_bytes) as d:
        forged = DownloadingContent(layer, other.blob, tmp_path / "forged")
        with pytest.raises(Invalid, match=f"uncompresses to diff ID {other.diff_id}"):
            await d.unpack("img", [layer], forged)
        assert await d.snapshots.list_snapshots() == []
        reply = await d.unpack("img", [layer], DownloadingContent(layer, layer.blob,
                                                                  tmp_path / "real"))
        assert reply.unpacked == 1
        (applied,) = (d.root / "snapshots").glob("*/fs/g")
        assert applied.read_text() == "kept"
