"""What a scanned archive holds: its images and the blobs they need (`plan_import`).

Two layouts are read. An OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/`:
skopeo's oci-archive, umoci, `docker save` since Docker 25, `shoal image export`), whose
images are index.json's entries, named as containerd names them (annotation
`io.containerd.image.name`, else `org.opencontainers.image.ref.name`, a tag joined to
`--base-name` when it is only a tag). And a docker archive (`manifest.json`: `docker
save`, skopeo's docker-archive), which has no manifests: each entry's config and layer
files get a Docker schema 2 manifest made here, canonical JSON, so an archive always gives
the same digests. index.json wins when an archive has both. Only blobs images use are sent;
an index's platforms that the archive does not hold are left out, as `docker save` leaves
them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from shoal_common.messages.transfer import MAX_IMAGE_NAMES, MAX_IMPORT_BLOBS, MAX_IMPORT_IMAGES
from shoal_common.oci import DOCKER_MANIFEST, INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST

from shoal_cli.archive import ArchiveError, Contents, Member, member_name

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
IMAGE_NAME = "io.containerd.image.name"
REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_VERSION = "1.0.0"


@dataclass
class Blob:
    digest: str
    size: int
    member: str = ""  # the archive member holding it ("": made here, in `data`)
    data: bytes | None = None  # its bytes, when in memory


@dataclass
class PlannedImage:
    digest: str  # what its names point at
    media_type: str
    names: list[str]
    what: str  # where the archive declares it, for messages


@dataclass
class ImportPlan:
    layout: str  # "OCI image layout" or "docker archive"
    images: dict[str, PlannedImage] = field(default_factory=dict)  # by digest
    blobs: dict[str, Blob] = field(default_factory=dict)  # by digest

    def add_image(self, digest: str, media_type: str, names: list[str], what: str) -> None:
        image = self.images.setdefault(digest, PlannedImage(digest, media_type, [], what))
        image.names += [n for n in names if n not in image.names]
        if len(image.names) > MAX_IMAGE_NAMES:
            raise ArchiveError(f"{what}: more than {MAX_IMAGE_NAMES} names for one image")
        if len(self.images) > MAX_IMPORT_IMAGES:
            raise ArchiveError(f"the archive has more than {MAX_IMPORT_IMAGES} images")

    def add_blob(self, blob: Blob) -> None:
        self.blobs.setdefault(blob.digest, blob)
        if len(self.blobs) > MAX_IMPORT_BLOBS:
            raise ArchiveError(f"the archive's images need more than {MAX_IMPORT_BLOBS} blobs")


def plan_import(contents: Contents, base_name: str = "") -> ImportPlan:
    if "index.json" in contents.members:
        return _OciLayout(contents, base_name).plan()
    if "manifest.json" in contents.members:
        return _DockerArchive(contents, base_name).plan()
    raise ArchiveError(f"{contents.path} is neither an OCI image layout (no index.json) nor "
                       "a docker archive (no manifest.json)")


def _json(member: Member, what: str) -> Any:
    if member.data is None:
        raise ArchiveError(f"{what} ({member.name}) is {member.size} bytes: too large for "
                           "an image document")
    try:
        return json.loads(member.data)
    except ValueError as exc:
        raise ArchiveError(f"{what} ({member.name}) is not JSON: {exc}") from None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ArchiveError(f"{what} is not a JSON object")
    return value


def _descriptor(value: Any, what: str) -> dict[str, Any]:
    desc = _object(value, what)
    digest, size = desc.get("digest"), desc.get("size")
    if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool) \
            or size < 0 or not isinstance(desc.get("mediaType", ""), str):
        raise ArchiveError(f"{what}: malformed descriptor {json.dumps(desc)[:200]}")
    if not digest.startswith("sha256:") or len(digest) != 71 or \
            any(c not in "0123456789abcdef" for c in digest[7:]):
        raise ArchiveError(f"{what}: digest {digest[:80]!r} is not sha256:<64 hex> (the "
                           "only algorithm Shoal stores)")
    return desc


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


class _Reader:
    """Reads one kind of archive (`layout`) into an ImportPlan."""

    layout = ""

    def __init__(self, contents: Contents, base_name: str) -> None:
        self.contents = contents
        self.base_name = base_name
        self.out = ImportPlan(self.layout)


class _OciLayout(_Reader):
    layout = "OCI image layout"

    def plan(self) -> ImportPlan:
        members = self.contents.members
        if "oci-layout" in members:
            layout = _object(_json(members["oci-layout"], "oci-layout"), "oci-layout")
            if layout.get("imageLayoutVersion") != LAYOUT_VERSION:
                raise ArchiveError(f"oci-layout: imageLayoutVersion "
                                   f"{layout.get('imageLayoutVersion')!r} (Shoal reads "
                                   f"{LAYOUT_VERSION})")
        index = _object(_json(members["index.json"], "index.json"), "index.json")
        entries = index.get("manifests")
        if not isinstance(entries, list) or not entries:
            raise ArchiveError("index.json lists no images (\"manifests\" is empty or missing)")
        for i, entry in enumerate(entries):
            what = f"index.json entry {i}"
            desc = _descriptor(entry, what)
            doc = self._blob_doc(desc, what)
            media_type = desc.get("mediaType") or doc.get("mediaType") or (
                OCI_INDEX if "manifests" in doc else OCI_MANIFEST)
            if media_type in INDEX_TYPES:
                self._index(desc["digest"], doc, what)
            elif media_type in MANIFEST_TYPES:
                self._manifest(doc, what)
            else:
                raise ArchiveError(f"{what} has media type {media_type!r}: not an image "
                                   "manifest or index")
            self.out.add_image(desc["digest"], str(media_type), self._names(desc, what), what)
        return self.out

    def _member(self, desc: dict[str, Any], what: str) -> Member:
        name = f"blobs/sha256/{desc['digest'][7:]}"
        member = self.contents.members.get(name)
        if member is None:
            raise ArchiveError(f"{what} names blob {desc['digest']}, which the archive does "
                               f"not hold (no {name})")
        if member.size != desc["size"]:
            raise ArchiveError(f"{what}: {name} is {member.size} bytes, its descriptor says "
                               f"{desc['size']}")
        if member.digest != desc["digest"]:
            raise ArchiveError(f"{what}: {name} has digest {member.digest}, not the one its "
                               "name says")
        self.out.add_blob(Blob(desc["digest"], desc["size"], name, member.data))
        return member

    def _blob_doc(self, desc: dict[str, Any], what: str) -> dict[str, Any]:
        member = self._member(desc, what)
        return _object(_json(member, f"{what}: {desc['digest']}"), f"{what}: {member.name}")

    def _manifest(self, doc: dict[str, Any], what: str) -> None:
        self._member(_descriptor(doc.get("config"), f"{what}: config"), f"{what}: config")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ArchiveError(f"{what}: the manifest has no \"layers\" list")
        for n, layer in enumerate(layers):
            self._member(_descriptor(layer, f"{what}: layer {n}"), f"{what}: layer {n}")

    def _index(self, digest: str, doc: dict[str, Any], what: str) -> None:
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise ArchiveError(f"{what}: the index {digest} has no \"manifests\" list")
        held = 0
        for n, child in enumerate(children):
            desc = _descriptor(child, f"{what}: index entry {n}")
            if f"blobs/sha256/{desc['digest'][7:]}" not in self.contents.members:
                continue  # a platform the archive leaves out
            child_doc = self._blob_doc(desc, f"{what}: index entry {n}")
            if (desc.get("mediaType") or child_doc.get("mediaType")) in INDEX_TYPES:
                raise ArchiveError(f"{what}: index entry {n} is an index itself (Shoal "
                                   "reads one level)")
            self._manifest(child_doc, f"{what}: index entry {n}")
            held += 1
        if not held:
            raise ArchiveError(f"{what}: none of the {len(children)} manifests of the index "
                               f"{digest} is in the archive")

    def _names(self, desc: dict[str, Any], what: str) -> list[str]:
        notes = desc.get("annotations") or {}
        notes = notes if isinstance(notes, dict) else {}
        full, ref = notes.get(IMAGE_NAME), notes.get(REF_NAME)
        if isinstance(full, str) and full:
            return [full]
        if isinstance(ref, str) and ref:
            if any(c in ref for c in "/:@"):
                return [ref]  # a whole reference, as skopeo writes `oci-archive:F:REF`'s
            if self.base_name:
                return [f"{self.base_name}:{ref}"]
            raise ArchiveError(f"{what} is named only by the tag {ref!r} ({REF_NAME}): give "
                               f"--base-name REPOSITORY to import it as REPOSITORY:{ref}")
        if self.base_name:
            return [self.base_name]
        raise ArchiveError(f"{what} has no name (no {IMAGE_NAME} or {REF_NAME} annotation): "
                           "give --base-name REPOSITORY to import it under that name")


class _DockerArchive(_Reader):
    layout = "docker archive"

    def plan(self) -> ImportPlan:
        entries = _json(self.contents.members["manifest.json"], "manifest.json")
        if not isinstance(entries, list) or not entries:
            raise ArchiveError("manifest.json is not a non-empty list of images")
        for i, entry in enumerate(entries):
            self._entry(_object(entry, f"manifest.json entry {i}"), f"manifest.json entry {i}")
        return self.out

    def _file(self, value: Any, what: str) -> Member:
        if not isinstance(value, str):
            raise ArchiveError(f"{what}: not a file name")
        member = self.contents.members.get(member_name(value))
        if member is None:
            raise ArchiveError(f"{what} names {value!r}, which the archive does not hold")
        if member.name.startswith("blobs/sha256/") and member.digest[7:] != member.name[13:]:
            raise ArchiveError(f"{what}: {member.name} has digest {member.digest}, not the "
                               "one its name says")
        return member

    def _entry(self, entry: dict[str, Any], what: str) -> None:
        config = self._file(entry.get("Config"), f"{what}: Config")
        config_doc = _object(_json(config, f"{what}: config"), f"{what}: config")
        paths = entry.get("Layers")
        if not isinstance(paths, list):
            raise ArchiveError(f"{what}: no \"Layers\" list")
        rootfs = config_doc.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(paths):
            raise ArchiveError(f"{what}: the config's rootfs.diff_ids do not match the "
                               f"{len(paths)} layers")
        layers = []
        for n, path in enumerate(paths):
            member = self._file(path, f"{what}: layer {n}")
            if member.head.startswith(b"\x1f\x8b"):
                media_type = DOCKER_LAYER_GZIP
            elif member.head[:4] in (b"\x28\xb5\x2f\xfd", b"\xfd7zX") or \
                    member.head.startswith(b"BZh"):
                raise ArchiveError(f"{what}: layer {member.name} is neither a tar nor gzip "
                                   "(what a docker archive's layers are)")
            else:
                media_type = DOCKER_LAYER_TAR
            self.out.add_blob(Blob(member.digest, member.size, member.name, member.data))
            layers.append({"mediaType": media_type, "size": member.size,
                           "digest": member.digest})
        self.out.add_blob(Blob(config.digest, config.size, config.name, config.data))
        manifest = _canonical({
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "size": config.size,
                       "digest": config.digest},
            "layers": layers})
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        self.out.add_blob(Blob(digest, len(manifest), data=manifest))
        self.out.add_image(digest, DOCKER_MANIFEST, self._names(entry, what), what)

    def _names(self, entry: dict[str, Any], what: str) -> list[str]:
        tags = entry.get("RepoTags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
            raise ArchiveError(f"{what}: RepoTags is not a list of names")
        if tags:
            return list(tags)
        if self.base_name:
            return [self.base_name]
        raise ArchiveError(f"{what} has no RepoTags: give --base-name REPOSITORY to import "
                           "it under that name")
