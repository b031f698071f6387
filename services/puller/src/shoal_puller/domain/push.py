"""Pushing an image from the store to a registry: resolve the image and the target, plan
what to send (an index only when the store holds every manifest it lists, else the
platform manifest the store holds), upload the blobs the repository lacks (concurrently,
mounted from another repository of the same registry where one is known to hold them),
then the manifests, platform manifests before the index that lists them.

Progress (`images.push.progress`, every 0.5 s) and stall detection count the bytes sent,
as a pull's count the bytes received.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import Counter, Histogram
from shoal_common.errors import FailedPrecondition, Invalid, NotFound, ShoalError, Unavailable
from shoal_common.locks import SingleFlight
from shoal_common.messages.images import ImageInfo, LayerProgress
from shoal_common.messages.push import PushedBlob, PushProgress, PushReply, PushRequest
from shoal_common.oci import INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST, json_object

from shoal_puller.domain.catalog import Catalog, normalise
from shoal_puller.domain.records import Publish
from shoal_puller.registry import Credentials, Reference, parse_reference
from shoal_puller.registry.endpoints import Endpoint
from shoal_puller.registry.reference import is_digest
from shoal_puller.registry.upload import Blob, Uploaded, Uploads
from shoal_puller.reserved import BUILTIN_HOST, is_builtin_host
from shoal_puller.store.content import ContentStore
from shoal_puller.store.images import ImageStore

log = structlog.get_logger("shoal.puller")

PROGRESS_INTERVAL = 0.5
LEASE_TTL = 3600.0
MAX_MANIFEST_BYTES = 4 << 20
MAX_KNOWN = 8192  # (registry, digest) pairs remembered as mount sources
_STATES = {"exists": "exists", "mounted": "mounted", "uploaded": "done"}

PUSHES = Counter("shoal_puller_pushes_total", "Pushes by outcome (ok or an error code).",
                 ["outcome"])
PUSH_SECONDS = Histogram("shoal_puller_push_seconds", "Whole push: resolve to last manifest.",
                         buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900))
PUSHED_BLOBS = Counter("shoal_puller_pushed_blobs_total",
                       "Blobs of pushes by outcome (exists, mounted, uploaded).", ["outcome"])
PUSHED_BYTES = Counter("shoal_puller_pushed_bytes_total",
                       "Blob bytes uploaded by pushes (a resumed upload counts the rest).")


@dataclass
class PushSettings:
    max_concurrent_uploads: int
    min_progress_bytes: int
    progress_window: float


@dataclass(frozen=True)
class _Manifest:
    digest: str
    media_type: str
    body: bytes
    blobs: list[tuple[str, int]]  # config first, then the layers
    layers: list[str]


@dataclass
class _Plan:
    target: Reference
    digest: str  # what the target will name
    media_type: str
    manifests: list[_Manifest]  # in push order; the last is `digest`
    note: str = ""


@dataclass
class _Blob:
    digest: str
    size: int
    shown: bool  # a layer (configs are not shown in progress)
    state: str = "waiting"
    done: int = 0


@dataclass
class _Progress:
    blobs: list[_Blob] = field(default_factory=list)

    def layers(self) -> list[LayerProgress]:
        return [LayerProgress(digest=b.digest, done=min(b.done, b.size), total=b.size,
                              state=b.state) for b in self.blobs if b.shown]

    def sent(self) -> int:
        return sum(min(b.done, b.size) for b in self.blobs)


class Pusher:
    def __init__(self, content: ContentStore, images: ImageStore, catalog: Catalog,
                 uploads: Uploads, settings: PushSettings, publish: Publish) -> None:
        self.content = content
        self.images = images
        self.catalog = catalog
        self.uploads = uploads
        self.settings = settings
        self.publish = publish
        self._slots = asyncio.Semaphore(settings.max_concurrent_uploads)
        self._inflight: SingleFlight[tuple[str, str], PushReply] = SingleFlight()
        # (registry, digest) -> repositories known to hold the blob (pushed to here).
        self._known: dict[tuple[str, str], list[str]] = {}

    async def push(self, namespace: str, req: PushRequest) -> PushReply:
        """Idempotent by `req.push_id`: a retry joins the push in flight."""
        # The push goes on if the caller gives up; a retry will find it or its result.
        return await self._inflight.run((namespace, req.push_id),
                                        lambda: self._push(namespace, req))

    async def _push(self, namespace: str, req: PushRequest) -> PushReply:
        started = time.perf_counter()
        progress = _Progress()
        shown = req.target or req.ref
        outcome = "error"
        try:
            plan = await self._plan(namespace, req)
            shown = str(plan.target)
            reply = await self._send(namespace, req, plan, progress)
            outcome = "ok"
            await self._progress(req, namespace, shown, progress, finished=True)
            return reply
        except ShoalError as exc:
            outcome = exc.code.value
            await self._progress(req, namespace, shown, progress, finished=True,
                                 error=exc.message)
            raise
        finally:
            PUSHES.labels(outcome).inc()
            PUSH_SECONDS.observe(time.perf_counter() - started)

    # -- what to push ----------------------------------------------------------------------

    async def _plan(self, namespace: str, req: PushRequest) -> _Plan:
        if not req.ref:
            raise Invalid("no image named to push")
        image_id = await self.catalog.resolve(namespace, req.ref)
        info = await self.images.info(namespace, image_id)
        name = normalise(req.ref)
        named = await self.images.target_of(namespace, name) if name in info.names else None
        target = _target(req, named is not None)
        top_digest, top_type = named or (info.target_digest, "")
        top = self._manifest(top_digest, top_type, f"image {req.ref}")
        if top.media_type not in INDEX_TYPES:
            return self._check_digest(_Plan(target, top.digest, top.media_type, [top]))
        children, missing = self._children(top)
        if not missing:
            return self._check_digest(_Plan(target, top.digest, top.media_type,
                                            [*children, top]))
        own = self._manifest(info.manifest_digest, "", f"image {req.ref}")
        note = (f"the store holds {len(children)} of the {len(children) + len(missing)} "
                f"manifests of index {top.digest}: pushed the manifest {own.digest} alone")
        if target.digest == top.digest:
            raise FailedPrecondition(f"push {target}: {note.replace('pushed', 'cannot push')}"
                                     "; push to a tag to send that manifest alone")
        return self._check_digest(_Plan(target, own.digest, own.media_type, [own], note))

    @staticmethod
    def _check_digest(plan: _Plan) -> _Plan:
        if plan.target.digest is not None and plan.target.digest != plan.digest:
            raise Invalid(f"push target {plan.target} names digest {plan.target.digest}, but "
                          f"the image pushed is {plan.digest}")
        return plan

    def _read(self, digest: str, what: str) -> bytes:
        try:
            size = self.content.size(digest)
        except NotFound:
            raise FailedPrecondition(f"{what}: {digest} is not in the content store (pull the "
                                     "image again)") from None
        if size > MAX_MANIFEST_BYTES:
            raise Invalid(f"{what}: manifest {digest} is {size} bytes (limit "
                          f"{MAX_MANIFEST_BYTES})")
        return self.content.read(digest)

    def _manifest(self, digest: str, media_type: str, what: str) -> _Manifest:
        """A manifest or index from the store, its media type, and the blobs it needs."""
        body = self._read(digest, what)
        doc = json_object(body, f"manifest {digest}")
        declared = doc.get("mediaType")
        media_type = declared if isinstance(declared, str) and declared else (
            media_type or (OCI_INDEX if "manifests" in doc else OCI_MANIFEST))
        if media_type in INDEX_TYPES:
            return _Manifest(digest, media_type, body, [], [])
        if media_type not in MANIFEST_TYPES:
            raise Invalid(f"{what}: manifest {digest} has unsupported media type "
                          f"{media_type!r}")
        config = _descriptor(doc.get("config"), digest)
        layers_field = doc.get("layers")
        if not isinstance(layers_field, list):
            raise Invalid(f"{what}: manifest {digest} has no layers")
        layers = [_descriptor(d, digest) for d in layers_field]
        blobs = list(dict.fromkeys([config, *layers]))
        return _Manifest(digest, media_type, body, blobs, [d for d, _ in layers])

    def _children(self, index: _Manifest) -> tuple[list[_Manifest], list[str]]:
        """The manifests `index` lists that the store holds whole, and those it lacks."""
        doc = json_object(index.body, f"index {index.digest}")
        entries = doc.get("manifests")
        if not isinstance(entries, list) or not entries:
            raise Invalid(f"index {index.digest} lists no manifests")
        held: list[_Manifest] = []
        missing: list[str] = []
        for entry in entries:
            digest, _ = _descriptor(entry, index.digest)
            media_type = entry.get("mediaType", "") if isinstance(entry, dict) else ""
            if not self.content.exists(digest):
                missing.append(digest)
                continue
            child = self._manifest(digest, str(media_type), f"index {index.digest}")
            if child.media_type in INDEX_TYPES:
                missing.append(digest)  # nested indexes are not followed
            elif all(self.content.exists(d) for d, _ in child.blobs):
                held.append(child)
            else:
                missing.append(digest)
        return list({m.digest: m for m in held}.values()), missing

    # -- sending ---------------------------------------------------------------------------

    async def _send(self, namespace: str, req: PushRequest, plan: _Plan,
                    progress: _Progress) -> PushReply:
        target = plan.target
        layers = {d for m in plan.manifests for d in m.layers}
        blobs = dict.fromkeys(b for m in plan.manifests for b in m.blobs)
        progress.blobs = [_Blob(d, size, d in layers) for d, size in blobs]
        lease = uuid.uuid4().hex
        await self.images.lease(lease, [*(d for d, _ in blobs),
                                        *(m.digest for m in plan.manifests)], LEASE_TTL)
        try:
            for digest, _ in blobs:
                if not self.content.exists(digest):
                    raise FailedPrecondition(f"push {target}: blob {digest} is not in the "
                                             "content store (pull the image again)")
            ep = self.uploads.endpoint(target.domain)
            creds = Credentials.from_message(req.auth)
            sources = await self._sources(namespace, target)
            pushed = await self._watched(namespace, req, str(target), progress, lambda: (
                self._blobs(ep, target, creds, progress, sources)))
            for manifest in plan.manifests:
                last = manifest is plan.manifests[-1]
                reference = (target.tag or manifest.digest) if last else manifest.digest
                await self.uploads.push_manifest(ep, target, reference, manifest.media_type,
                                                 manifest.body, manifest.digest, creds)
        finally:
            await self.images.drop_lease(lease)
        for blob in pushed:
            self._learn(target, blob.digest)
        log.info("pushed", target=str(target), digest=plan.digest,
                 uploaded=sum(1 for b in pushed if b.outcome == "uploaded"), note=plan.note)
        return PushReply(target=str(target), digest=plan.digest, media_type=plan.media_type,
                         manifests=[m.digest for m in plan.manifests], blobs=pushed,
                         note=plan.note)

    async def _blobs(self, ep: Endpoint, target: Reference, creds: Credentials | None,
                     progress: _Progress, sources: dict[str, list[str]]) -> list[PushedBlob]:
        async def one(blob: _Blob) -> PushedBlob:
            async with self._slots:
                blob.state = "pushing"

                def sent(done: int) -> None:
                    blob.done = done

                result: Uploaded = await self.uploads.push_blob(
                    ep, target, Blob(blob.digest, blob.size, self.content.blob_path(blob.digest)),
                    creds, mount_from=self._mount_sources(target, blob.digest, sources),
                    progress=sent)
            blob.state, blob.done = _STATES[result.outcome], blob.size
            PUSHED_BLOBS.labels(result.outcome).inc()
            if result.outcome == "uploaded":
                PUSHED_BYTES.inc(blob.size - result.resumed_from)
            return PushedBlob(digest=blob.digest, size=blob.size, outcome=result.outcome,
                              mounted_from=result.mounted_from,
                              resumed_from=result.resumed_from)

        # Largest first: the semaphore admits in start order, so a big blob started last
        # would leave the push waiting for it alone.
        order = sorted(progress.blobs, key=lambda b: b.size, reverse=True)
        tasks = [asyncio.ensure_future(one(b)) for b in order]
        try:
            done = await asyncio.gather(*tasks)
        except BaseException:
            # One failed (or the push was cancelled): the others stop too, rather than
            # upload on behind a push that already answered.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        by_digest = {p.digest: p for p in done}
        return [by_digest[b.digest] for b in progress.blobs]

    async def _watched(self, namespace: str, req: PushRequest, target: str,
                       progress: _Progress,
                       work: Callable[[], Awaitable[list[PushedBlob]]]) -> list[PushedBlob]:
        """Run `work` while publishing progress; fail it when it stalls: fewer than
        min_progress_bytes sent in progress_window seconds."""
        task = asyncio.ensure_future(work())
        s = self.settings
        mark_time, mark_bytes = time.monotonic(), 0
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=PROGRESS_INTERVAL)
                if done:
                    return task.result()
                await self._progress(req, namespace, target, progress)
                sent = progress.sent()
                if sent - mark_bytes >= s.min_progress_bytes or all(
                        b.state != "pushing" for b in progress.blobs):
                    mark_time, mark_bytes = time.monotonic(), sent
                elif time.monotonic() - mark_time >= s.progress_window:
                    raise Unavailable(
                        f"push to {target} stalled: {sent - mark_bytes} bytes sent in the "
                        f"last {s.progress_window:.0f} s (minimum {s.min_progress_bytes}); "
                        f"{sent} of {sum(b.size for b in progress.blobs)} bytes sent")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _progress(self, req: PushRequest, namespace: str, target: str,
                        progress: _Progress, finished: bool = False, error: str = "") -> None:
        event = PushProgress(push_id=req.push_id, target=target, layers=progress.layers(),
                             finished=finished, error=error)
        try:
            await self.publish(event, namespace, False)
        except ShoalError as exc:
            log.warning("could not publish progress", error=exc.message)

    # -- mount sources ---------------------------------------------------------------------

    async def _sources(self, namespace: str, target: Reference) -> dict[str, list[str]]:
        """digest -> repositories of the target's registry that images in the store came
        from (their names), for cross-repository mounts."""
        out: dict[str, list[str]] = {}
        images: list[ImageInfo] = await self.images.list_images(namespace)
        for info in images:
            repos = []
            for name in info.names:
                try:
                    ref = parse_reference(name)
                except Invalid:
                    continue
                if ref.domain == target.domain and ref.path != target.path:
                    repos.append(ref.path)
            for digest in [info.id, *(layer.digest for layer in info.layers)]:
                out.setdefault(digest, []).extend(repos)
        return out

    def _mount_sources(self, target: Reference, digest: str,
                       sources: dict[str, list[str]]) -> list[str]:
        known = self._known.get((target.domain, digest), [])
        candidates = [*reversed(known), *sources.get(digest, [])]
        return [r for r in dict.fromkeys(candidates) if r != target.path]

    def _learn(self, target: Reference, digest: str) -> None:
        key = (target.domain, digest)
        repos = self._known.pop(key, [])
        if target.path in repos:
            repos.remove(target.path)
        self._known[key] = [*repos[-7:], target.path]  # the latest last, a few kept
        while len(self._known) > MAX_KNOWN:
            self._known.pop(next(iter(self._known)))


def _target(req: PushRequest, by_name: bool) -> Reference:
    """Where to push: `req.target`, else the name the image was given by."""
    if not req.target and not by_name:
        raise Invalid(f"{req.ref!r} is not an image name but an image id (or id prefix): "
                      "name the reference to push it to")
    text = req.target or req.ref
    try:
        target = parse_reference(text)
    except Invalid as exc:
        raise Invalid(f"push target: {exc.message}") from None
    if is_builtin_host(target.domain):
        raise Invalid(f"push target {text!r}: {BUILTIN_HOST} is Shoal's built-in image host, "
                      "not a registry")
    return target


def _descriptor(desc: Any, manifest: str) -> tuple[str, int]:
    if not isinstance(desc, dict):
        raise Invalid(f"manifest {manifest}: malformed descriptor {desc!r}")
    digest, size = desc.get("digest"), desc.get("size")
    if not isinstance(digest, str) or not is_digest(digest) or not digest.startswith(
            "sha256:") or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise Invalid(f"manifest {manifest}: malformed descriptor {str(desc)[:200]}")
    return digest, size
