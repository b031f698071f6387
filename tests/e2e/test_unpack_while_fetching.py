"""Unpacking while the pull downloads (images.fetching): real puller and snapshotter
processes, real NATS, a real registry behind a front that holds a layer's body half-way."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import tarfile
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from shoal_common.bus import Bus
from shoal_common.clients import ImagesClient, SnapshotsClient
from shoal_common.errors import Invalid, NotFound
from shoal_common.messages.images import PullRequest
from shoal_common.messages.snapshots import SnapshotKeyRequest, SnapshotListRequest
from shoal_common.oci import chain_ids
from support.faulty_registry import FaultyRegistry
from support.images import Image, LayerBuilder, build_image, push
from support.processes import ServiceSet
from support.registry import Registry
from support.waiting import eventually

pytestmark = pytest.mark.e2e

GRACE = 2.0  # services.snapshotter.fetching_grace here
FILES = 100  # in the big layer, 64 KiB of random bytes each: ~6.5 MB that gzip cannot shrink


def two_layer_image() -> Image:
    small = LayerBuilder().file("etc/small.txt", b"the small layer").build()
    big = LayerBuilder()
    for i in range(FILES):
        big.file(f"big/{i:03}", os.urandom(64 << 10))
    return build_image([small, big.build()], cmd=["true"])


def metric(addr: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def start(services: ServiceSet, *names: str) -> None:
    for sp in [services.start(name, extra=[
            "--set", f"services.snapshotter.fetching_grace={GRACE}"]) for name in names]:
        await asyncio.to_thread(services.wait_serving, sp)


def snapshot_files(services: ServiceSet, rel: str) -> list[Path]:
    return list((services.node.state_root / "snapshotter" / "snapshots").glob(f"*/fs/{rel}"))


async def committed(snaps: SnapshotsClient, chain: str) -> bool:
    try:
        return (await snaps.stat(SnapshotKeyRequest(key=chain))).kind == "committed"
    except NotFound:
        return False


async def snapshot_keys(snaps: SnapshotsClient) -> list[str]:
    return [s.key for s in (await snaps.list_snapshots(SnapshotListRequest())).snapshots]


async def test_a_layer_is_applied_while_it_is_still_downloading(
        services: ServiceSet, registry: Registry, bus: Bus) -> None:
    image = two_layer_image()
    big = image.layers[1]
    push(registry.url, "e2e/streamed", "1", image)
    chains = chain_ids([layer.diff_id for layer in image.layers])
    blob = (services.node.state_root / "puller" / "content" / "blobs" / "sha256" /
            big.digest.removeprefix("sha256:"))
    release = asyncio.Event()
    async with FaultyRegistry(registry.url) as front:
        front.hold(r"/blobs/" + big.digest, big.size // 2, release)
        await start(services, "puller", "snapshotter")
        snaps = SnapshotsClient(bus)
        pull = asyncio.create_task(ImagesClient(bus).pull(PullRequest(
            ref=f"{front.host}/e2e/streamed:1", pull_id=uuid.uuid4().hex)))
        try:
            # Half the blob is in: its first files are already in the layer's snapshot.
            await eventually(lambda: snapshot_files(services, "big/000"), timeout=30,
                             what="the big layer's first file, applied from the download")
            assert not pull.done() and not blob.exists()
            assert not await committed(snaps, chains[1])
            await eventually(lambda: committed(snaps, chains[0]), timeout=30,
                             what="the small layer committed")
        finally:
            release.set()
        await pull
        await eventually(lambda: committed(snaps, chains[1]), timeout=30,
                         what="the big layer committed")
    (applied,) = snapshot_files(services, f"big/{FILES - 1:03}")
    assert applied.read_bytes() == image_file(big.tar, f"big/{FILES - 1:03}")
    snapshotter = next(sp for sp in services if sp.service == "snapshotter")
    addr = snapshotter.metrics_addr
    # The big layer was followed; the small one too, unless its download finished first.
    followed = metric(addr, "shoal_snapshotter_layer_content_reads_total", via="download")
    assert followed >= 1
    assert followed + metric(addr, "shoal_snapshotter_layer_content_reads_total",
                             via="local") == 2
    assert metric(addr, "shoal_snapshotter_fetching_unpacks_total", outcome="ok") == 1
    # The image's own unpack (images.create) found both layers done.
    await eventually(lambda: metric(addr, "shoal_snapshotter_layers_unpacked_total",
                                    outcome="exists") >= 2, what="the image's unpack", timeout=30)
    # After the grace the provisional name goes, the image's name keeps the layers.
    await asyncio.sleep(GRACE + 1.0)
    assert await committed(snaps, chains[1])


async def test_a_pull_that_fails_leaves_no_layer_behind(
        services: ServiceSet, registry: Registry, bus: Bus) -> None:
    image = two_layer_image()
    big = image.layers[1]
    push(registry.url, "e2e/streamed-bad", "1", image)
    async with FaultyRegistry(registry.url) as front:
        front.tamper(r"/blobs/" + big.digest, lambda data: data[:-9] + bytes(
            b ^ 0xFF for b in data[-9:]))
        await start(services, "puller", "snapshotter")
        with pytest.raises(Invalid, match="bad content"):
            await ImagesClient(bus).pull(PullRequest(ref=f"{front.host}/e2e/streamed-bad:1",
                                                     pull_id=uuid.uuid4().hex))
    snapshotter = next(sp for sp in services if sp.service == "snapshotter")
    await eventually(lambda: metric(snapshotter.metrics_addr,
                                    "shoal_snapshotter_fetching_unpacks_total",
                                    outcome="failed") == 1, timeout=30,
                     what="the unpack to fail")
    # The small layer may have been committed meanwhile; once the grace is over nothing
    # names it, and it goes.
    snaps = SnapshotsClient(bus)
    await eventually(lambda: no_snapshots(snaps), what="no snapshot left",
                     timeout=GRACE + 15)
    log = snapshotter.log_text()
    assert "download stopped" in log or "corrupt gzip" in log, log[-2000:]


async def test_a_snapshotter_killed_while_following_a_download_loses_nothing(
        services: ServiceSet, registry: Registry, bus: Bus) -> None:
    image = two_layer_image()
    big = image.layers[1]
    push(registry.url, "e2e/streamed-kill", "1", image)
    chains = chain_ids([layer.diff_id for layer in image.layers])
    release = asyncio.Event()
    async with FaultyRegistry(registry.url) as front:
        front.hold(r"/blobs/" + big.digest, big.size // 2, release)
        await start(services, "puller", "snapshotter")
        pull = asyncio.create_task(ImagesClient(bus).pull(PullRequest(
            ref=f"{front.host}/e2e/streamed-kill:1", pull_id=uuid.uuid4().hex)))
        try:
            await eventually(lambda: snapshot_files(services, "big/000"), timeout=30,
                             what="the big layer being applied")
            victim = next(sp for sp in services if sp.service == "snapshotter")
            os.kill(victim.proc.pid, signal.SIGKILL)
            await asyncio.to_thread(victim.proc.wait, 10)
            await start(services, "snapshotter")
        finally:
            release.set()
        await pull
    snaps = SnapshotsClient(bus)
    # The new replica threw the half-applied layer away and unpacked the image from its
    # images.create event.
    await eventually(lambda: committed(snaps, chains[1]), timeout=30,
                     what="the big layer committed")
    assert sorted(await snapshot_keys(snaps)) == sorted(chains)
    (applied,) = snapshot_files(services, f"big/{FILES - 1:03}")
    assert applied.read_bytes() == image_file(big.tar, f"big/{FILES - 1:03}")


async def no_snapshots(snaps: SnapshotsClient) -> bool:
    return not await snapshot_keys(snaps)


def image_file(tar: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        member = tf.extractfile(name)
        assert member is not None
        return member.read()
