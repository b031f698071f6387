"""The image volumes of `container.create` (KEP-4639): CRI mounts whose `image` is set.

The gateway names, as such a mount's host_path, the directory of the image's read-only view
snapshot. It is accepted only as a directory of a snapshot under the snapshotter's snapshots
dir (the rootfs mounts' confinement); a CRI mount without `image` keeps its host path as it
is. `image_sub_path` is resolved inside that directory one component at a time through file
descriptors (`open_beneath`): no `..` or absolute sub path, no symlink that is absolute or
climbs above the image root, and the end a directory (the KEP mounts no single files). The
descriptor of the end is what gets mounted, so nothing can be swapped between the check and
the mount."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cri_api.v1 import api_pb2 as cri
from shoal_common.errors import Invalid

from shoal_executor.domain.checks.rootfs import _confined
from shoal_executor.domain.checks.text import check_no_nul, refuse, shown

MAX_LINKS = 40  # as the kernel's MAXSYMLINKS: a symlink loop ends here


@dataclass(frozen=True)
class ImageVolume:
    index: int  # in ContainerConfig.mounts
    root: str  # the view's directory, resolved and confined
    sub_path: str  # relative, without `..` components ("" = the whole image)


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def check_sub_path(field: str, sub_path: str) -> str:
    """`sub_path` as components joined by "/", or Invalid: it must stay inside the image
    whatever lies in it, so absolute paths and `..` are refused before any lookup."""
    check_no_nul(field, sub_path)
    if sub_path.startswith("/"):
        raise refuse(field, f"{shown(sub_path)} is absolute; it must be relative to the "
                     "image's root")
    parts = _parts(sub_path)
    if ".." in parts:
        raise refuse(field, f"{shown(sub_path)} contains '..'")
    return "/".join(parts)


def open_beneath(root: str, sub_path: str, field: str) -> int:
    """An O_PATH descriptor of the directory `sub_path` names below `root`, every symlink
    on the way followed inside `root` only; Invalid when it leads out, is missing or is not
    a directory. The caller closes it."""
    stack = [os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)]  # walked dirs
    todo = _parts(sub_path)
    links = 0
    try:
        while todo:
            name = todo.pop(0)
            if name == "..":  # only from a symlink's target
                if len(stack) == 1:
                    raise refuse(field, f"{shown(sub_path)}: a symlink leads out of the image")
                os.close(stack.pop())
                continue
            try:
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
            except FileNotFoundError:
                raise refuse(field, f"{shown(sub_path)} does not exist in the image") from None
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                target = os.readlink("", dir_fd=fd)  # the link this descriptor holds
                os.close(fd)
                links += 1
                if links > MAX_LINKS:
                    raise refuse(field, f"{shown(sub_path)}: more than {MAX_LINKS} symlinks")
                if target.startswith("/"):  # on the host, that is outside the image
                    raise refuse(field, f"{shown(sub_path)}: symlink {shown(name)} -> "
                                 f"{shown(target)} leads out of the image")
                todo[:0] = _parts(target)
                continue
            stack.append(fd)
            if not stat.S_ISDIR(mode):
                raise refuse(field, f"{shown(sub_path)} is not a directory in the image")
        return stack.pop()
    finally:
        for fd in stack:
            os.close(fd)


def check_image_volumes(config: cri.ContainerConfig, snapshots_dir: Path) -> list[ImageVolume]:
    """The image mounts of `config`, checked (their sub paths resolved once, so a bad one
    is refused before anything is made), or Invalid naming the first bad field."""
    root = os.path.realpath(snapshots_dir)
    out = []
    for i, m in enumerate(config.mounts):
        if not m.HasField("image"):
            continue
        field = f"ContainerConfig.mounts[{i}]"
        if not m.host_path:
            raise Invalid(f"{field}.host_path: an image volume needs the directory of its "
                          "image's view")
        view = _confined(f"{field}.host_path", m.host_path, root)
        sub_path = check_sub_path(f"{field}.image_sub_path", m.image_sub_path)
        os.close(open_beneath(view, sub_path, f"{field}.image_sub_path"))
        out.append(ImageVolume(i, view, sub_path))
    return out
