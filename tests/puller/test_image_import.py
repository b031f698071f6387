"""`shoal image import` and `export` against a real puller over real NATS: archives in
both layouts go in and come out with their digests, hostile archives are refused with an
error naming what is wrong and leave nothing stored, and the puller itself refuses a client
that skips the CLI's checks (it trusts no client)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from shoal_common.bus import Bus
from shoal_common.clients import ImagesClient
from shoal_common.errors import FailedPrecondition, Invalid
from shoal_common.messages.images import ImageInfo, ImageListRequest
from shoal_common.messages.transfer import (
    ImportAbortRequest,
    ImportBeginRequest,
    ImportBlob,
    ImportCommitRequest,
    ImportImage,
    ImportWriteRequest,
)
from support.archives import (
    blob_name,
    dir_entry,
    docker_entries,
    file_entry,
    oci_entries,
    read_archive,
    special_entry,
    tar_bytes,
    write_archive,
)
from support.images import (
    Image,
    Layer,
    LayerBuilder,
    build_image,
    build_index,
    busybox_image,
    image_from_config,
)
from support.processes import SHOAL, Node, ServiceSet

pytestmark = pytest.mark.e2e

NS = "k8s.io"


def shoal(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SHOAL, *args, *node.flags()], capture_output=True, text=True,
                          timeout=300)


def stored(node: Node) -> tuple[list[str], list[str]]:
    """(committed blobs, ingest files with data) in the puller's content store."""
    content = node.state_root / "puller" / "content"
    blobs = sorted(os.listdir(content / "blobs" / "sha256"))
    return blobs, sorted(p.name for p in (content / "ingest").glob("*.data"))


async def listed(bus: Bus) -> list[ImageInfo]:
    return (await ImagesClient(bus, namespace=NS).list_images(ImageListRequest())).images


@pytest.fixture
async def puller(services: ServiceSet) -> Node:
    sp = services.start("puller")
    await asyncio.to_thread(services.wait_serving, sp)
    return services.node


def small_image(tag: str) -> tuple[Layer, Image]:
    layer = LayerBuilder().file(f"{tag}.txt", f"{tag}\n").build()
    return layer, build_image([layer], cmd=["true"])


async def test_an_oci_layout_is_imported_then_exported_with_the_same_digests(
        puller: Node, bus: Bus, tmp_path: Path) -> None:
    image = busybox_image()
    archive = write_archive(tmp_path / "in.tar", oci_entries([(image, "import.test/bb:1")]))
    done = shoal(puller, "image", "import", str(archive))
    assert done.returncode == 0, done.stderr
    assert "Loaded image: import.test/bb:1" in done.stdout
    [info] = await listed(bus)
    assert (info.id, info.target_digest, info.manifest_digest) == (
        image.config_digest, image.digest, image.digest)
    assert info.names == ["import.test/bb:1", f"import.test/bb@{image.digest}"]
    assert [(layer.digest, layer.diff_id) for layer in info.layers] == [
        (layer.digest, layer.diff_id) for layer in image.layers]

    out = tmp_path / "out.tar"
    done = shoal(puller, "image", "export", str(out), "import.test/bb:1")
    assert done.returncode == 0, done.stderr
    files = read_archive(out)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    [desc] = json.loads(files["index.json"])["manifests"]
    assert desc["digest"] == image.digest
    assert desc["annotations"] == {"io.containerd.image.name": "import.test/bb:1",
                                   "org.opencontainers.image.ref.name": "1"}
    assert json.loads(files["manifest.json"]) == [{
        "Config": blob_name(image.config_digest), "RepoTags": ["import.test/bb:1"],
        "Layers": [blob_name(layer.digest) for layer in image.layers]}]
    for digest, data in [(image.digest, image.manifest_bytes), *image.blobs()]:
        assert files[blob_name(digest)] == data
    # Deterministic: the same image exports to the same bytes.
    again = tmp_path / "again.tar"
    assert shoal(puller, "image", "export", str(again), image.config_digest).returncode == 0
    assert again.read_bytes() == out.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


