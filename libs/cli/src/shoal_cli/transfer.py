"""`shoal image import FILE` and `shoal image export FILE IMAGE...` over the bus.

Import: the archive is read here (`archive.scan`, `layouts.plan_import`: every member and
digest checked first), then only the blobs the puller lacks are sent, in chunks keyed by
offset (`images.import.write`), and `images.import.commit` records the images once the
puller has checked them whole; any failure aborts the import, which deletes what it wrote.
The puller never gets a path or a tar: only content-addressed bytes and the images'
descriptors, which it checks as it checks a registry's.

Export: each image's manifest, config and layers are read with `images.content.read` and
written as an OCI image layout (oci-layout, index.json with containerd's name annotations,
blobs/sha256/) that also has Docker's manifest.json, so `docker load`, skopeo's
`oci-archive:` and `docker-archive:` and `shoal image import` all read it. The archive is
deterministic (fixed owners, modes, times and order) and written to a temporary file that
is renamed into place only when whole.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import sys
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from shoal_common.bus import Bus
from shoal_common.clients import ImagesClient
from shoal_common.errors import ShoalError
from shoal_common.messages.images import (
    MAX_CONTENT_READ,
    ContentInfoRequest,
    ContentReadRequest,
    ImageGetRequest,
    ImageInfo,
)
from shoal_common.messages.transfer import (
    MAX_IMPORT_WRITE,
    ImportAbortRequest,
    ImportBeginRequest,
    ImportBlob,
    ImportCommitRequest,
    ImportImage,
    ImportWriteReply,
    ImportWriteRequest,
)
from shoal_common.oci import OCI_INDEX, OCI_MANIFEST

from shoal_cli.archive import ArchiveError, scan, stream_members
from shoal_cli.images import human
from shoal_cli.layouts import IMAGE_NAME, LAYOUT_VERSION, REF_NAME, Blob, ImportPlan, plan_import

MAX_DOCUMENT = 8 << 20
READS_IN_FLIGHT = 4
SENDS_IN_FLIGHT = 4


class TransferError(Exception):
    pass


async def run(bus: Bus, args: argparse.Namespace) -> int:
    if args.image_command == "export":
        return await export_images(bus, args.namespace, Path(args.file), args.images)
    return await import_archive(bus, args.namespace, Path(args.file), args.base_name)


# -- import ------------------------------------------------------------------------------


async def import_archive(bus: Bus, namespace: str, path: Path, base_name: str) -> int:
    try:
        contents = await asyncio.to_thread(scan, path)
        plan = plan_import(contents, base_name)
    except ArchiveError as exc:
        print(f"shoal image import: {exc}", file=sys.stderr)
        return 1
    client = ImagesClient(bus, namespace=namespace)
    import_id = uuid.uuid4().hex
    try:
        infos = await _send_and_commit(client, import_id, contents.path, plan)
    except BaseException as exc:
        # Whatever stopped it (a refusal, Ctrl-C), the import's blobs go: none is half-used.
        with contextlib.suppress(ShoalError):
            await asyncio.shield(client.import_abort(ImportAbortRequest(import_id=import_id)))
        if isinstance(exc, ShoalError | ArchiveError | TransferError):
            print(f"shoal image import: {getattr(exc, 'message', exc)}", file=sys.stderr)
            return 1
        raise
    for info in infos:
        for name in info.repo_tags or info.repo_digests:
            print(f"Loaded image: {name}")
        print(f"Image ID: {info.id}")
    return 0


async def _send_and_commit(client: ImagesClient, import_id: str, path: Path,
                           plan: ImportPlan) -> list[ImageInfo]:
    begun = await client.import_begin(ImportBeginRequest(
        import_id=import_id,
        blobs=[ImportBlob(digest=b.digest, size=b.size) for b in plan.blobs.values()]))
    missing = {p.digest: p.offset for p in begun.missing}
    unknown = set(missing) - set(plan.blobs)
    if unknown:
        raise TransferError(f"the puller asked for blobs the archive does not have: {unknown}")
    sending = sum(plan.blobs[d].size - offset for d, offset in missing.items())
    print(f"{plan.layout}: {len(plan.images)} image(s), {len(plan.blobs)} blobs; sending "
          f"{len(missing)} ({human(sending)}), {len(plan.blobs) - len(missing)} already "
          "stored", file=sys.stderr)
    in_memory = [plan.blobs[d] for d in missing if plan.blobs[d].data is not None]
    slots = asyncio.Semaphore(SENDS_IN_FLIGHT)

    async def send(blob: Blob) -> None:
        async with slots:
            await _send_bytes(client, import_id, blob, missing[blob.digest])

    await asyncio.gather(*(send(blob) for blob in in_memory))
    streamed = {plan.blobs[d].member: plan.blobs[d] for d in missing
                if plan.blobs[d].data is None}
    if streamed:
        await _send_streamed(client, import_id, path, streamed, missing)
    reply = await client.import_commit(ImportCommitRequest(import_id=import_id, images=[
        ImportImage(digest=i.digest, names=i.names, media_type=i.media_type)
        for i in plan.images.values()]))
    return reply.images


async def _write(client: ImagesClient, import_id: str, blob: Blob, offset: int,
                 data: bytes) -> ImportWriteReply:
    reply = await client.import_write(ImportWriteRequest(
        import_id=import_id, digest=blob.digest, size=blob.size, offset=offset, data=data))
    if not reply.committed and reply.held < offset + len(data):
        raise TransferError(f"blob {blob.digest}: the puller holds {reply.held} bytes after "
                            f"a write up to {offset + len(data)}")
    return reply


async def _send_bytes(client: ImagesClient, import_id: str, blob: Blob, offset: int) -> None:
    data = blob.data or b""
    while True:
        reply = await _write(client, import_id, blob, offset,
                             data[offset:offset + MAX_IMPORT_WRITE])
        if reply.committed:
            return
        offset = reply.held


async def _send_streamed(client: ImagesClient, import_id: str, path: Path,
                         members: dict[str, Blob], missing: dict[str, int]) -> None:
    """The archive's second pass: its large blobs, in archive order, each chunk read (in a
    thread) while the one before it is sent."""
    chunks = stream_members(path, set(members))
    done: set[str] = set()
    pending = asyncio.ensure_future(asyncio.to_thread(next, chunks, None))
    try:
        current, pos, held, committed = "", 0, 0, False
        while (item := await pending) is not None:
            pending = asyncio.ensure_future(asyncio.to_thread(next, chunks, None))
            name, chunk = item
            blob = members[name]
            if name != current:
                current, pos, held, committed = name, 0, missing[blob.digest], False
            if not chunk:  # the member's end
                if not committed:
                    committed = (await _write(client, import_id, blob, held, b"")).committed
                if not committed:
                    raise TransferError(f"{name}: the puller did not commit {blob.digest}")
                done.add(name)
                continue
            start, pos = pos, pos + len(chunk)
            view = memoryview(chunk)[max(0, held - start):]
            while view and not committed and pos > held:
                piece = bytes(view[:MAX_IMPORT_WRITE])
                view = view[len(piece):]
                reply = await _write(client, import_id, blob, held, piece)
                held, committed = reply.held, reply.committed
    finally:
        with contextlib.suppress(BaseException):
            await pending
        chunks.close()
    if lost := set(members) - done:
        raise TransferError(f"archive members vanished while read: {sorted(lost)}")


# -- export ------------------------------------------------------------------------------


def _familiar(name: str) -> str:
    """`docker.io/library/busybox:1` as Docker writes it in manifest.json: `busybox:1`."""
    if name.startswith("docker.io/library/") and "/" not in name[18:]:
        return name[18:]
    return name.removeprefix("docker.io/")


def _names(info: ImageInfo) -> list[str]:
    """The names an image is exported under: its tags, else its digest names (pointed at
    the manifest exported, which is what they name unless the name was an index's)."""
    if info.repo_tags:
        return list(info.repo_tags)
    return list(dict.fromkeys(f"{n.split('@', 1)[0]}@{info.manifest_digest}"
                              for n in info.repo_digests))


def _descriptor(name: str, media_type: str, digest: str, size: int) -> dict[str, Any]:
    notes = {IMAGE_NAME: name}
    repo, _, tag = name.partition("@")[0].rpartition(":")
    if repo and "/" not in tag:
        notes[REF_NAME] = tag
    return {"mediaType": media_type, "digest": digest, "size": size, "annotations": notes}


class _TarOut:
    """A USTAR archive written entry by entry (the blobs arrive over the bus, so tarfile's
    addfile, which pulls from a file object, does not fit)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.written = 0

    def _put(self, data: bytes) -> None:
        self.fh.write(data)
        self.written += len(data)

    def header(self, name: str, size: int, directory: bool = False) -> None:
        info = tarfile.TarInfo(name)
        info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
        info.size, info.mode, info.mtime = size, 0o755 if directory else 0o644, 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._put(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))

    def data(self, chunk: bytes) -> None:
        self._put(chunk)

    def end_file(self, size: int) -> None:
        if size % tarfile.BLOCKSIZE:
            self._put(b"\0" * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))

    def file(self, name: str, data: bytes) -> None:
        self.header(name, len(data))
        self.data(data)
        self.end_file(len(data))

    def close(self) -> None:
        self._put(b"\0" * (2 * tarfile.BLOCKSIZE))
        self._put(b"\0" * (-self.written % tarfile.RECORDSIZE))


async def _copy_blob(client: ImagesClient, digest: str, size: int, out: _TarOut) -> None:
    """The blob from the puller into the archive, READS_IN_FLIGHT reads at a time, its
    digest checked (a store is trusted no more than a registry)."""
    hasher = hashlib.sha256()
    offsets = list(range(0, size, MAX_CONTENT_READ))
    reads: list[asyncio.Future[bytes]] = []

    async def read(offset: int) -> bytes:
        reply = await client.content_read(ContentReadRequest(
            digest=digest, offset=offset, size=min(MAX_CONTENT_READ, size - offset)))
        if reply.total != size or len(reply.data) != min(MAX_CONTENT_READ, size - offset):
            raise TransferError(f"blob {digest}: the store holds {reply.total} bytes, the "
                                f"image says {size}")
        return reply.data

    try:
        for offset in offsets:
            reads.append(asyncio.ensure_future(read(offset)))
            if len(reads) >= READS_IN_FLIGHT:
                chunk = await reads.pop(0)
                hasher.update(chunk)
                out.data(chunk)
        for future in reads:
            chunk = await future
            hasher.update(chunk)
            out.data(chunk)
    finally:
        for future in reads:
            future.cancel()
    if (actual := f"sha256:{hasher.hexdigest()}") != digest:
        raise TransferError(f"blob {digest} in the store has digest {actual}")


async def _read_document(client: ImagesClient, digest: str) -> bytes:
    size = (await client.content_info(ContentInfoRequest(digest=digest))).size
    if size > MAX_DOCUMENT:
        raise TransferError(f"blob {digest} is {size} bytes: too large for a manifest")
    data = b""
    while len(data) < size:
        reply = await client.content_read(ContentReadRequest(
            digest=digest, offset=len(data), size=min(MAX_CONTENT_READ, size - len(data))))
        if not reply.data:
            break
        data += reply.data
    if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
        raise TransferError(f"blob {digest} in the store does not have that digest")
    return data


@dataclass
class _Exported:
    info: ImageInfo
    manifest: bytes
    media_type: str
    config_size: int
    names: list[str]


async def _exported(client: ImagesClient, refs: list[str]) -> list[_Exported]:
    images: dict[str, _Exported] = {}
    for ref in refs:
        info = await client.get(ImageGetRequest(ref=ref))
        if info.id in images:
            continue
        manifest = await _read_document(client, info.manifest_digest)
        try:
            media_type = json.loads(manifest).get("mediaType") or OCI_MANIFEST
        except (ValueError, AttributeError):
            raise TransferError(f"{ref}: manifest {info.manifest_digest} in the store is "
                                "not a JSON object") from None
        config_size = (await client.content_info(ContentInfoRequest(digest=info.id))).size
        images[info.id] = _Exported(info, manifest, str(media_type), config_size, _names(info))
    return list(images.values())


def _metadata(images: list[_Exported]) -> tuple[bytes, bytes]:
    """index.json (a descriptor per name, as containerd's export writes) and Docker's
    manifest.json (an entry per image, its files being the layout's blobs)."""
    descriptors, entries = [], []
    for image in images:
        digest, size = image.info.manifest_digest, len(image.manifest)
        descriptors += [_descriptor(n, image.media_type, digest, size) for n in image.names] \
            or [{"mediaType": image.media_type, "digest": digest, "size": size}]
        entries.append({
            "Config": f"blobs/sha256/{image.info.id[7:]}",
            "RepoTags": [_familiar(n) for n in image.names if "@" not in n],
            "Layers": [f"blobs/sha256/{layer.digest[7:]}" for layer in image.info.layers]})
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    return (json.dumps(index, sort_keys=True, separators=(",", ":")).encode(),
            json.dumps(entries, separators=(",", ":")).encode())


async def _write_archive(client: ImagesClient, images: list[_Exported], out: _TarOut) -> None:
    index, docker_manifest = _metadata(images)
    out.file("oci-layout", json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode())
    out.file("index.json", index)
    out.file("manifest.json", docker_manifest)
    out.header("blobs/", 0, directory=True)
    out.header("blobs/sha256/", 0, directory=True)
    written: set[str] = set()
    for image in images:
        if image.info.manifest_digest not in written:
            out.file(f"blobs/sha256/{image.info.manifest_digest[7:]}", image.manifest)
            written.add(image.info.manifest_digest)
        blobs = [(image.info.id, image.config_size),
                 *((layer.digest, layer.size) for layer in image.info.layers)]
        for digest, size in blobs:
            if digest in written:
                continue
            written.add(digest)
            out.header(f"blobs/sha256/{digest[7:]}", size)
            await _copy_blob(client, digest, size, out)
            out.end_file(size)
    out.close()


async def export_images(bus: Bus, namespace: str, path: Path, refs: list[str]) -> int:
    client = ImagesClient(bus, namespace=namespace)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        images = await _exported(client, refs)
        # Writes are page-cache copies of at most 512 KiB: made on the loop, in order.
        with await asyncio.to_thread(open, tmp, "xb") as fh:
            out = _TarOut(fh)
            await _write_archive(client, images, out)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (ShoalError, TransferError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        print(f"shoal image export: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
        return 1
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for image in images:
        for name in image.names or [image.info.id]:
            print(f"Exported {name} ({image.info.manifest_digest})")
    print(f"Wrote {path} ({human(out.written)})")
    return 0
