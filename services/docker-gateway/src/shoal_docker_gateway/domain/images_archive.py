"""`docker save` and `docker load`, with `shoal image export/import`'s code (shoal_cli's
transfer, archive and layouts modules): the same checks, the same archive.

Save streams the archive (OCI image layout that also has Docker's manifest.json, which
`docker load` of any version reads) as it is read from the puller: the tar writer fills a
buffer, and every blob read first hands what is buffered to the client, so no more than a
few reads' worth is ever held. Load spools the request body to a file (an archive is read
twice: checked whole, then its missing blobs sent), then imports it as the CLI does."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from aiohttp import StreamReader
from shoal_cli import transfer
from shoal_cli.archive import ArchiveError, scan
from shoal_cli.layouts import plan_import
from shoal_common.clients import ImagesClient
from shoal_common.errors import ShoalError
from shoal_common.messages.images import ContentReadReply, ContentReadRequest, ImageInfo
from shoal_common.messages.transfer import ImportAbortRequest

from shoal_docker_gateway.domain import events, paths
from shoal_docker_gateway.domain.backend import Backend
from shoal_docker_gateway.domain.images import find
from shoal_docker_gateway.domain.images_refs import familiar, looks_like_id, parse
from shoal_docker_gateway.errors import BadParameter, DockerError

Write = Callable[[bytes], Awaitable[None]]
SPOOL_CHUNK = 1 << 20
STALE_SPOOL = 24 * 3600.0  # a spool file this old was left by a killed gateway


class _Buffer:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, chunk: bytes) -> None:
        self.data += chunk


class _Paced:
    """The images client for the archive writer: each blob read first sends the client
    what the writer has buffered (in order, under a lock: reads run concurrently)."""

    def __init__(self, client: ImagesClient, buffer: _Buffer, write: Write) -> None:
        self.client, self.buffer, self.write = client, buffer, write
        self.lock = asyncio.Lock()

    async def flush(self) -> None:
        async with self.lock:
            data, self.buffer.data = bytes(self.buffer.data), bytearray()
            if data:
                await self.write(data)

    async def content_read(self, message: ContentReadRequest, *,
                           timeout: float | None = None) -> ContentReadReply:
        await self.flush()
        return await self.client.content_read(message, timeout=timeout)


async def _exports(backend: Backend, refs: list[str]) -> list[Any]:
    """What to save: each image once, under the names asked for (an id: all its tags)."""
    client = backend.clients.images
    infos: list[ImageInfo] = [await find(backend, ref) for ref in refs]  # 404s first
    images: dict[str, Any] = {}
    for ref, info in zip(refs, infos, strict=True):
        names = [str(parse(ref))] if not looks_like_id(ref) and \
            str(parse(ref)) in info.names else None
        if info.id in images:
            known = images[info.id]
            known.names += [n for n in (names or []) if n not in known.names]
            continue
        [exported] = await transfer._exported(client, [info.id])
        images[info.id] = replace(exported, names=names) if names else exported
    return list(images.values())


async def save(backend: Backend, refs: list[str]) -> Callable[[Write], Awaitable[None]]:
    """Checks every name (a 404 before any byte), then gives the function that writes the
    archive."""
    images = await _exports(backend, refs)

    async def write_all(write: Write) -> None:
        buffer = _Buffer()
        paced = _Paced(backend.clients.images, buffer, write)
        out = transfer._TarOut(buffer)  # type: ignore[arg-type]
        await transfer._write_archive(cast(ImagesClient, paced), images, out)
        await paced.flush()
        for ref in refs:
            await events.emit(backend, "image", "save", ref, {"name": ref})

    return write_all


def _clean_spool(spool: Path) -> None:
    spool.mkdir(parents=True, exist_ok=True, mode=0o700)
    for old in spool.glob("load-*.tar"):
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > STALE_SPOOL:
                old.unlink()


async def _spool(body: StreamReader, path: Path) -> int:
    total = 0
    with open(path, "xb") as fh:  # noqa: ASYNC230 (writes go to a thread; open is instant)
        while chunk := await body.read(SPOOL_CHUNK):
            total += len(chunk)
            await asyncio.to_thread(fh.write, chunk)
    return total


async def load(backend: Backend, body: StreamReader) -> AsyncIterator[str]:
    """POST /images/load: import the archive in the body; the lines Docker prints."""
    spool = paths.state_dir(backend) / "spool"
    await asyncio.to_thread(_clean_spool, spool)
    path = spool / f"load-{uuid.uuid4().hex}.tar"
    client = backend.clients.images
    import_id = f"docker-{uuid.uuid4().hex}"
    try:
        if not await _spool(body, path):
            raise BadParameter("empty request body: send an image archive (docker save)")
        try:
            contents = await asyncio.to_thread(scan, path)
            plan = plan_import(contents)
        except ArchiveError as exc:
            raise BadParameter(f"invalid image archive: {exc}") from None
        try:
            infos = await transfer._send_and_commit(client, import_id, path, plan)
        except (ShoalError, ArchiveError, transfer.TransferError) as exc:
            with contextlib.suppress(ShoalError):
                await asyncio.shield(client.import_abort(ImportAbortRequest(
                    import_id=import_id)))
            if isinstance(exc, ShoalError):
                raise
            raise DockerError(f"loading the archive failed: {exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    for info in infos:
        tags = [familiar(n) for n in info.repo_tags]
        await events.emit(backend, "image", "load", info.id,
                          {"name": tags[0] if tags else info.id})
        for tag in tags:
            yield f"Loaded image: {tag}\n"
        if not tags:
            yield f"Loaded image ID: {info.id}\n"