async def test_a_docker_archive_is_imported_with_a_manifest_made_for_it(
        puller: Node, bus: Bus, tmp_path: Path) -> None:
    image = busybox_image()
    archive = write_archive(tmp_path / "docker.tar.gz", docker_entries(
        [(image, ["busybox:imported", "import.test/other:2"])]), gzipped=True)
    done = shoal(puller, "image", "import", str(archive))
    assert done.returncode == 0, done.stderr
    [info] = await listed(bus)
    assert info.id == image.config_digest
    assert info.repo_tags == ["docker.io/library/busybox:imported", "import.test/other:2"]
    [layer] = info.layers
    # The layer is the uncompressed tar the archive holds: its digest is its diff ID.
    assert (layer.digest, layer.diff_id) == (image.layers[0].diff_id, image.layers[0].diff_id)
    assert layer.media_type == "application/vnd.docker.image.rootfs.diff.tar"
    # Importing it again changes nothing and sends nothing.
    again = shoal(puller, "image", "import", str(archive))
    assert again.returncode == 0 and "sending 0 (0B)" in again.stderr, again.stderr
    assert [i.target_digest for i in await listed(bus)] == [info.target_digest]


async def test_a_tag_only_name_needs_a_base_name(puller: Node, bus: Bus,
                                                tmp_path: Path) -> None:
    _, image = small_image("tagonly")
    archive = write_archive(tmp_path / "t.tar", oci_entries(
        [(image, "v3")], annotation="org.opencontainers.image.ref.name"))
    refused = shoal(puller, "image", "import", str(archive))
    assert refused.returncode == 1
    assert "named only by the tag 'v3'" in refused.stderr and "--base-name" in refused.stderr
    done = shoal(puller, "image", "import", str(archive), "--base-name", "import.test/tagged")
    assert done.returncode == 0, done.stderr
    [info] = await listed(bus)
    assert info.repo_tags == ["import.test/tagged:v3"]


async def test_an_index_imports_the_platform_of_the_node_and_keeps_no_other(
        puller: Node, bus: Bus, tmp_path: Path) -> None:
    amd64, arm64 = small_image("amd64")[1], build_image(
        [LayerBuilder().file("arm", "arm\n").build()], architecture="arm64", variant="v8")
    index = build_index([amd64, arm64])
    entries = oci_entries([(amd64, None), (arm64, None)])[:4]  # layout, dirs: no index.json
    entries[1] = file_entry("index.json", json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": index.media_type, "digest": index.digest,
        "size": len(index.manifest_bytes),
        "annotations": {"io.containerd.image.name": "import.test/multi:1"}}]}).encode())
    blobs = {index.digest: index.manifest_bytes, amd64.digest: amd64.manifest_bytes,
             arm64.digest: arm64.manifest_bytes, **dict(amd64.blobs()), **dict(arm64.blobs())}
    entries += [file_entry(blob_name(d), data) for d, data in blobs.items()]
    done = shoal(puller, "image", "import", str(write_archive(tmp_path / "m.tar", entries)))
    assert done.returncode == 0, done.stderr
    [info] = await listed(bus)
    assert (info.target_digest, info.manifest_digest) == (index.digest, amd64.digest)
    # The other platform was sent (the CLI cannot know the node's platform) and deleted.
    kept = {index.digest, amd64.digest, *(d for d, _ in amd64.blobs())}
    assert stored(puller) == (sorted(d[7:] for d in kept), [])


