"""`docker system df` and `docker container prune`.

Sizes are what the node stores: an image's is its content as the puller keeps it
(compressed layers, as `docker images` shows), LayersSize counts every blob of the
Docker namespace's images once, and an image's SharedSize is the part of its layers other
images use too. A container's SizeRw is its writable snapshot (the snapshotter's usage),
SizeRootFs that plus its image. Volumes are measured on disk, referenced by the
containers that name them."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import structlog
from shoal_common.errors import ShoalError
from shoal_common.messages.images import ImageInfo
from shoal_common.messages.snapshots import SnapshotKeyRequest

from shoal_docker_gateway.domain import containers as lifecycle
from shoal_docker_gateway.domain import containers_view as view
from shoal_docker_gateway.domain import images, volumes
from shoal_docker_gateway.domain.backend import Backend
from shoal_docker_gateway.domain.events_filters import (
    Filters,
    labels_match,
    negated_labels_match,
)
from shoal_docker_gateway.errors import Conflict, from_exception
from shoal_docker_gateway.store.containers import ContainerRecord, Containers

log = structlog.get_logger("shoal.docker")

CONTAINER_PRUNE_FILTERS = ("until", "label", "label!")
_PARALLEL = 8  # snapshot usage and volume walks at a time


async def rw_size(backend: Backend, rec: ContainerRecord) -> int:
    """Bytes of the container's writable layer; 0 when it has none now."""
    if not rec.cri_id:
        return 0
    try:
        return (await backend.clients.snapshots.usage(SnapshotKeyRequest(key=rec.cri_id))).size
    except ShoalError:
        return 0  # removed meanwhile, or never made: nothing of it on disk


def _layer_sizes(infos: list[ImageInfo]) -> tuple[int, Counter[str]]:
    """Every stored byte once (layers by digest, each image's manifest and config), and how
    many images hold each layer."""
    users: Counter[str] = Counter()
    sizes: dict[str, int] = {}
    own = 0
    for info in infos:
        for layer in {la.digest: la for la in info.layers}.values():
            users[layer.digest] += 1
            sizes[layer.digest] = layer.size
        own += max(0, info.size - sum(la.size for la in info.layers))
    return own + sum(sizes.values()), users


def _image_rows(infos: list[ImageInfo], users: Counter[str],
                uses: Counter[str]) -> list[dict[str, Any]]:
    rows = []
    for info in infos:
        row = images.summary(info)
        row["SharedSize"] = sum(la.size for la in {la.digest: la for la in info.layers}
                                .values() if users[la.digest] > 1)
        row["Containers"] = uses[info.id]
        rows.append(row)
    rows.sort(key=lambda r: r["Created"], reverse=True)
    return rows


async def _bounded(jobs: list[Any]) -> list[Any]:
    gate = asyncio.Semaphore(_PARALLEL)

    async def one(job: Any) -> Any:
        async with gate:
            return await job

    return list(await asyncio.gather(*(one(j) for j in jobs)))


async def _container_rows(backend: Backend, records: list[ContainerRecord],
                          image_sizes: dict[str, int]) -> list[dict[str, Any]]:
    rows = await view.listing(backend, all_=True, filters={})
    by_id = {r.id: r for r in records}
    known = [row for row in rows if row["Id"] in by_id]
    sizes = await _bounded([rw_size(backend, by_id[row["Id"]]) for row in known])
    for row, size in zip(known, sizes, strict=True):
        row["SizeRw"] = size
        row["SizeRootFs"] = size + image_sizes.get(row["ImageID"], 0)
    return known


async def _volume_rows(backend: Backend) -> list[dict[str, Any]]:
    used = await volumes.users(backend)
    found = await volumes.listing(backend, {})
    sizes = await _bounded([asyncio.to_thread(volumes.dir_size,
                                              volumes.data_dir(backend, v.name))
                            for v in found])
    return [volumes.doc(backend, v, size=size, refs=len(used.get(v.name, [])))
            for v, size in zip(found, sizes, strict=True)]


async def usage(backend: Backend) -> dict[str, Any]:
    """GET /system/df."""
    infos = await images.list_all(backend, with_config=True)
    records = [r for r in await Containers(backend.records).all()
               if r.state not in ("creating", "removing")]
    layers_size, users = _layer_sizes(infos)
    uses = Counter(r.image_id for r in records)
    return {
        "LayersSize": layers_size,
        "Images": _image_rows(infos, users, uses),
        "Containers": await _container_rows(backend, records,
                                            {i.id: i.size for i in infos}),
        "Volumes": await _volume_rows(backend),
        "BuildCache": [],
        "BuilderSize": 0,
    }


def _prunable(rec: ContainerRecord, filters: Filters, until: float | None) -> bool:
    labels = rec.config.get("Labels")
    labels = dict(labels) if isinstance(labels, dict) else {}
    if until is not None and rec.created >= until:
        return False
    return (labels_match(labels, filters.get("label", []))
            and negated_labels_match(labels, filters.get("label!", [])))


async def prune_containers(backend: Backend, filters: Filters) -> dict[str, Any]:
    """POST /containers/prune: every container not running that the filters keep, removed
    as `docker rm` removes it (its volumes stay)."""
    until = min((images.until_seconds(u) for u in filters.get("until", [])), default=None)
    deleted: list[str] = []
    reclaimed = 0
    for rec in await Containers(backend.records).all():
        if rec.state in ("creating", "removing") or not _prunable(rec, filters, until):
            continue
        seen = await lifecycle.observe(backend, rec)
        if seen.status == "running":
            continue
        size = await rw_size(backend, rec)
        try:
            await lifecycle.remove(backend, rec, force=False, volumes=False)
        except Conflict:
            continue  # started meanwhile
        except Exception as exc:  # the CRI or a service refused: the others go on
            log.warning("container prune could not remove a container", container=rec.id,
                        error=from_exception(exc)[1])
            continue
        deleted.append(rec.id)
        reclaimed += size
    log.info("containers pruned", count=len(deleted), reclaimed=reclaimed)
    return {"ContainersDeleted": deleted or None, "SpaceReclaimed": reclaimed}
