"""`docker tag`, `docker rmi` and `docker image prune` over the puller's names.

The puller has no verb to add or drop one name of an image: `images.remove` drops every
name (then collects garbage), and names are added by an import (`images.import.*`), which
checks the image whole. So a tag is an import of blobs the store already holds (nothing is
sent, only the names committed), and removing one of several names is: lease every blob
of the image under an import id (garbage collection keeps them), remove all its names,
commit the others again, drop the lease. A gateway killed between the remove and the
commit loses the image's other names (its blobs stay leased until the lease expires); a
puller verb dropping one name would close that window (see the report of issue #16)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

from shoal_common.clients import ImagesClient
from shoal_common.errors import ShoalError
from shoal_common.messages.images import ContentInfoRequest, ImageInfo, ImageRemoveRequest
from shoal_common.messages.transfer import (
    ImportAbortRequest,
    ImportBeginRequest,
    ImportBlob,
    ImportCommitRequest,
    ImportImage,
)

from shoal_docker_gateway.domain import events
from shoal_docker_gateway.domain.backend import Backend
from shoal_docker_gateway.domain.images import (
    config_of,
    created_of,
    find,
    label_match,
    labels_of,
    list_all,
    until_seconds,
)
from shoal_docker_gateway.domain.images_refs import Ref, familiar, parse, split_name
from shoal_docker_gateway.errors import BadParameter, Conflict, Unavailable
from shoal_docker_gateway.store.containers import ContainerRecord, Containers


async def _blobs(client: ImagesClient, info: ImageInfo, extra: list[str]) -> list[ImportBlob]:
    digests = dict.fromkeys([info.target_digest, info.manifest_digest, info.id, *extra])
    blobs = [ImportBlob(digest=d, size=(await client.content_info(
        ContentInfoRequest(digest=d))).size) for d in digests]
    have = {b.digest for b in blobs}
    blobs += [ImportBlob(digest=layer.digest, size=layer.size) for layer in info.layers
              if layer.digest not in have]
    return blobs


async def _leased(client: ImagesClient, info: ImageInfo, extra: list[str]) -> str:
    """An import id holding every blob of the image (none may be missing)."""
    import_id = f"docker-{uuid.uuid4().hex}"
    begun = await client.import_begin(ImportBeginRequest(
        import_id=import_id, blobs=await _blobs(client, info, extra)))
    if begun.missing:
        await _abort(client, import_id)
        raise Unavailable(f"image {info.id} lacks {len(begun.missing)} of its blobs in the "
                          "content store")
    return import_id


async def _abort(client: ImagesClient, import_id: str) -> None:
    with contextlib.suppress(ShoalError):
        await client.import_abort(ImportAbortRequest(import_id=import_id))


def _groups(info: ImageInfo, names: list[str]) -> list[ImportImage]:
    """The names to commit, each with the digest it points at: a digest name its own, a tag
    the image's target (the puller keeps one target per image here)."""
    by_digest: dict[str, list[str]] = {}
    for name in names:
        digest = split_name(name)[2] or info.target_digest
        by_digest.setdefault(digest, []).append(name)
    return [ImportImage(digest=d, names=n) for d, n in by_digest.items()]


# Name changes made here, one at a time: a tag added while another name of the same image is
# being removed and committed again would be lost with it.
_NAMES = asyncio.Lock()


async def tag(backend: Backend, source: str, target: Ref) -> None:
    """POST /images/{name}/tag: `target` names the image `source` names (201)."""
    async with _NAMES:
        image_id = await _tag(backend, source, target)
    await events.emit(backend, "image", "tag", image_id, {"name": familiar(str(target))})


async def _tag(backend: Backend, source: str, target: Ref) -> str:
    info = await find(backend, source)
    if str(target) in info.names:
        return info.id
    client = backend.clients.images
    import_id = await _leased(client, info, [])
    try:
        await client.import_commit(ImportCommitRequest(import_id=import_id, images=[
            ImportImage(digest=info.target_digest, names=[str(target)])]))
    finally:
        await _abort(client, import_id)
    return info.id


async def _rename(backend: Backend, info: ImageInfo, keep: list[str]) -> list[str]:
    """Leave the image only the names `keep`; the deleted blobs (when `keep` is empty)."""
    client = backend.clients.images
    if not keep:  # every name goes: nothing to keep leased
        return list((await client.remove(ImageRemoveRequest(ref=info.id))).deleted_blobs)
    groups = _groups(info, keep)
    import_id = await _leased(client, info, [g.digest for g in groups])
    try:
        reply = await client.remove(ImageRemoveRequest(ref=info.id))
        await client.import_commit(ImportCommitRequest(import_id=import_id, images=groups))
        return list(reply.deleted_blobs)
    finally:
        await _abort(client, import_id)


