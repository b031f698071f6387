"""Pulling an image: resolve, choose the platform, fetch manifests, config and layers into
the content store (layers concurrently, resumable, de-duplicated across pulls and replicas),
record the image, and publish what changed.

Progress and stall detection both read the ingest files on disk, so a pull that waits for
another pull (or another replica) downloading the same layer sees that download's progress.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

import structlog
from shoal_common.errors import Invalid, ShoalError, Unavailable
from shoal_common.locks import SingleFlight
from shoal_common.messages.images import (
    ImageFetching,
    ImageInfo,
    LayerInfo,
    LayerProgress,
    PullProgress,
    PullRequest,
)
from shoal_common.oci import (
    FOREIGN_LAYER_TYPES,
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    chain_ids,
    json_object,
)

from shoal_puller.domain import metrics
from shoal_puller.domain.builtin import BuiltinImages
from shoal_puller.domain.records import Publish, record_image
from shoal_puller.registry import (
    Credentials,
    Platform,
    Reference,
    RegistryClient,
    parse_reference,
    select_manifest,
)
from shoal_puller.reserved import is_builtin_host
from shoal_puller.store.content import ContentStore, DigestMismatch
from shoal_puller.store.images import ImageStore, ManifestRecord

log = structlog.get_logger("shoal.puller")

MAX_CONFIG_BYTES = 8 << 20
PROGRESS_INTERVAL = 0.5
LEASE_TTL = 3600.0
# Bytes handed to the writer thread at a time: large enough to amortise the hop (fewer
# thread switches)...
WRITE_BATCH = 2 << 20
# ...or whatever has waited this long: progress and stall detection read the ingest file,
# so a slow download must still reach it (and a kill loses at most this much of it).
WRITE_AFTER = 1.0


@dataclass
class PullSettings:
    max_concurrent_downloads: int
    min_progress_bytes: int
    progress_window: float
    platform: Platform


@dataclass
class _Layer:
    digest: str
    size: int
    media_type: str
    state: str = "waiting"


class Puller:
    def __init__(self, content: ContentStore, images: ImageStore, client: RegistryClient,
                 settings: PullSettings, publish: Publish,
                 builtins: BuiltinImages | None = None) -> None:
        self.content = content
        self.images = images
        self.client = client
        self.settings = settings
        self.publish = publish
        self.builtins = builtins or BuiltinImages(content, images, publish)
        self._downloads = asyncio.Semaphore(settings.max_concurrent_downloads)
        self._inflight: SingleFlight[tuple[str, str], ImageInfo] = SingleFlight()

    async def pull(self, namespace: str, req: PullRequest) -> ImageInfo:
        """Idempotent by `req.pull_id`: a retry joins the pull in flight."""
        # The pull goes on if the caller gives up; a retry will find it or its result.
        return await self._inflight.run((namespace, req.pull_id),
                                        lambda: self._pull(namespace, req))

    async def _pull(self, namespace: str, req: PullRequest) -> ImageInfo:
        ref = parse_reference(req.ref)
        if is_builtin_host(ref.domain):
            return await self.builtins.pull(namespace, ref)  # made here, never fetched
        creds = Credentials.from_message(req.auth)
        platform = Platform.parse(req.platform) if req.platform else self.settings.platform
        lease = uuid.uuid4().hex
        started = time.perf_counter()
        layers: list[_Layer] = []
        outcome = "error"
        try:
            info = await self._pull_into(namespace, ref, creds, platform, lease, layers, req)
            outcome = "ok"
            return info
        except ShoalError as exc:
            outcome = exc.code.value
            await self._progress(namespace, req, str(ref), layers, finished=True,
                                 error=exc.message)
            raise
        finally:
            metrics.PULLS.labels(outcome).inc()
            metrics.PULL_SECONDS.observe(time.perf_counter() - started)
            await self.images.drop_lease(lease)

    async def _pull_into(self, namespace: str, ref: Reference, creds: Credentials | None,
                         platform: Platform, lease: str, layers: list[_Layer],
                         req: PullRequest) -> ImageInfo:
        top = await self.client.get_manifest(ref, ref.object, creds)
        blobs = [top.digest]
        await self.images.lease(lease, [top.digest], LEASE_TTL)
        await self.content.put(top.digest, top.body)
        doc = json_object(top.body, f"manifest of {ref}")
        media_type = top.media_type or doc.get("mediaType", "")
        manifest_body, manifest_digest, manifest_type = top.body, top.digest, media_type
        if media_type in INDEX_TYPES or (not media_type and "manifests" in doc):
            desc = select_manifest(doc, platform)
            child = await self.client.get_manifest(ref, desc["digest"], creds)
            await self.images.lease(lease, [child.digest], LEASE_TTL)
            await self.content.put(child.digest, child.body)
            blobs.append(child.digest)
            manifest_body, manifest_digest = child.body, child.digest
            manifest_type = child.media_type or desc.get("mediaType", "")
            doc = json_object(child.body, f"manifest {child.digest} of {ref}")
        elif media_type not in MANIFEST_TYPES and "layers" not in doc:
            raise Invalid(f"{ref}: unsupported manifest media type {media_type!r}")

        config_desc, layer_descs = _parse_manifest(doc, ref)
        digests = [config_desc["digest"], *(d["digest"] for d in layer_descs)]
        await self.images.lease(lease, digests, LEASE_TTL)
        blobs += digests
        config_bytes = await self._fetch_small(ref, creds, config_desc)
        config = json_object(config_bytes, f"image config {config_desc['digest']}")
        diff_ids = config.get("rootfs", {}).get("diff_ids", [])
        if len(diff_ids) != len(layer_descs):
            raise Invalid(f"{ref}: config lists {len(diff_ids)} diff_ids for "
                          f"{len(layer_descs)} layers")

        layers.extend(_Layer(d["digest"], int(d["size"]), d["mediaType"]) for d in layer_descs)
        chains = chain_ids(diff_ids)
        infos = [LayerInfo(digest=layer.digest, diff_id=diff_id, chain_id=chain,
                           size=layer.size, media_type=layer.media_type)
                 for layer, diff_id, chain in zip(layers, diff_ids, chains, strict=True)]
        await self._announce_fetching(namespace, req, str(ref), infos)
        fetch_started = time.perf_counter()
        await self._fetch_layers(namespace, req, ref, creds, layers)
        metrics.FETCH_SECONDS.observe(time.perf_counter() - fetch_started)

        record = ManifestRecord(
            digest=manifest_digest, media_type=manifest_type,
            config_digest=config_desc["digest"],
            size=len(manifest_body) + len(config_bytes) + sum(layer.size for layer in layers),
            layers=infos)
        names = [f"{ref.repository}@{top.digest}"]
        if ref.tag:
            names.insert(0, f"{ref.repository}:{ref.tag}")
        await record_image(self.images, self.publish, namespace, names, top.digest, media_type,
                           record, blobs)
        await self._progress(namespace, req, str(ref), layers, finished=True)
        log.info("pulled", ref=str(ref), digest=top.digest, image_id=record.config_digest,
                 bytes=record.size)
        return await self.images.info(namespace, record.config_digest)

    async def _announce_fetching(self, namespace: str, req: PullRequest, ref: str,
                                 layers: list[LayerInfo]) -> None:
        """Tell the snapshotter which layers are about to stream in, so it can apply them
        while they do (a hint: lost, it only costs the overlap)."""
        if all(self.content.exists(layer.digest) for layer in layers):
            return
        try:
            await self.publish(ImageFetching(pull_id=req.pull_id, ref=ref, layers=layers),
                               namespace, False)
        except ShoalError as exc:
            log.warning("could not announce the layers to fetch", ref=ref, error=exc.message)

    async def _fetch_small(self, ref: Reference, creds: Credentials | None,
                           desc: dict[str, Any]) -> bytes:
        digest, size = desc["digest"], int(desc["size"])
        if size > MAX_CONFIG_BYTES:
            raise Invalid(f"{ref}: config {digest} is {size} bytes (limit {MAX_CONFIG_BYTES})")
        if not self.content.exists(digest):
            data = bytearray()
            async for chunk in self.client.fetch_blob(ref, digest, creds=creds,
                                                      expected_size=size):
                data += chunk
            try:
                await self.content.put(digest, bytes(data))
            except DigestMismatch as exc:
                raise Invalid(f"{ref}: registry sent bad content: {exc.message}") from None
        return self.content.read(digest)

    async def _fetch_layers(self, namespace: str, req: PullRequest, ref: Reference,
                            creds: Credentials | None, layers: list[_Layer]) -> None:
        # Largest first: with a bound on parallel downloads, a big layer started last would
        # make the whole pull wait for it alone (the semaphore admits in start order).
        order = sorted(layers, key=lambda layer: layer.size, reverse=True)
        downloads = asyncio.ensure_future(asyncio.gather(
            *(self._fetch_layer(ref, creds, layer) for layer in order)))
        watch = asyncio.create_task(self._watch(namespace, req, str(ref), layers, downloads))
        try:
            await downloads
        except asyncio.CancelledError:
            if watch.done() and not watch.cancelled() and watch.exception():
                raise watch.exception() from None  # type: ignore[misc]
            raise
        finally:
            if not watch.done():
                watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    async def _fetch_layer(self, ref: Reference, creds: Credentials | None,
                           layer: _Layer) -> None:
        if layer.media_type in FOREIGN_LAYER_TYPES:
            raise Invalid(f"{ref}: layer {layer.digest} is a non-distributable (foreign) "
                          "layer, which Shoal does not fetch")
        if layer.media_type not in LAYER_TYPES:
            raise Invalid(f"{ref}: layer {layer.digest} has unsupported media type "
                          f"{layer.media_type!r}")
        async with self._downloads, self.content.writer(layer.digest, layer.size) as w:
            if w.committed:
                layer.state = "exists"
                return
            layer.state = "downloading"
            resumed = w.offset > 0
            if resumed:
                metrics.RESUMED.inc()
            for attempt in range(2):
                # Hashing, writing and the final fsync run in a worker thread (hashlib and
                # os.write release the GIL): on the loop they would stall every other
                # download and the bus while a layer is flushed. One batch is written while
                # the next is read, so the layer's download never waits for its disk.
                pending: list[bytes] = []
                pending_bytes = 0
                pending_since = 0.0
                writing: asyncio.Future[None] | None = None
                try:
                    async for chunk in self.client.fetch_blob(
                            ref, layer.digest, offset=w.offset, creds=creds,
                            expected_size=layer.size):
                        if not pending:
                            pending_since = time.monotonic()
                        pending.append(chunk)
                        pending_bytes += len(chunk)
                        if pending_bytes >= WRITE_BATCH or \
                                time.monotonic() - pending_since >= WRITE_AFTER:
                            if writing is not None:
                                await asyncio.shield(writing)
                            metrics.FETCHED_BYTES.inc(pending_bytes)
                            writing = asyncio.ensure_future(
                                asyncio.to_thread(w.write_chunks, pending))
                            pending, pending_bytes = [], 0
                    if writing is not None:
                        await asyncio.shield(writing)
                finally:
                    if writing is not None and not writing.done():
                        # Failed or cancelled mid-download: the thread must be done with the
                        # ingest file before it is closed or resumed (shield and wait never
                        # cancel the write itself).
                        await asyncio.wait({writing})
                if pending:
                    metrics.FETCHED_BYTES.inc(pending_bytes)
                    await asyncio.to_thread(w.write_chunks, pending)
                try:
                    await asyncio.to_thread(w.commit)
                    break
                except DigestMismatch as exc:
                    # A partial file from an earlier attempt may have been of other bytes
                    # (the tag moved): start over once from zero before blaming the registry.
                    if attempt == 0 and resumed:
                        w.reset()
                        continue
                    raise Invalid(f"{ref}: registry sent bad content: {exc.message}") from None
            layer.state = "done"

    def _layer_progress(self, layers: list[_Layer]) -> list[LayerProgress]:
        out = []
        for layer in layers:
            if layer.state in ("done", "exists"):
                done = layer.size
            else:
                done = min(self.content.ingest_size(layer.digest), layer.size)
            out.append(LayerProgress(digest=layer.digest, done=done, total=layer.size,
                                     state=layer.state))
        return out

    async def _progress(self, namespace: str, req: PullRequest, ref: str, layers: list[_Layer],
                        finished: bool = False, error: str = "") -> None:
        event = PullProgress(pull_id=req.pull_id, ref=ref, layers=self._layer_progress(layers),
                             finished=finished, error=error)
        try:
            await self.publish(event, namespace, False)
        except ShoalError as exc:
            log.warning("could not publish progress", error=exc.message)

    async def _watch(self, namespace: str, req: PullRequest, ref: str, layers: list[_Layer],
                     downloads: asyncio.Future[Any]) -> None:
        """Publish progress at a bounded rate, and fail a pull that stalls: fewer than
        min_progress_bytes in progress_window seconds (a trickle of bytes is not progress)."""
        s = self.settings
        mark_time, mark_bytes = time.monotonic(), 0
        while not downloads.done():
            await asyncio.sleep(PROGRESS_INTERVAL)
            progress = self._layer_progress(layers)
            await self._progress(namespace, req, ref, layers)
            done = sum(p.done for p in progress)
            if done - mark_bytes >= s.min_progress_bytes or all(
                    p.done >= p.total for p in progress):
                mark_time, mark_bytes = time.monotonic(), done
            elif time.monotonic() - mark_time >= s.progress_window:
                downloads.cancel()
                raise Unavailable(
                    f"pull of {ref} stalled: {done - mark_bytes} bytes in the last "
                    f"{s.progress_window:.0f} s (minimum {s.min_progress_bytes}); "
                    f"{done} of {sum(p.total for p in progress)} bytes fetched")


def _parse_manifest(doc: dict[str, Any],
                    ref: Reference) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if doc.get("schemaVersion") != 2:
        raise Invalid(f"{ref}: manifest schemaVersion {doc.get('schemaVersion')!r} is not "
                      "supported (only 2)")
    config, layers = doc.get("config"), doc.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list):
        raise Invalid(f"{ref}: manifest has no config or layers")
    for desc in [config, *layers]:
        if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str) or not (
                isinstance(desc.get("size"), int) and desc["size"] >= 0):
            raise Invalid(f"{ref}: malformed descriptor in manifest: {desc!r}")
    return config, layers
