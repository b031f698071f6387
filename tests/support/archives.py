"""Image archives for import tests: OCI image layouts and docker archives built from
support.images' images, written member by member so a test can add, drop or forge any
member (a hostile archive is the good one with one thing changed)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .images import Image, canonical_json

Entry = tuple[tarfile.TarInfo, bytes | None]


def file_entry(name: str, data: bytes, *, mode: int = 0o644) -> Entry:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    return info, data


def dir_entry(name: str) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info, None


def special_entry(name: str, type_: bytes, linkname: str = "") -> Entry:
    """A symlink, hard link, device or FIFO member."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = type_, linkname
    info.devmajor, info.devminor = (1, 3) if type_ in (tarfile.CHRTYPE, tarfile.BLKTYPE) \
        else (0, 0)
    return info, None


def blob_name(digest: str) -> str:
    return f"blobs/sha256/{digest.split(':', 1)[1]}"


def oci_entries(images: Sequence[tuple[Image, str | None]], *,
                annotation: str = "io.containerd.image.name") -> list[Entry]:
    """An OCI image layout of `images`, each named (`annotation`) unless its name is None."""
    descriptors, blobs = [], {}
    for image, name in images:
        desc = image.descriptor()
        if name is not None:
            desc["annotations"] = {annotation: name}
        descriptors.append(desc)
        blobs[image.digest] = image.manifest_bytes
        blobs.update(image.blobs())
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": descriptors}
    return [file_entry("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
            file_entry("index.json", canonical_json(index)),
            dir_entry("blobs"), dir_entry("blobs/sha256"),
            *(file_entry(blob_name(d), data) for d, data in blobs.items())]


def docker_entries(images: Sequence[tuple[Image, list[str]]]) -> list[Entry]:
    """A docker archive as `docker save` wrote it before Docker 25: `<id>.json` configs,
    `<layer id>/layer.tar` uncompressed layers, manifest.json."""
    entries: list[Entry] = []
    manifest: list[dict[str, Any]] = []
    for image, tags in images:
        config = f"{image.config_digest.split(':', 1)[1]}.json"
        entries.append(file_entry(config, image.config_bytes))
        layers = []
        for layer in image.layers:
            layer_id = hashlib.sha256(layer.diff_id.encode()).hexdigest()
            entries += [dir_entry(layer_id), file_entry(f"{layer_id}/layer.tar", layer.tar),
                        file_entry(f"{layer_id}/VERSION", b"1.0")]
            layers.append(f"{layer_id}/layer.tar")
        manifest.append({"Config": config, "RepoTags": tags, "Layers": layers})
    entries.append(file_entry("manifest.json", json.dumps(manifest).encode()))
    return entries


def tar_bytes(entries: Iterable[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def write_archive(path: Path, entries: Iterable[Entry], *, gzipped: bool = False) -> Path:
    data = tar_bytes(entries)
    path.write_bytes(gzip.compress(data, mtime=0) if gzipped else data)
    return path


def read_archive(path: Path) -> dict[str, bytes]:
    """Every file of a tar archive by name (for checking what an export wrote)."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                for m in tar.getmembers() if m.isfile()}