async def users(backend: Backend, image_id: str) -> list[ContainerRecord]:
    return [c for c in await Containers(backend.records).all() if c.image_id == image_id]


def _short(ident: str) -> str:
    return ident.removeprefix("sha256:")[:12]


def _check_users(info: ImageInfo, using: list[ContainerRecord], force: bool, what: str) -> None:
    running = [c for c in using if c.state in ("running", "creating")]
    if running:
        raise Conflict(f"conflict: unable to {what} (cannot be forced) - image is being used "
                       f"by running container {_short(running[0].id)}")
    if using and not force:
        raise Conflict(f"conflict: unable to {what} (must be forced) - image is being used by "
                       f"stopped container {_short(using[0].id)}")


def _untag_plan(info: ImageInfo, ref: Ref) -> list[str]:
    """The names left after untagging `ref` (Docker drops a repository's digest names with
    its last tag)."""
    name = str(ref)
    left = [n for n in info.names if n != name]
    repo = ref.repository
    if not ref.digest and not any(split_name(n)[0] == repo and not split_name(n)[2]
                                  for n in left):
        left = [n for n in left if split_name(n)[0] != repo]
    return left


async def remove(backend: Backend, ref: str, force: bool) -> list[dict[str, str]]:
    """DELETE /images/{name}: Docker's list of `Untagged` and `Deleted` items."""
    async with _NAMES:
        items = await _remove(backend, ref, force)
    for item in items:
        for action, what in item.items():
            await events.emit(backend, "image", "untag" if action == "Untagged" else "delete",
                              what, {"name": what})
    return items


async def _remove(backend: Backend, ref: str, force: bool) -> list[dict[str, str]]:
    info = await find(backend, ref)
    using = await users(backend, info.id)
    parsed: Ref | None = None
    if not ref.startswith("sha256:"):
        with contextlib.suppress(BadParameter):
            parsed = parse(ref)
    if parsed is not None and str(parsed) in info.names:
        left = _untag_plan(info, parsed)
        if not left:
            _check_users(info, using, force, f"remove repository reference {ref!r}")
    else:  # by id (or id prefix): every name goes
        repos = {split_name(n)[0] for n in info.names}
        if len(repos) > 1 and not force:
            raise Conflict(f"conflict: unable to delete {_short(info.id)} (must be forced) - "
                           "image is referenced in multiple repositories")
        _check_users(info, using, force, f"delete {_short(info.id)}")
        left = []
    gone = [n for n in info.names if n not in left]
    deleted = await _rename(backend, info, left)
    items = [{"Untagged": familiar(n)} for n in gone]
    if not left:
        items.append({"Deleted": info.id})
        items += [{"Deleted": d} for d in deleted if d != info.id]
    return items


async def prune(backend: Backend, filters: dict[str, list[str]]) -> dict[str, Any]:
    """POST /images/prune: unused images (only untagged ones unless dangling=false)."""
    dangling = filters.get("dangling", ["true"])
    if any(v not in ("true", "false", "1", "0") for v in dangling):
        raise BadParameter(f"invalid filter 'dangling={dangling[0]}'")
    only_dangling = dangling[0] in ("true", "1")
    until = min((until_seconds(u) for u in filters.get("until", [])), default=None)
    used = {c.image_id for c in await Containers(backend.records).all()}
    removed: list[dict[str, str]] = []
    reclaimed = 0
    for info in await list_all(backend):
        config = config_of(info)
        if info.id in used or (only_dangling and info.repo_tags):
            continue
        if until is not None and created_of(info, config) >= until:
            continue
        labels = labels_of(config)
        if "label" in filters and not label_match(labels, filters["label"]):
            continue
        if "label!" in filters and any(label_match(labels, [x]) for x in filters["label!"]):
            continue
        async with _NAMES:
            deleted = await _rename(backend, info, [])
        removed += [{"Untagged": familiar(n)} for n in info.names]
        removed.append({"Deleted": info.id})
        if deleted:
            reclaimed += info.size
    return {"ImagesDeleted": removed or None, "SpaceReclaimed": reclaimed}