def _hostile() -> dict[str, tuple[list[tuple[tarfile.TarInfo, bytes | None]], str]]:
    """name -> (archive members, what the error must say)."""
    layer, image = small_image("hostile")
    good = oci_entries([(image, "import.test/hostile:1")])
    manifest_name = blob_name(image.digest)
    other = os.urandom(len(layer.blob))
    bad_diff = image_from_config([layer], {**image.config, "rootfs": {
        "type": "layers", "diff_ids": ["sha256:" + "ab" * 32]}})
    missing = [e for e in good if e[0].name != blob_name(layer.digest)]
    short_index = {"schemaVersion": 2, "manifests": [dict(
        image.descriptor(), size=len(image.manifest_bytes) + 1)]}
    return {
        "traversal": ([*good, file_entry("blobs/../../escape", b"x")], "climbs out"),
        "absolute": ([*good, file_entry("/etc/shoal-escape", b"x")], "absolute name"),
        "symlink out": ([*good, special_entry("blobs/sha256/link", tarfile.SYMTYPE,
                                              "/etc/passwd")], "to the absolute path"),
        "symlink up": ([*good, special_entry("blobs/link", tarfile.SYMTYPE, "../../x")],
                       "climbs out of the archive"),
        "symlink to a dir": ([*good, special_entry("l", tarfile.SYMTYPE, "blobs")],
                             "not a file of the archive"),
        # A blob the manifest names, there only as a link to the blob of another digest.
        "symlinked blob": ([*(e for e in good if e[0].name != blob_name(layer.digest)),
                            file_entry("other", other),
                            special_entry(blob_name(layer.digest), tarfile.SYMTYPE,
                                          "../../other")], "not the one its name"),
        "hardlink": ([*good, special_entry("hard", tarfile.LNKTYPE, "oci-layout")],
                     "hard link"),
        "device": ([*good, special_entry("dev", tarfile.CHRTYPE)], "a device"),
        "fifo": ([*good, special_entry("fifo", tarfile.FIFOTYPE)], "a FIFO"),
        "duplicate": ([*good, file_entry("./index.json", b"{}")], "appears twice"),
        "missing blob": (missing, "does not hold"),
        "wrong digest": ([*(e for e in good if e[0].name != blob_name(layer.digest)),
                          file_entry(blob_name(layer.digest), other)], "not the one its name"),
        "wrong size": ([*(e for e in good if e[0].name != "index.json"),
                        file_entry("index.json", json.dumps(short_index).encode())],
                       "its descriptor says"),
        # A manifest that is not JSON cannot match its digest: the digest is refused first.
        "manifest not json": ([*(e for e in good if e[0].name != manifest_name),
                               file_entry(manifest_name, b"x" * len(image.manifest_bytes))],
                              "not the one its name"),
        "wrong diff id": (oci_entries([(bad_diff, "import.test/hostile:1")]),
                          "unpacks to a tar of digest"),
        "reserved name": (oci_entries([(image, "shoal.local/pause:1")]),
                          "reserved for Shoal's built-in images"),
        "not an archive": ([], "no files"),
    }


@pytest.mark.parametrize("case", list(_hostile()))
async def test_a_hostile_archive_is_refused_naming_what_is_wrong_and_nothing_is_stored(
        case: str, puller: Node, bus: Bus, tmp_path: Path) -> None:
    entries, message = _hostile()[case]
    archive = write_archive(tmp_path / "hostile.tar", entries)
    refused = shoal(puller, "image", "import", str(archive))
    assert refused.returncode == 1, refused.stdout
    assert message in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert await listed(bus) == []
    assert stored(puller) == ([], [])


