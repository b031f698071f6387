"""The images a build makes, in the puller's store, and their trees, from the snapshotter.

Every step's image is committed as `images_archive` loads an archive: `images.import.begin`
names its blobs (the parent's layers are in the store already: they are only leased), the
new config, manifest and layer are sent with `import.write`, and `import.commit` checks and
records it. Steps' images are named in the build namespace (`<docker namespace>-build`)
only, `localhost/shoal-build@<manifest digest>`: `docker images` lists the Docker
namespace and does not see them, and the build cache finds them there by id. The result is
committed again in the Docker namespace under the build's tags (its blobs are all there:
nothing is sent).

An image's tree (for COPY's destination, --chown names, WORKDIR, COPY --from) is a
read-only view snapshot of its layers, which the snapshotter mounts itself
(`shoal/mounted-view`) and answers as one directory; the view is removed after use."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import os
import platform
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal_common.clients import Clients, ImagesClient
from shoal_common.errors import ShoalError
from shoal_common.messages.images import ContentInfoRequest, ImageGetRequest, ImageInfo
from shoal_common.messages.snapshots import SnapshotKeyRequest, UnpackRequest, ViewRequest
from shoal_common.messages.transfer import (
    MAX_IMPORT_WRITE,
    ImportAbortRequest,
    ImportBeginRequest,
    ImportBlob,
    ImportCommitRequest,
    ImportImage,
    ImportWriteRequest,
)
from shoal_common.oci import DOCKER_MANIFEST, OCI_MANIFEST

from shoal_docker_gateway.domain.build.errors import BuildError
from shoal_docker_gateway.domain.build.layers import NewLayer

BUILD_REPO = "localhost/shoal-build"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
VIEW_LABEL = "shoal/mounted-view"
OWNER = {"shoal/owner": "docker-build"}
VIEW_PREFIX = "docker-build-view-"
# A Docker schema 2 manifest names layers by Docker's types; the same bytes under OCI's.
_TO_DOCKER = {"application/vnd.oci.image.layer.v1.tar+gzip":
              "application/vnd.docker.image.rootfs.diff.tar.gzip",
              "application/vnd.oci.image.layer.v1.tar":
              "application/vnd.docker.image.rootfs.diff.tar"}
_TO_OCI = {v: k for k, v in _TO_DOCKER.items()}
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
         "s390x": "s390x", "riscv64": "riscv64"}


@dataclass(frozen=True)
class Layer:
    digest: str
    diff_id: str
    size: int
    media_type: str


@dataclass
class Image:
    """A state of the image being built: its config document and layers. `info` is the
    puller's record (None: nothing committed yet, e.g. scratch); `name` its name in the
    build namespace ("" when it has none there yet)."""

    config: dict[str, Any]
    layers: list[Layer]
    info: ImageInfo | None = None
    name: str = ""

    @property
    def id(self) -> str:
        return self.info.id if self.info is not None else ""

    @property
    def inner(self) -> dict[str, Any]:
        """The config's `config` (Env, Cmd, ...), made if absent."""
        inner = self.config.get("config")
        if not isinstance(inner, dict):
            inner = self.config["config"] = {}
        return inner

    def derive(self) -> Image:
        """A copy to change for the next step."""
        return Image(copy.deepcopy(self.config), list(self.layers), self.info, self.name)


def scratch() -> Image:
    arch = _ARCH.get(platform.machine(), platform.machine())
    return Image({"architecture": arch, "os": "linux", "config": {},
                  "rootfs": {"type": "layers", "diff_ids": []}, "history": []}, [])


def from_info(info: ImageInfo, name: str = "") -> Image:
    """An image of the store as a build state (`info` fetched with its config)."""
    try:
        config = json.loads(info.config)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise BuildError(f"image {info.id} has no readable config")
    layers = [Layer(x.digest, x.diff_id, x.size, x.media_type) for x in info.layers]
    return Image(config, layers, info, name)


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _manifest(config: bytes, layers: list[Layer]) -> bytes:
    """Docker schema 2, unless a layer has no Docker type (zstd): then OCI."""
    oci = any(x.media_type not in _TO_OCI and x.media_type not in _TO_DOCKER for x in layers)
    if oci:
        descs = [{"mediaType": _TO_OCI.get(x.media_type, x.media_type), "size": x.size,
                  "digest": x.digest} for x in layers]
        media, config_type = OCI_MANIFEST, OCI_CONFIG
    else:
        descs = [{"mediaType": _TO_DOCKER.get(x.media_type, x.media_type), "size": x.size,
                  "digest": x.digest} for x in layers]
        media, config_type = DOCKER_MANIFEST, DOCKER_CONFIG
    return _canonical({"schemaVersion": 2, "mediaType": media,
                       "config": {"mediaType": config_type, "size": len(config),
                                  "digest": _digest(config)}, "layers": descs})


Data = bytes | Path | None  # a blob to send: bytes, a file, or one the store holds


