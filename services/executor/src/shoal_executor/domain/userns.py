"""A pod in its own user namespace: the namespace itself, its network namespace, and the
rootfs and volumes mounted so that ids inside mean what they mean in the image.

The user namespace is made once per pod by a helper (`idmap.UsernsHelper`, which also
makes the pod's network namespace inside it) and kept mounted at `<pod dir>/userns`, as a
named network namespace is kept: the pause container and every container join it by that
path, and the executor idmaps their mounts with it. A rootfs is an overlay whose lower
layers are idmapped and whose upper directory's root the pod's root owns (overlayfs
creates its work files as the mounter, root, which an idmapped upper layer would refuse),
or an idmapped bind of a native snapshot."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from cri_api.v1 import api_pb2 as cri
from shoal_common.errors import Internal
from shoal_common.messages.snapshots import Mount

from shoal_executor.domain import mounts, netns
from shoal_executor.domain.checks.userns import IdMap
from shoal_executor.domain.idmap import UsernsHelper, idmapped_mount, mount_attrs, userns_fd

USERNS_FILE = "userns"  # in the pod's directory
IDMAP_FILE = "userns.json"  # its mappings (checks.userns.IdMap), absent for the host's
LOWERS_DIR = "l"  # in a bundle: idmapped lower layers, detached once the overlay holds them
VOLUMES_DIR = "v"  # in a bundle: the container's idmapped volumes, by mount index


def userns_path(pod_dir: Path) -> Path:
    return pod_dir / USERNS_FILE


def pod_idmap(pod_dir: Path) -> IdMap | None:
    """The pod's mappings, None for the host's user namespace: from the executor's own
    file, never from a container create's copy of the pod config, which may say otherwise."""
    try:
        return IdMap.from_json((pod_dir / IDMAP_FILE).read_text())
    except FileNotFoundError:
        return None


def ns_file(pod_dir: Path, idmap: IdMap | None) -> str:
    """What a container of the pod joins ("" = the host's user namespace)."""
    return str(userns_path(pod_dir)) if idmap is not None else ""


async def make_netns(pod_dir: Path, name: str, idmap: IdMap | None) -> None:
    """The pod's network namespace: owned by its user namespace, made with it, if it has
    one (its mappings written first, so that a retry knows)."""
    if idmap is None:
        await netns.create(name)
        return
    fd = os.open(pod_dir / IDMAP_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(idmap.to_json())
    await make_pod_namespaces(pod_dir, idmap, name)


async def unmount_pod(pod_dir: Path) -> None:
    await mounts.unmount(str(userns_path(pod_dir)))


async def make_pod_namespaces(pod_dir: Path, idmap: IdMap, netns_name: str) -> None:
    """The pod's user namespace at `<pod dir>/userns` and network namespace `netns_name`
    owned by it. A retry after both were made keeps them; after half, both are made anew
    (nothing has joined them: the pause container starts after)."""
    path = userns_path(pod_dir)
    if mounts.is_mountpoint(str(path)) and mounts.is_mountpoint(netns.netns_path(netns_name)):
        return
    await mounts.unmount(str(path))
    await netns.delete(netns_name)
    async with UsernsHelper(idmap, net=True) as helper:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        os.close(fd)
        try:
            mounts.mount(helper.ns("user"), str(path), "", ["bind"])
        except OSError as exc:
            raise Internal(f"keeping the pod's user namespace: {exc.strerror}") from None
        await netns.create(netns_name, owner_pid=helper.pid)


@contextlib.asynccontextmanager
async def _userns_fd(pod_dir: Path, idmap: IdMap, pod: IdMap) -> AsyncIterator[int]:
    """An fd of a user namespace with `idmap`: the pod's own when the mappings are its."""
    if idmap != pod:
        async with userns_fd(idmap) as fd:
            yield fd
        return
    fd = os.open(userns_path(pod_dir), os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _overlay(m: Mount, target: str, lowers: Path, fd: int, root: tuple[int, int]) -> None:
    lowers.mkdir(mode=0o700, exist_ok=True)
    mounts.unmount_below(str(lowers))  # what an interrupted attempt left
    made: list[Path] = []
    options = []
    try:
        for option in m.options:
            key, _, value = option.partition("=")
            if key == "lowerdir":
                for layer in value.split(":"):
                    made.append(lowers / str(len(made)))
                    made[-1].mkdir(mode=0o700, exist_ok=True)
                    idmapped_mount(layer, str(made[-1]), fd, recursive=False)
                option = "lowerdir=" + ":".join(str(p) for p in made)
            elif key == "upperdir":
                os.chown(value, *root)  # the merged root directory is the upper one
            options.append(option)
        mounts.mount("overlay", target, "overlay", options)
    finally:
        mounts.unmount_below(str(lowers))  # the overlay holds its own references
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()


async def mount_rootfs(rootfs: list[Mount], target: str, bundle: Path, pod_dir: Path,
                       idmap: IdMap | None) -> None:
    """The rootfs at `target` as the pod's user namespace sees it (idempotent, as
    mounts.mount_all, which mounts it for the host's); `rootfs` was confined to the
    snapshots by the checks."""
    if idmap is None:
        await mounts.mount_all(rootfs, target)
        return
    os.makedirs(target, exist_ok=True)
    if mounts.is_mountpoint(target):
        return
    try:
        async with _userns_fd(pod_dir, idmap, idmap) as fd:
            for m in rootfs:
                if m.type == "overlay":
                    _overlay(m, target, bundle / LOWERS_DIR, fd, idmap.host_root())
                    continue
                idmapped_mount(m.source, target, fd, attrs=mount_attrs(list(m.options)))
    except OSError as exc:
        raise Internal(f"mounting the rootfs idmapped at {target}: {exc.strerror} "
                       f"({exc.filename or exc})") from None


async def mount_volumes(config: cri.ContainerConfig, maps: dict[int, IdMap], bundle: Path,
                        pod_dir: Path, pod: IdMap | None) -> dict[int, str]:
    """Idmapped copies of the volumes `maps` names (mount index → mappings), made in the
    bundle: mount index → the path to bind instead of the host path. A host path that does
    not exist is left to the spec's check, which names it."""
    out: dict[int, str] = {}
    volumes = bundle / VOLUMES_DIR
    for i, idmap in sorted(maps.items()):
        source = config.mounts[i].host_path
        if not os.path.exists(source):
            continue
        target = volumes / str(i)
        out[i] = str(target)
        if mounts.is_mountpoint(str(target)):
            continue  # a retry
        volumes.mkdir(mode=0o711, exist_ok=True)
        if os.path.isdir(source):
            target.mkdir(mode=0o711, exist_ok=True)
        else:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))
        try:
            async with _userns_fd(pod_dir, idmap, pod or idmap) as fd:
                idmapped_mount(source, str(target), fd)
        except OSError as exc:
            raise Internal(f"idmapping volume {source}: {exc.strerror}") from None
    return out