async def test_a_truncated_archive_and_a_forged_member_size_are_refused(
        puller: Node, bus: Bus, tmp_path: Path) -> None:
    _, image = small_image("truncated")
    whole = write_archive(tmp_path / "whole.tar", oci_entries(
        [(image, "import.test/t:1")])).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[:len(whole) // 2])
    refused = shoal(puller, "image", "import", str(cut))
    assert refused.returncode == 1 and "truncated" in refused.stderr, refused.stderr
    # A header claiming 4 GiB in a file of a few kilobytes.
    info = tarfile.TarInfo("blobs/sha256/huge")
    info.size = 1 << 32
    forged = tmp_path / "forged.tar"
    forged.write_bytes(info.tobuf(tarfile.USTAR_FORMAT) + b"\0" * 4096)
    refused = shoal(puller, "image", "import", str(forged))
    assert refused.returncode == 1 and "forged size" in refused.stderr, refused.stderr
    assert stored(puller) == ([], [])


async def test_a_compressed_archive_bomb_is_refused_before_it_expands(
        puller: Node, tmp_path: Path) -> None:
    """A gzip archive expanding past 1 GiB (1000 times its size): refused while it is read,
    with nothing written anywhere."""
    bomb = tmp_path / "bomb.tar.gz"
    info = tarfile.TarInfo("blobs/sha256/zeros")
    info.size = 1100 << 20
    with gzip.open(bomb, "wb", compresslevel=9) as out:
        out.write(info.tobuf(tarfile.USTAR_FORMAT))
        zeros = b"\0" * (8 << 20)
        for _ in range(info.size // len(zeros)):
            out.write(zeros)
    assert bomb.stat().st_size < 2 << 20
    refused = shoal(puller, "image", "import", str(bomb))
    assert refused.returncode == 1
    assert "refused as a decompression bomb" in refused.stderr, refused.stderr
    assert stored(puller) == ([], [])


async def test_a_layer_bomb_is_refused_by_the_puller_and_its_blobs_deleted(
        puller: Node, bus: Bus, tmp_path: Path) -> None:
    """A zstd layer of a few kilobytes expanding to 300 MiB (past 1100 times its size and
    past the 256 MiB floor): the CLI cannot know, the puller's diff ID check refuses it."""
    expanded = b"\0" * (300 << 20)
    blob = zstandard.ZstdCompressor(level=3).compress(expanded)
    layer = Layer(tar=b"", blob=blob, media_type="application/vnd.oci.image.layer.v1.tar+zstd",
                  diff_id="sha256:" + hashlib.sha256(expanded).hexdigest(),
                  digest="sha256:" + hashlib.sha256(blob).hexdigest(), size=len(blob))
    image = build_image([layer])
    archive = write_archive(tmp_path / "zbomb.tar", oci_entries([(image, "import.test/z:1")]))
    refused = shoal(puller, "image", "import", str(archive))
    assert refused.returncode == 1
    assert "refused as a decompression bomb" in refused.stderr, refused.stderr
    assert await listed(bus) == []
    assert stored(puller) == ([], [])


async def test_the_puller_refuses_a_client_that_skips_the_checks(
        puller: Node, bus: Bus) -> None:
    client = ImagesClient(bus, namespace=NS)
    data = b"some blob"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    write = ImportWriteRequest(import_id="imp1", digest=digest, size=len(data), offset=0,
                               data=data)
    with pytest.raises(FailedPrecondition, match="not part of import imp1"):
        await client.import_write(write)
    begun = await client.import_begin(ImportBeginRequest(
        import_id="imp1", blobs=[ImportBlob(digest=digest, size=len(data))]))
    assert [(p.digest, p.offset) for p in begun.missing] == [(digest, 0)]
    # A gap, then bytes that are not the blob.
    with pytest.raises(FailedPrecondition, match="only 0 bytes are held"):
        await client.import_write(ImportWriteRequest(
            import_id="imp1", digest=digest, size=len(data), offset=4, data=data[4:]))
    with pytest.raises(Invalid, match="content has digest"):
        await client.import_write(ImportWriteRequest(
            import_id="imp1", digest=digest, size=len(data), offset=0, data=b"not it!!!"))
    assert stored(puller) == ([], [])
    # In two chunks, the first sent twice (a retry): held once, then committed.
    first = ImportWriteRequest(import_id="imp1", digest=digest, size=len(data), offset=0,
                               data=data[:4])
    assert (await client.import_write(first)).held == 4
    assert (await client.import_write(first)).held == 4
    done = await client.import_write(ImportWriteRequest(
        import_id="imp1", digest=digest, size=len(data), offset=4, data=data[4:]))
    assert (done.held, done.committed) == (len(data), True)
    # A commit naming blobs the store lacks, or a document that is not a manifest.
    with pytest.raises(Invalid, match="is not in the store"):
        await client.import_commit(ImportCommitRequest(import_id="imp1", images=[ImportImage(
            digest="sha256:" + "cd" * 32, names=["import.test/x:1"])]))
    with pytest.raises(Invalid, match="not JSON"):
        await client.import_commit(ImportCommitRequest(import_id="imp1", images=[ImportImage(
            digest=digest, names=["import.test/x:1"])]))
    # More than the disk holds is refused before a byte is sent.
    with pytest.raises(FailedPrecondition, match=r"needs \d+ bytes in the content store"):
        await client.import_begin(ImportBeginRequest(import_id="imp2", blobs=[
            ImportBlob(digest="sha256:" + "ef" * 32, size=1 << 49)]))
    aborted = await client.import_abort(ImportAbortRequest(import_id="imp1"))
    assert aborted.deleted_blobs == [digest]
    await client.import_abort(ImportAbortRequest(import_id="imp2"))
    assert await listed(bus) == []
    assert stored(puller) == ([], [])


async def test_chunks_of_one_blob_may_reach_any_replica(services: ServiceSet, bus: Bus,
                                                        tmp_path: Path) -> None:
    replicas = [services.start("puller") for _ in range(2)]
    for sp in replicas:
        await asyncio.to_thread(services.wait_serving, sp)
    layer = LayerBuilder().file("big.bin", os.urandom(12 << 20)).build()
    image = build_image([layer], cmd=["true"])
    archive = write_archive(tmp_path / "big.tar", oci_entries([(image, "import.test/big:1")]))
    done = shoal(services.node, "image", "import", str(archive))
    assert done.returncode == 0, done.stderr
    [info] = await listed(bus)
    assert info.layers[0].digest == layer.digest
    # 24 chunks of 512 KiB over two replicas of a queue group: both took some.
    writes = [sp.log_text().count('images.import.write"') for sp in replicas]
    assert all(writes), writes
    blob = services.node.state_root / "puller/content/blobs/sha256" / layer.digest[7:]
    assert blob.read_bytes() == layer.blob


def test_every_member_check_names_the_member(tmp_path: Path) -> None:
    """archive.scan on its own, for what the CLI tests above do not reach."""
    from shoal_cli.archive import ArchiveError, scan

    archive = write_archive(tmp_path / "a.tar", [dir_entry("./"), file_entry("./x", b"1"),
                                                 file_entry("y/../../z", b"2")])
    with pytest.raises(ArchiveError, match=r"'y/\.\./\.\./z' climbs out"):
        scan(archive)
    # Past the members' declared sizes: zeros after the archive's end still count.
    bomb = tmp_path / "b.tar.gz"
    bomb.write_bytes(gzip.compress(tar_bytes([file_entry("x", b"1")]) + b"\0" * (4 << 20)))
    with pytest.raises(ArchiveError, match="gzip archive expands past 1048576 bytes"):
        scan(bomb, max_expanded=1 << 20)
    with pytest.raises(ArchiveError, match="member 'big' says it is 2097152 bytes"):
        scan(write_archive(tmp_path / "c.tar.gz", [file_entry("big", b"\0" * (2 << 20))],
                           gzipped=True), max_expanded=1 << 20)
    contents = scan(write_archive(tmp_path / "d.tar", [dir_entry("./"),
                                                       file_entry("./x", b"1")]))
    assert list(contents.members) == ["x"]
    assert contents.members["x"].digest == "sha256:" + hashlib.sha256(b"1").hexdigest()
