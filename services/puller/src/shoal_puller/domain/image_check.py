"""Checking an imported image whole before it is recorded: its blobs came from a client
(`images.import.write`), which the puller trusts no more than a registry.

Every document is bounded and parsed, every blob it names is in the store at the size its
descriptor says, every layer is of a type Shoal unpacks, every diff ID in the config is
recomputed by decompressing its layer (bounded, so a bomb is refused rather than
expanded), and every name is a valid reference outside Shoal's own `shoal.local`. Nothing
is written here: the caller records what passes (`records.record_image`).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import zstandard
from shoal_common.errors import Invalid, NotFound
from shoal_common.messages.images import LayerInfo
from shoal_common.messages.transfer import ImportImage
from shoal_common.oci import (
    FOREIGN_LAYER_TYPES,
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    chain_ids,
    json_object,
)

from shoal_puller.registry import Platform, parse_reference, select_manifest
from shoal_puller.reserved import BUILTIN_HOST, is_builtin_host
from shoal_puller.store.content import DIGEST_RE, ContentStore
from shoal_puller.store.images import ImageStore, ManifestRecord

MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 8 << 20
# A layer may expand to this many times its size, or to BOMB_FLOOR, whichever is more.
# gzip cannot pass ~1032:1, so the ratio stops only other codecs' bombs (zstd reaches far
# more); the free space on the node (where the snapshotter will write the tree) stops all.
BOMB_RATIO = 1100
BOMB_FLOOR = 256 << 20
UNCOMPRESSED_TYPES = frozenset({"application/vnd.oci.image.layer.v1.tar",
                                "application/vnd.docker.image.rootfs.diff.tar"})
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_READ = 1 << 20
LEASE_TTL = 3600.0


@dataclass
class CheckedImage:
    """An image that passed: what `record_image` takes."""

    names: list[str]
    target_digest: str
    target_media_type: str
    record: ManifestRecord
    blobs: list[str] = field(default_factory=list)


class LayerTooLarge(Exception):
    pass


class BadLayer(Exception):
    pass


def image_names(names: list[str], target: str) -> list[str]:
    """The names to record (`repo:tag` and `repo@target`, as a pull records them)."""
    out: list[str] = []
    for text in names:
        ref = parse_reference(text)
        if is_builtin_host(ref.domain):
            raise Invalid(f"name {text!r}: {BUILTIN_HOST} is reserved for Shoal's built-in "
                          "images, which each node makes itself")
        if ref.digest is not None and ref.digest != target:
            raise Invalid(f"name {text!r} names digest {ref.digest}, but the image it is "
                          f"given to is {target}")
        if ref.tag:
            out.append(f"{ref.repository}:{ref.tag}")
        out.append(f"{ref.repository}@{target}")
    return list(dict.fromkeys(out))


def _descriptor(desc: Any, what: str) -> dict[str, Any]:
    if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str) or \
            not DIGEST_RE.match(desc["digest"]) or not isinstance(desc.get("size"), int) or \
            isinstance(desc["size"], bool) or desc["size"] < 0 or \
            not isinstance(desc.get("mediaType", ""), str):
        raise Invalid(f"{what}: malformed descriptor {str(desc)[:200]} (needs a sha256 "
                      "digest, a size >= 0 and a string mediaType)")
    return desc


def _media_type(doc: dict[str, Any], declared: str, what: str) -> str:
    own = doc.get("mediaType", "")
    if not isinstance(own, str):
        raise Invalid(f"{what}: mediaType is not a string")
    if declared and own and declared != own:
        raise Invalid(f"{what}: its descriptor says media type {declared!r}, the document "
                      f"says {own!r}")
    if declared or own:
        return declared or own
    # OCI lets a manifest or index leave mediaType out; tell them apart as a pull does.
    return OCI_INDEX if "manifests" in doc else OCI_MANIFEST


def layer_diff_id(path: Path, limit: int) -> str:
    """sha256 of the layer's tar (gzip and zstd inflated, sniffed as the snapshotter does),
    or LayerTooLarge once it passes `limit` bytes."""
    with open(path, "rb") as fh:
        head = fh.read(4)
        fh.seek(0)
        reader: IO[bytes]
        if head.startswith(_GZIP_MAGIC):
            reader = cast(IO[bytes], gzip.GzipFile(fileobj=fh, mode="rb"))
        elif head == _ZSTD_MAGIC:
            reader = cast(IO[bytes], zstandard.ZstdDecompressor().stream_reader(
                fh, read_across_frames=True))
        elif head == b"\xfd7zX" or head.startswith(b"BZh"):
            raise BadLayer("xz and bzip2 layers are not supported (gzip, zstd or plain tar)")
        else:
            reader = fh
        hasher, total = hashlib.sha256(), 0
        while chunk := reader.read(_READ):
            total += len(chunk)
            if total > limit:
                raise LayerTooLarge(total)
            hasher.update(chunk)
    return f"sha256:{hasher.hexdigest()}"


class ImageChecker:
    """Checks images whose blobs are in `content`, holding each blob it reads under the
    import's lease so garbage collection cannot take it meanwhile."""

    def __init__(self, content: ContentStore, images: ImageStore, platform: Platform) -> None:
        self.content = content
        self.images = images
        self.platform = platform

    async def _hold(self, lease: str, digest: str, size: int | None, what: str) -> None:
        """Lease the blob, then make sure it is there (and `size` bytes)."""
        await self.images.lease(lease, [digest], LEASE_TTL)
        try:
            have = self.content.size(digest)
        except NotFound:
            raise Invalid(f"{what}: blob {digest} is not in the store (the archive does not "
                          "hold it, or it was not sent)") from None
        if size is not None and have != size:
            raise Invalid(f"{what}: blob {digest} is {have} bytes, its descriptor says {size}")

    async def _document(self, lease: str, digest: str, size: int | None, limit: int,
                        what: str) -> tuple[bytes, dict[str, Any]]:
        await self._hold(lease, digest, size, what)
        if self.content.size(digest) > limit:
            raise Invalid(f"{what}: {digest} is {self.content.size(digest)} bytes "
                          f"(limit {limit})")
        data = self.content.read(digest)
        return data, json_object(data, f"{what} ({digest})")

    async def check(self, lease: str, image: ImportImage) -> CheckedImage:
        what = f"image {image.names[0]!r}"
        body, doc = await self._document(lease, image.digest, None, MAX_MANIFEST_BYTES, what)
        target_type = _media_type(doc, image.media_type, what)
        blobs = [image.digest]
        manifest_digest, manifest_type = image.digest, target_type
        if target_type in INDEX_TYPES:
            desc = self._choose(doc, what)
            manifest_digest = desc["digest"]
            body, doc = await self._document(lease, manifest_digest, desc["size"],
                                             MAX_MANIFEST_BYTES, what)
            manifest_type = _media_type(doc, desc.get("mediaType", ""), what)
            blobs.append(manifest_digest)
        if manifest_type not in MANIFEST_TYPES:
            raise Invalid(f"{what}: {manifest_digest} has media type {manifest_type!r}, not "
                          "an image manifest or index")
        record = await self._record(lease, manifest_digest, manifest_type, body, doc, what)
        blobs += [record.config_digest, *(layer.digest for layer in record.layers)]
        return CheckedImage(names=image_names(image.names, image.digest),
                            target_digest=image.digest, target_media_type=target_type,
                            record=record, blobs=list(dict.fromkeys(blobs)))

    def _choose(self, index: dict[str, Any], what: str) -> dict[str, Any]:
        """The platform's manifest among those the archive holds (an archive of one
        platform of a multi-platform image keeps the whole index)."""
        entries = index.get("manifests")
        if not isinstance(entries, list):
            raise Invalid(f"{what}: index has no \"manifests\" list")
        present = [_descriptor(d, f"{what}: index entry") for d in entries]
        present = [d for d in present if self.content.exists(d["digest"])]
        return select_manifest({"manifests": present}, self.platform,
                               source=f"{what}: the archive's index")

    async def _record(self, lease: str, digest: str, media_type: str, body: bytes,
                      doc: dict[str, Any], what: str) -> ManifestRecord:
        if doc.get("schemaVersion") != 2:
            raise Invalid(f"{what}: manifest {digest} has schemaVersion "
                          f"{doc.get('schemaVersion')!r} (only 2 is supported)")
        descs = doc.get("layers")
        if not isinstance(descs, list):
            raise Invalid(f"{what}: manifest {digest} has no \"layers\" list")
        config = _descriptor(doc.get("config"), f"{what}: config of {digest}")
        layers = [_descriptor(d, f"{what}: layer of {digest}") for d in descs]
        for layer in layers:
            kind = layer.get("mediaType", "")
            if kind in FOREIGN_LAYER_TYPES:
                raise Invalid(f"{what}: layer {layer['digest']} is a non-distributable "
                              "(foreign) layer, which Shoal does not use")
            if kind not in LAYER_TYPES:
                raise Invalid(f"{what}: layer {layer['digest']} has unsupported media type "
                              f"{kind!r}")
        config_bytes, config_doc = await self._document(
            lease, config["digest"], config["size"], MAX_CONFIG_BYTES, f"{what}: config")
        rootfs = config_doc.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or not all(
                isinstance(d, str) and DIGEST_RE.match(d) for d in diff_ids):
            raise Invalid(f"{what}: config {config['digest']} has no rootfs.diff_ids list "
                          "of sha256 digests")
        if len(diff_ids) != len(layers):
            raise Invalid(f"{what}: config lists {len(diff_ids)} diff_ids for "
                          f"{len(layers)} layers")
        for layer, diff_id in zip(layers, diff_ids, strict=True):
            await self._hold(lease, layer["digest"], layer["size"], f"{what}: layer")
            await self._check_diff_id(layer, diff_id, what)
        return ManifestRecord(
            digest=digest, media_type=media_type, config_digest=config["digest"],
            size=len(body) + len(config_bytes) + sum(d["size"] for d in layers),
            layers=[LayerInfo(digest=d["digest"], diff_id=diff_id, chain_id=chain,
                              size=d["size"], media_type=d["mediaType"])
                    for d, diff_id, chain in zip(layers, diff_ids, chain_ids(diff_ids),
                                                 strict=True)])

    async def _check_diff_id(self, layer: dict[str, Any], diff_id: str, what: str) -> None:
        digest, size = layer["digest"], layer["size"]
        if digest == diff_id and layer["mediaType"] in UNCOMPRESSED_TYPES:
            return  # the blob is the tar: its digest, checked on write, is the diff ID
        free = self.content.free_bytes()
        limit = min(max(BOMB_FLOOR, BOMB_RATIO * size), free)
        try:
            actual = await asyncio.to_thread(layer_diff_id, self.content.blob_path(digest),
                                             limit)
        except LayerTooLarge:
            why = (f"the {free} bytes free on this node" if limit == free else
                   f"{BOMB_RATIO} times its {size} bytes")
            raise Invalid(f"{what}: layer {digest} expands past {limit} bytes ({why}): "
                          "refused as a decompression bomb") from None
        except (BadLayer, EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as exc:
            raise Invalid(f"{what}: layer {digest} cannot be decompressed: {exc}") from None
        if actual != diff_id:
            raise Invalid(f"{what}: layer {digest} unpacks to a tar of digest {actual}, but "
                          f"the config says its diff_id is {diff_id}")