async def _send(client: ImagesClient, import_id: str, digest: str, size: int, data: Data,
                offset: int) -> None:
    if data is None:
        raise BuildError(f"the content store lost blob {digest} during the build")
    fh = await asyncio.to_thread(open, data, "rb") if isinstance(data, Path) else None
    try:
        while True:
            if fh is not None:
                await asyncio.to_thread(fh.seek, offset)
                chunk = await asyncio.to_thread(fh.read, MAX_IMPORT_WRITE)
            else:
                assert isinstance(data, bytes)
                chunk = data[offset:offset + MAX_IMPORT_WRITE]
            reply = await client.import_write(ImportWriteRequest(
                import_id=import_id, digest=digest, size=size, offset=offset, data=chunk))
            if reply.committed:
                return
            if not chunk or reply.held <= offset:
                raise BuildError(f"the puller did not take blob {digest} (holds "
                                 f"{reply.held} of {size} bytes)")
            offset = reply.held
    finally:
        if fh is not None:
            fh.close()


async def import_image(client: ImagesClient, blobs: dict[str, tuple[int, Data]],
                       target: str, names: list[str]) -> ImageInfo:
    """Send what the store lacks of `blobs` and record `target` (a manifest) as `names`."""
    import_id = f"docker-build-{uuid.uuid4().hex}"
    try:
        begun = await client.import_begin(ImportBeginRequest(import_id=import_id, blobs=[
            ImportBlob(digest=d, size=s) for d, (s, _) in blobs.items()]))
        for pending in begun.missing:
            size, data = blobs[pending.digest]
            await _send(client, import_id, pending.digest, size, data, pending.offset)
        reply = await client.import_commit(ImportCommitRequest(import_id=import_id, images=[
            ImportImage(digest=target, names=names)]))
    except BaseException:
        with contextlib.suppress(ShoalError):
            await asyncio.shield(client.import_abort(ImportAbortRequest(import_id=import_id)))
        raise
    return reply.images[0]


class Images:
    """The build's images: committed in the build namespace, views of their trees."""

    def __init__(self, build: Clients, build_id: str, empty: Path) -> None:
        self.build = build
        self.build_id = build_id
        self.empty = empty

    def _blobs(self, image: Image, config: bytes, manifest: bytes,
               new: NewLayer | None) -> dict[str, tuple[int, Data]]:
        blobs: dict[str, tuple[int, Data]] = {
            _digest(manifest): (len(manifest), manifest), _digest(config): (len(config), config)}
        for layer in image.layers:
            blobs.setdefault(layer.digest, (layer.size, None))
        if new is not None:
            blobs[new.digest] = (new.size, new.path)
        return blobs

    async def commit(self, image: Image, new: NewLayer | None = None) -> Image:
        """`image` (its config and layers, `new` last among them when given) recorded in
        the build namespace."""
        if new is not None:
            image.layers.append(Layer(new.digest, new.diff_id, new.size, new.media_type))
            image.config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
            image.config["rootfs"].setdefault("diff_ids", []).append(new.diff_id)
        config = _canonical(image.config)
        manifest = _manifest(config, image.layers)
        name = f"{BUILD_REPO}@{_digest(manifest)}"
        info = await import_image(self.build.images, self._blobs(image, config, manifest, new),
                                  _digest(manifest), [name])
        return Image(image.config, image.layers, info, name)

    async def adopt(self, image: Image) -> Image:
        """`image` with a name in the build namespace (a base image has its names in
        Docker's only): recorded there under its own manifest, nothing sent."""
        if image.name or image.info is None:
            return image
        info = image.info
        with contextlib.suppress(ShoalError):
            found = await self.build.images.get(ImageGetRequest(ref=info.id))
            if found.id == info.id and found.names:
                return Image(image.config, image.layers, found, found.names[0])
        client = self.build.images
        blobs: dict[str, tuple[int, Data]] = {
            d: ((await client.content_info(ContentInfoRequest(digest=d))).size, None)
            for d in (info.manifest_digest, info.id)}
        blobs.update({x.digest: (x.size, None) for x in image.layers})
        name = f"{BUILD_REPO}@{info.manifest_digest}"
        adopted = await import_image(client, blobs, info.manifest_digest, [name])
        return Image(image.config, image.layers, adopted, name)

    async def find(self, image_id: str) -> Image | None:
        """A step's image the cache names, if the build namespace still has it."""
        try:
            info = await self.build.images.get(ImageGetRequest(ref=image_id, with_config=True))
        except ShoalError:
            return None
        if info.id != image_id or not info.names:
            return None
        return from_info(info, info.names[0])

    @contextlib.asynccontextmanager
    async def view(self, image: Image) -> AsyncIterator[Path]:
        """The image's tree, read-only (an empty directory for an image without layers)."""
        if not image.layers:
            yield self.empty
            return
        image = await self.adopt(image)
        assert image.info is not None
        snapshots = self.build.snapshots
        unpacked = await snapshots.unpack(UnpackRequest(image=image.name,
                                                        layers=image.info.layers))
        key = f"{VIEW_PREFIX}{os.getpid()}-{self.build_id}-{uuid.uuid4().hex[:12]}"
        reply = await snapshots.view(ViewRequest(key=key, parent=unpacked.chain_id,
                                                 labels={**OWNER, VIEW_LABEL: "true"}))
        try:
            if len(reply.mounts) != 1 or reply.mounts[0].type != "bind":
                raise BuildError(f"the snapshotter's view of {image.id} is not one directory")
            yield Path(reply.mounts[0].source)
        finally:
            with contextlib.suppress(ShoalError):
                await asyncio.shield(snapshots.remove(SnapshotKeyRequest(key=key)))
