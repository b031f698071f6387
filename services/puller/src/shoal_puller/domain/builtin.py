"""The built-in pause image, made on the node from Debian's static catatonit: the first pod
of a fresh (or air-gapped) install needs no registry.

It is named under `shoal.local` (BUILTIN_HOST), a host Shoal never asks a registry for:
the registry client refuses it, and a pull of the name is answered here. The image is one
uncompressed layer holding `/catatonit`, with fixed metadata and canonical JSON, so the same
binary always gives the same digests: every start and every replica makes the same image,
and only the first one on the node writes anything. Its blobs go through the content
store's normal write path (digest checked) and its record and `images.create` are a pulled
image's, so the snapshotter unpacks it like any other.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import struct
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from shoal_common.errors import NotFound, ShoalError
from shoal_common.messages.images import ImageInfo, LayerInfo
from shoal_common.oci import OCI_MANIFEST, chain_ids

from shoal_puller.domain.records import Publish, record_image
from shoal_puller.registry import Platform, Reference
from shoal_puller.reserved import BUILTIN_HOST
from shoal_puller.store.content import ContentStore
from shoal_puller.store.images import ImageStore, ManifestRecord

log = structlog.get_logger("shoal.puller")

PAUSE_REPOSITORY = f"{BUILTIN_HOST}/pause"
# The tag names this recipe (layout, config), not catatonit's version: the default
# cri.sandbox_image can then stay one fixed name. A new catatonit moves the tag (an
# images.update), as a re-pushed tag would.
PAUSE_TAG = "1"
BUILTIN_PAUSE = f"{PAUSE_REPOSITORY}:{PAUSE_TAG}"
CATATONIT = Path("/usr/bin/catatonit")
# Where kubelet and the CRI gateway look for images (and so for the sandbox image).
CRI_NAMESPACE = "k8s.io"
# Like registry.k8s.io/pause: a pause only waits for signals and needs no privilege.
PAUSE_USER = "65535:65535"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LEASE_TTL = 600.0
_PT_INTERP = 3


class NotStatic(Exception):
    """The binary is not a static ELF executable: alone in a rootfs it would not run."""


@dataclass(frozen=True)
class BuiltImage:
    """The three blobs of a built-in image; digests are over exactly these bytes."""

    manifest: bytes
    config: bytes
    layer: bytes  # an uncompressed tar: its digest is also its diff ID

    @property
    def manifest_digest(self) -> str:
        return _sha256(self.manifest)

    @property
    def config_digest(self) -> str:
        return _sha256(self.config)

    @property
    def layer_digest(self) -> str:
        return _sha256(self.layer)

    def blobs(self) -> list[tuple[str, bytes]]:
        return [(_sha256(b), b) for b in (self.manifest, self.config, self.layer)]

    def record(self) -> ManifestRecord:
        diff_id = self.layer_digest
        return ManifestRecord(
            digest=self.manifest_digest, media_type=OCI_MANIFEST,
            config_digest=self.config_digest,
            size=len(self.manifest) + len(self.config) + len(self.layer),
            layers=[LayerInfo(digest=diff_id, diff_id=diff_id, chain_id=chain_ids([diff_id])[0],
                              size=len(self.layer), media_type=OCI_LAYER_TAR)])


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def check_static(binary: bytes, what: str) -> None:
    """Raise NotStatic unless `binary` is an ELF executable without a dynamic loader."""
    if binary[:4] != b"\x7fELF" or binary[4] not in (1, 2) or binary[5] not in (1, 2):
        raise NotStatic(f"{what} is not an ELF executable")
    order = "<" if binary[5] == 1 else ">"
    if binary[4] == 2:  # 64-bit: e_phoff at 0x20, e_phentsize/e_phnum at 0x36
        (phoff,) = struct.unpack_from(f"{order}Q", binary, 0x20)
        phentsize, phnum = struct.unpack_from(f"{order}HH", binary, 0x36)
    else:
        (phoff,) = struct.unpack_from(f"{order}I", binary, 0x1C)
        phentsize, phnum = struct.unpack_from(f"{order}HH", binary, 0x2A)
    for i in range(phnum):
        (p_type,) = struct.unpack_from(f"{order}I", binary, phoff + i * phentsize)
        if p_type == _PT_INTERP:
            raise NotStatic(f"{what} is dynamically linked (it would need its libraries "
                            "in the image)")


def _layer_tar(binary: bytes) -> bytes:
    """One entry, `catatonit`, with fixed owner, mode and mtime (the host file's own would
    make the digest depend on when the package was installed)."""
    info = tarfile.TarInfo("catatonit")
    info.size, info.mode, info.mtime = len(binary), 0o755, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(binary))
    return buf.getvalue()


def build_pause(binary: bytes, platform: Platform) -> BuiltImage:
    """The pause image for `binary` (catatonit) on `platform`; a pure function of both."""
    layer = _layer_tar(binary)
    config: dict[str, Any] = {
        "architecture": platform.architecture, "os": platform.os,
        # catatonit -P: pause mode, as a pod's sandbox process must run (no child to start).
        "config": {"Entrypoint": ["/catatonit", "-P"], "User": PAUSE_USER,
                   "WorkingDir": "/", "Labels": {"io.shoal.builtin": "pause"}},
        "rootfs": {"type": "layers", "diff_ids": [_sha256(layer)]},
        "history": [{"created_by": "shoal-puller: the built-in pause image (catatonit)"}],
    }
    if platform.variant:
        config["variant"] = platform.variant
    config_bytes = _canonical(config)
    manifest = _canonical({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _sha256(config_bytes),
                   "size": len(config_bytes)},
        "layers": [{"mediaType": OCI_LAYER_TAR, "digest": _sha256(layer), "size": len(layer)}],
    })
    return BuiltImage(manifest=manifest, config=config_bytes, layer=layer)


def _build_from(path: Path, platform: Platform) -> BuiltImage:
    binary = path.read_bytes()
    check_static(binary, str(path))
    return build_pause(binary, platform)


class BuiltinImages:
    """Makes the built-in images exist, and answers pulls of BUILTIN_HOST names."""

    def __init__(self, content: ContentStore, images: ImageStore, publish: Publish, *,
                 catatonit: Path = CATATONIT, platform: Platform | None = None) -> None:
        self.content = content
        self.images = images
        self.publish = publish
        self.catatonit = catatonit
        # The binary is this machine's, so the image is for this machine's platform
        # (not services.puller.platform, which only chooses from registries' indexes).
        self.platform = platform or Platform.host()

    async def ensure(self, namespace: str = CRI_NAMESPACE) -> ImageInfo | None:
        """At start: make the pause image exist; without catatonit, warn and go on."""
        try:
            info = await self._ensure(namespace)
        except (OSError, NotStatic) as exc:
            log.warning("no built-in pause image: pods need cri.sandbox_image from a "
                        "registry (apt-get install catatonit for one that needs none)",
                        image=BUILTIN_PAUSE, error=str(exc))
            return None
        except ShoalError as exc:
            # E.g. JetStream did not ack the event: the puller still serves (a pull of the
            # name makes the image again), and the gateway's unpack needs no event.
            log.warning("could not make the built-in pause image", image=BUILTIN_PAUSE,
                        error=exc.message)
            return None
        log.info("built-in pause image ready", image=BUILTIN_PAUSE, digest=info.target_digest,
                 image_id=info.id)
        return info

    async def pull(self, namespace: str, ref: Reference) -> ImageInfo:
        """A pull of a BUILTIN_HOST name: made here, never fetched."""
        if ref.repository != PAUSE_REPOSITORY or ref.tag not in (None, PAUSE_TAG):
            raise NotFound(f"image {ref} not found: {BUILTIN_HOST} is Shoal's built-in image "
                           f"host (never fetched from a registry); it has only {BUILTIN_PAUSE}")
        try:
            built = await asyncio.to_thread(_build_from, self.catatonit, self.platform)
        except (OSError, NotStatic) as exc:
            raise NotFound(f"image {ref} not found: the built-in pause image is made from "
                           f"{self.catatonit} (apt-get install catatonit): {exc}") from None
        if ref.digest is not None and ref.digest != built.manifest_digest:
            raise NotFound(f"image {ref} not found: the built-in {BUILTIN_PAUSE} is "
                           f"{PAUSE_REPOSITORY}@{built.manifest_digest} on this node")
        info = await self._commit(namespace, built)
        log.info("pulled built-in image", ref=str(ref), digest=info.target_digest)
        return info

    async def _ensure(self, namespace: str) -> ImageInfo:
        built = await asyncio.to_thread(_build_from, self.catatonit, self.platform)
        return await self._commit(namespace, built)

    async def _recorded(self, namespace: str, built: BuiltImage) -> ImageInfo | None:
        """The image's record if both names already point at it and its blobs are there."""
        try:
            info = await self.images.info(namespace, built.config_digest)
        except NotFound:
            return None
        names = {BUILTIN_PAUSE, f"{PAUSE_REPOSITORY}@{built.manifest_digest}"}
        if info.target_digest == built.manifest_digest and names <= set(info.names) and all(
                self.content.exists(digest) for digest, _ in built.blobs()):
            return info
        return None

    async def _commit(self, namespace: str, built: BuiltImage) -> ImageInfo:
        """Blobs (leased, as a pull's are, so a concurrent GC cannot take them before the
        record holds them), then the record and its events. When the record is already
        there (a restart, another replica) nothing is written: no blob, no row, no event."""
        if (info := await self._recorded(namespace, built)) is not None:
            return info
        lease = uuid.uuid4().hex
        blobs = built.blobs()
        await self.images.lease(lease, [d for d, _ in blobs], LEASE_TTL)
        try:
            for digest, data in blobs:
                await self.content.put(digest, data)
            record = built.record()
            await record_image(self.images, self.publish, namespace,
                               [BUILTIN_PAUSE, f"{PAUSE_REPOSITORY}@{record.digest}"],
                               record.digest, OCI_MANIFEST, record, [d for d, _ in blobs])
        finally:
            await self.images.drop_lease(lease)
        return await self.images.info(namespace, built.config_digest)
