"""The puller process under faults: stalls, dropped connections, kill -9 mid-download,
and garbage collection that never takes a blob from an in-flight pull."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from shoal_common.bus import Bus
from shoal_common.errors import Unavailable
from shoal_common.messages.images import PullReply, PullRequest
from shoal_puller.domain.pull import WRITE_BATCH
from shoal_puller.store.content import ContentStore
from shoal_puller.store.images import ImageStore, ManifestRecord
from support.faulty_registry import FaultyRegistry
from support.images import Image, LayerBuilder, build_image, push
from support.processes import ServiceProcess, ServiceSet
from support.registry import Registry

pytestmark = pytest.mark.e2e


def metric(sp: ServiceProcess, name: str) -> float:
    text = urllib.request.urlopen(f"http://{sp.metrics_addr}/metrics", timeout=5).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name)


def push_big_image(registry: Registry, tag: str) -> tuple[Image, int, str]:
    """A one-layer image pushed as faults/<tag>:1: (image, layer size, its blob's path)."""
    # Random, so gzip cannot shrink it: the blob is ~6 MB on the wire.
    layer = LayerBuilder().file(f"{tag}.bin", os.urandom(6 * 1024 * 1024)).build()
    image = build_image([layer], cmd=["true"])
    push(registry.url, f"faults/{tag}", "1", image)
    return image, layer.size, r"/blobs/sha256:" + layer.digest.split(":")[1]


async def pull(bus: Bus, ref: str, timeout: float = 60) -> PullReply:
    return await bus.request("images", "pull", PullRequest(ref=ref, pull_id=uuid.uuid4().hex),
                             PullReply, namespace="k8s.io", timeout=timeout,
                             attempt_timeout=timeout, retries=0)


async def start_puller(services: ServiceSet, *sets: str) -> ServiceProcess:
    extra = [a for s in sets for a in ("--set", s)]
    sp = services.start("puller", extra=extra)
    await asyncio.to_thread(services.wait_serving, sp)
    return sp


async def test_a_stalled_download_fails_clearly_instead_of_hanging(
        services: ServiceSet, registry: Registry, front: FaultyRegistry, bus: Bus) -> None:
    *_, blob = push_big_image(registry, "stall")
    front.stall(blob, after=200_000, seconds=30)
    await start_puller(services, "services.puller.progress_window=2",
                       "services.puller.min_progress_bytes=10000")
    started = time.monotonic()
    with pytest.raises(Unavailable, match="stalled"):
        await pull(bus, f"{front.host}/faults/stall:1")
    assert time.monotonic() - started < 20


async def test_a_slow_download_that_progresses_is_not_taken_for_a_stall(
        services: ServiceSet, registry: Registry, front: FaultyRegistry, bus: Bus) -> None:
    """A registry sending 200 KB/s, with a 2 s window asking for 100 KB: every window sees
    progress on disk (data waits at most WRITE_AFTER before it reaches the ingest file),
    though far less than a write batch."""
    layer = LayerBuilder().file("slow.bin", os.urandom(900_000)).build()
    image = build_image([layer], cmd=["true"])
    push(registry.url, "faults/slow", "1", image)
    front.trickle(r"/blobs/sha256:" + layer.digest.split(":")[1], 200_000)
    await start_puller(services, "services.puller.progress_window=2",
                       "services.puller.min_progress_bytes=100000")
    reply = await pull(bus, f"{front.host}/faults/slow:1")
    assert reply.image.id == image.config_digest


async def test_dropped_connections_resume_within_a_pull(
        services: ServiceSet, registry: Registry, front: FaultyRegistry, bus: Bus) -> None:
    image, size, blob = push_big_image(registry, "cut")
    front.cut(blob, after=1_000_000, times=2)
    sp = await start_puller(services)
    reply = await pull(bus, f"{front.host}/faults/cut:1")
    assert reply.image.id == image.config_digest
    ranges = [s.headers.get("Range") for s in front.seen(blob)]
    assert ranges[0] is None and ranges[1] and ranges[2], ranges
    assert metric(sp, "shoal_puller_layer_bytes_fetched_total") == size


async def test_kill_9_mid_download_then_restart_resumes_from_the_ingest(
        services: ServiceSet, registry: Registry, front: FaultyRegistry, bus: Bus) -> None:
    image, size, blob = push_big_image(registry, "kill")
    front.stall(blob, after=5_000_000, seconds=60)
    first = await start_puller(services)
    attempt = asyncio.create_task(pull(bus, f"{front.host}/faults/kill:1", timeout=120))
    ingest = services.node.state_root / "puller" / "content" / "ingest"
    data = ingest / (image.layers[0].digest.split(":")[1] + ".data")
    # Stalled at 5 MB: less than one write batch may still be in the killed process's
    # memory (a full batch, or one that waited WRITE_AFTER, goes to the ingest file).
    on_disk = 5_000_000 - WRITE_BATCH
    for _ in range(200):
        if data.exists() and data.stat().st_size >= on_disk:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # the stall holds; whatever was written stays written
    await asyncio.to_thread(first.kill9)
    kept = data.stat().st_size
    assert kept >= on_disk
    attempt.cancel()
    second = await start_puller(services)
    reply = await pull(bus, f"{front.host}/faults/kill:1")
    assert reply.image.id == image.config_digest
    assert metric(second, "shoal_puller_resumed_downloads_total") == 1
    fetched = metric(second, "shoal_puller_layer_bytes_fetched_total")
    assert fetched == size - kept
    blobs = services.node.state_root / "puller" / "content" / "blobs" / "sha256"
    assert (blobs / image.layers[0].digest.split(":")[1]).stat().st_size == size
    assert not data.exists()


async def test_gc_never_takes_a_leased_blob(tmp_path: Path) -> None:
    content = ContentStore(tmp_path / "content")
    images = ImageStore(tmp_path / "meta.db")
    await images.open()
    try:
        data = os.urandom(1000)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        await images.lease("pull-1", [digest], ttl=60)
        await content.put(digest, data)
        assert await images.unreferenced([digest]) == []
        await images.drop_lease("pull-1")
        assert await images.unreferenced([digest]) == [digest]
        # Once a name references it, it is kept without a lease too.
        await images.put("k8s.io", ["r/x:1"], digest, "m", ManifestRecord(
            digest=digest, media_type="m", config_digest=digest, size=1000, layers=[]),
            [digest])
        assert await images.unreferenced([digest]) == []
        # Expired leases stop protecting (a crashed pull does not pin blobs forever).
        await images.lease("pull-2", ["sha256:" + "0" * 64], ttl=-1)
        assert await images.unreferenced(["sha256:" + "0" * 64]) == ["sha256:" + "0" * 64]
        # A blob whose lock is held (being written) is never deleted.
        async with content.writer("sha256:" + "1" * 64, 10):
            with content.try_locked("sha256:" + "1" * 64) as got:
                assert not got
    finally:
        await images.close()


async def test_concurrent_leases_do_not_trip_sqlite(tmp_path: Path) -> None:
    """Cursors returned by store calls used to be finalised on the loop thread, racing the
    database thread ("bad parameter or other API misuse") under concurrent pulls."""
    images = ImageStore(tmp_path / "meta.db")
    await images.open()
    try:
        async def one(i: int) -> None:
            await images.lease(f"pull-{i}", [f"sha256:{i:064x}"], ttl=60)
            await images.drop_lease(f"pull-{i}")

        for _ in range(10):
            await asyncio.gather(*(one(i) for i in range(16)))
    finally:
        await images.close()
