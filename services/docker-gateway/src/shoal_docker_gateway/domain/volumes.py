"""Docker's named volumes (driver `local`): a row in the records and a directory
<volumes_dir>/<name>/_data that containers bind. `ensure_volume` is also what container
create calls for `-v NAME:/path` (Docker makes a missing volume on first use)."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal_docker_gateway.domain import events, paths
from shoal_docker_gateway.domain.backend import Backend
from shoal_docker_gateway.domain.events_filters import (
    Filters,
    bool_filter,
    labels_match,
    negated_labels_match,
)
from shoal_docker_gateway.errors import BadParameter, Conflict, NotFound, Unsupported
from shoal_docker_gateway.store.containers import ContainerRecord, Containers
from shoal_docker_gateway.store.volumes import VolumeRecord, Volumes

NAME_RE = re.compile(r"\A[a-zA-Z0-9][a-zA-Z0-9_.-]{1,254}\Z")
LIST_FILTERS = ("name", "label", "label!", "dangling", "driver")
PRUNE_FILTERS = ("label", "label!")
MAX_LABELS = 256


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BadParameter(f"create {name}: {name!r} includes invalid characters for a local "
                           "volume name, only \"[a-zA-Z0-9][a-zA-Z0-9_.-]\" are allowed. If "
                           "you intended to pass a host directory, use absolute path")
    return name


def str_map(value: Any, field: str) -> dict[str, str]:
    """A client's string→string map (Labels, DriverOpts); null is {}."""
    if value is None:
        return {}
    if (not isinstance(value, dict) or len(value) > MAX_LABELS
            or not all(isinstance(k, str) and isinstance(v, str) and len(k) + len(v) < 4096
                       for k, v in value.items())):
        raise BadParameter(f"invalid {field}: expected an object of up to {MAX_LABELS} "
                           "string values")
    return dict(value)


def data_dir(backend: Backend, name: str) -> Path:
    return paths.volumes_dir(backend) / name / "_data"


def _make_dirs(base: Path, name: str, fresh: bool) -> Path:
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    top = base / name
    if fresh and top.exists():
        shutil.rmtree(top)  # a remove cut short left it: a new volume starts empty
    top.mkdir(mode=0o700, exist_ok=True)
    data = top / "_data"
    data.mkdir(mode=0o755, exist_ok=True)
    return data


async def create(backend: Backend, name: str, labels: dict[str, str] | None = None,
                 options: dict[str, str] | None = None) -> VolumeRecord:
    """The volume `name`, made if new (the row first, then its directory); an existing one
    is returned as it is, as Docker does."""
    check_name(name)
    if options:
        raise Unsupported("volume driver options (type, device, o) are not supported by "
                          "Shoal's local driver")
    rec, made = await Volumes(backend.records).insert_or_get(
        VolumeRecord(name=name, labels=labels or {}, options={}))
    await asyncio.to_thread(_make_dirs, paths.volumes_dir(backend), name, made)
    if made:
        await events.emit(backend, "volume", "create", name, {"driver": "local"})
    return rec


async def ensure_volume(backend: Backend, name: str) -> Path:
    """The host directory of volume `name` (made if missing), for a container's bind."""
    await create(backend, name)
    return data_dir(backend, name)


def anonymous_name() -> str:
    return secrets.token_hex(32)


async def get(backend: Backend, name: str) -> VolumeRecord:
    rec = await Volumes(backend.records).get(name) if isinstance(name, str) else None
    if rec is None:
        raise NotFound(f"get {name}: no such volume")
    return rec


def names_in(config: dict[str, Any]) -> set[str]:
    """The named volumes a container's create body uses (HostConfig Binds and Mounts)."""
    hc = config.get("HostConfig")
    hc = hc if isinstance(hc, dict) else {}
    out: set[str] = set()
    for bind in hc.get("Binds") or []:
        if isinstance(bind, str):
            src = bind.split(":", 1)[0]
            if ":" in bind and src and not src.startswith("/"):
                out.add(src)
    for mount in hc.get("Mounts") or []:
        if isinstance(mount, dict) and mount.get("Type") == "volume" and mount.get("Source"):
            out.add(str(mount["Source"]))
    return out


def _in_use(containers: list[ContainerRecord]) -> dict[str, list[str]]:
    used: dict[str, list[str]] = {}
    for c in containers:
        for name in names_in(c.config):
            used.setdefault(name, []).append(c.id)
    return used


async def users(backend: Backend) -> dict[str, list[str]]:
    """Volume name → the ids of the containers (any state) that name it."""
    return _in_use(await Containers(backend.records).all())


async def remove(backend: Backend, name: str, force: bool = False) -> None:
    rec = await Volumes(backend.records).get(name)
    if rec is None:
        if force:
            return
        raise NotFound(f"get {name}: no such volume")
    using = (await users(backend)).get(name)
    if using:
        raise Conflict(f"remove {name}: volume is in use - [{', '.join(using)}]")
    await _delete(backend, name)


async def _delete(backend: Backend, name: str) -> None:
    # The directory first: a remove cut short keeps the row, and the next remove finishes.
    await asyncio.to_thread(shutil.rmtree, paths.volumes_dir(backend) / name, True)
    await Volumes(backend.records).delete(name)
    await events.emit(backend, "volume", "destroy", name, {"driver": "local"})


def _matches(rec: VolumeRecord, filters: Filters, used: dict[str, list[str]]) -> bool:
    if "name" in filters and not any(n in rec.name for n in filters["name"]):
        return False
    if "driver" in filters and rec.driver not in filters["driver"]:
        return False
    if not labels_match(rec.labels, filters.get("label", [])):
        return False
    if not negated_labels_match(rec.labels, filters.get("label!", [])):
        return False
    dangling = bool_filter(filters, "dangling")
    return dangling is None or dangling == (rec.name not in used)


async def listing(backend: Backend, filters: Filters) -> list[VolumeRecord]:
    used = await users(backend) if "dangling" in filters else {}
    return [r for r in await Volumes(backend.records).all() if _matches(r, filters, used)]


def dir_size(path: Path) -> int:
    """Bytes of the files under `path` (hard links once, symlinks not followed)."""
    total, seen = 0, set()
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512 if st.st_blocks else st.st_size
    return total


@dataclass
class PruneResult:
    deleted: list[str]
    reclaimed: int


async def prune(backend: Backend, filters: Filters) -> PruneResult:
    """Every volume no container names (API 1.41: anonymous and named alike)."""
    used = await users(backend)
    out = PruneResult([], 0)
    for rec in await Volumes(backend.records).all():
        if rec.name in used or not _matches(rec, {k: v for k, v in filters.items()
                                                  if k.startswith("label")}, used):
            continue
        out.reclaimed += await asyncio.to_thread(dir_size, data_dir(backend, rec.name))
        await _delete(backend, rec.name)
        out.deleted.append(rec.name)
    return out


def doc(backend: Backend, rec: VolumeRecord, size: int | None = None,
        refs: int | None = None) -> dict[str, Any]:
    """The volume as Docker's API shows it."""
    body: dict[str, Any] = {
        "CreatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec.created)),
        "Driver": rec.driver, "Labels": rec.labels, "Mountpoint": str(data_dir(backend,
                                                                              rec.name)),
        "Name": rec.name, "Options": rec.options, "Scope": "local",
    }
    if size is not None:
        body["UsageData"] = {"Size": size, "RefCount": refs or 0}
    return body
