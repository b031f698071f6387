"""Image volumes (KEP-4639): a CRI Mount whose `image` is set mounts that image's rootfs,
read-only, at its container_path; with `image_sub_path`, only that directory of it.

kubelet pulls the image first, as it does a container's image: one that is not here is
NOT_FOUND, never pulled here. Each such mount gets a read-only view snapshot of its own on
the image's unpacked layers, keyed by the container and the mount's index (a retried create
finds the view the first made). The snapshotter mounts the view itself (LABEL_MOUNTED_VIEW),
so the view is one directory: it becomes the mount's host_path, which the executor accepts
for an image mount only inside the snapshots dir, and it resolves the sub path there
(refusing symlinks that lead out). A view keeps its image's layers (a layer with children is
never collected) and is removed with the container."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from cri_api.v1 import api_pb2 as cri
from shoal_common.clients import Clients
from shoal_common.errors import Internal, Invalid, NotFound
from shoal_common.messages.images import ImageInfo
from shoal_common.messages.snapshots import SnapshotKeyRequest, UnpackRequest, ViewRequest

# The snapshotter's label (shoal_snapshotter.domain.snapshots): mount the view, answer a
# bind of its directory.
LABEL_MOUNTED_VIEW = "shoal/mounted-view"
MAX_SUB_PATH = 4096

Lookup = Callable[[str], Awaitable[ImageInfo]]


def indices(config: cri.ContainerConfig) -> list[int]:
    """The indices (in `config.mounts`) of the image mounts."""
    return [i for i, m in enumerate(config.mounts) if m.HasField("image")]


def view_key(container_id: str, index: int) -> str:
    return f"image-volume-{container_id}-{index}"


def check(config: cri.ContainerConfig) -> None:
    """Refuse, before any work, image mounts that cannot be honoured whatever the image
    holds: no image named, a host path as well (containerd's rule), a sub path that is
    absolute or climbs with `..` (kubelet's subPath rules)."""
    for i in indices(config):
        m, field = config.mounts[i], f"CreateContainer: mounts[{i}]"
        if not m.image.image:
            raise Invalid(f"{field}: image volume names no image")
        if m.host_path:
            raise Invalid(f"{field}: host_path must be empty for an image volume")
        sub = m.image_sub_path
        if len(sub) > MAX_SUB_PATH or "\0" in sub:
            raise Invalid(f"{field}: image_sub_path is not a path")
        if sub.startswith("/") or ".." in sub.split("/"):
            raise Invalid(f"{field}: image_sub_path {sub!r} must be relative to the image's "
                          "root, without '..'")


async def find(lookup: Lookup, config: cri.ContainerConfig) -> dict[int, ImageInfo]:
    """The image of each image mount, by index; NotFound (as for the container's own
    image) when one is not pulled."""
    found = {}
    for i in indices(config):
        ref = config.mounts[i].image.image
        try:
            found[i] = await lookup(ref)
        except NotFound:
            raise NotFound(f"image {ref!r} of image volume {config.mounts[i].container_path}"
                           " not found: pull it first") from None
    return found


async def mount(clients: Clients, container_id: str, made: cri.ContainerConfig,
                images: dict[int, ImageInfo]) -> None:
    """Unpack each image and take its view; point the mount in `made` (what the executor
    gets) at the view's directory."""
    snapshots = clients.snapshots
    for i, image in images.items():
        m = made.mounts[i]
        unpacked = await snapshots.unpack(UnpackRequest(image=m.image.image,
                                                        layers=image.layers))
        reply = await snapshots.view(ViewRequest(
            key=view_key(container_id, i), parent=unpacked.chain_id,
            labels={"shoal/owner": "cri", LABEL_MOUNTED_VIEW: "true"}))
        if len(reply.mounts) != 1 or reply.mounts[0].type != "bind":
            raise Internal(f"the snapshotter's view of {m.image.image!r} is not one "
                           "directory")
        m.host_path = reply.mounts[0].source
        m.readonly = True


async def remove(clients: Clients, container_id: str, config: bytes) -> None:
    """The views of the container whose CRI config is `config` (after the executor let go
    of them); idempotent."""
    parsed = cri.ContainerConfig()
    parsed.ParseFromString(config)
    for i in indices(parsed):
        try:
            await clients.snapshots.remove(SnapshotKeyRequest(key=view_key(container_id, i)))
        except NotFound:
            pass
