"""Image volumes (KEP-4639) mounted for runc: each checked image mount (checks.image_volumes)
is bind-mounted read-only, from the descriptor its sub path resolved to, at
`<bundle>/image-volumes/<index>`, and the CRI mount is pointed there (read-only, private):
runc then binds a directory of the executor's own, never a path into the snapshots that a
container could change between the check and runc's mount."""

from __future__ import annotations

import os
from pathlib import Path

from cri_api.v1 import api_pb2 as cri
from shoal_common.messages.snapshots import Mount

from shoal_executor.domain import mounts
from shoal_executor.domain.checks.image_volumes import ImageVolume, open_beneath

DIR = "image-volumes"


async def mount_image_volumes(volumes: list[ImageVolume], config: cri.ContainerConfig,
                              bundle: Path) -> None:
    """Mount each volume in `bundle` (kept when already mounted: a retried create) and
    rewrite its CRI mount in `config` to bind that directory read-only."""
    if not volumes:
        return
    base = bundle / DIR
    base.mkdir(mode=0o700, exist_ok=True)
    for volume in volumes:
        target = base / str(volume.index)
        field = f"ContainerConfig.mounts[{volume.index}].image_sub_path"
        fd = open_beneath(volume.root, volume.sub_path, field)
        try:
            # /proc/self/fd/N binds exactly the directory the descriptor holds.
            await mounts.mount_all([Mount(type="bind", source=f"/proc/self/fd/{fd}",
                                          options=["rbind", "ro"])], str(target))
        finally:
            os.close(fd)
        m = config.mounts[volume.index]
        m.host_path = str(target)
        m.readonly = True  # an image volume is never writable, whatever was asked
        m.propagation = cri.PROPAGATION_PRIVATE


async def unmount_image_volumes(bundle: Path) -> None:
    base = bundle / DIR
    if base.is_dir() and not base.is_symlink():
        for entry in os.listdir(base):
            await mounts.unmount(str(base / entry))
