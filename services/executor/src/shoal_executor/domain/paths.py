"""The executor's directories under its run dir, made and removed there and nowhere else.

Ids are pattern-checked when a request is decoded (`ObjectId`); every path built from one
is checked once more, resolved, before anything is made or removed there. A tree is never
removed while anything is mounted below it: a rootfs left mounted would have its
snapshot's files deleted through it.

The directories are 0711 (under the service's 0700 run dir): runc and conmon pass through
them by name, nobody else lists them. The pod's files are 0644 whatever the umask: they are
bind-mounted into containers that may run as any user."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import structlog
from shoal_common.errors import Internal, Invalid
from shoal_common.fs import TRAVERSE_DIR, private_dir

from shoal_executor.domain import mounts
from shoal_executor.domain.checks.text import shown

log = structlog.get_logger("shoal.executor")

KINDS = ("sandboxes", "bundles")
# As shoal_common.messages.fields.ObjectId: one path component, no leading dot.
_ID = re.compile(r"\A[A-Za-z0-9_+][A-Za-z0-9_.+-]{0,127}\Z")
PUBLIC_FILE = 0o644


def _inside(root: Path, path: Path) -> bool:
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return real != real_root and os.path.commonpath([real_root, real]) == real_root


class RunDirs:
    """`<run dir>/sandboxes/<id>` and `<run dir>/bundles/<id>`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, kind: str, object_id: str) -> Path:
        if kind not in KINDS:
            raise ValueError(f"not a kind of run directory: {kind}")
        if not _ID.match(object_id):
            raise Invalid(f"id {shown(object_id)} is not valid")
        path = self.root / kind / object_id
        if not _inside(self.root / kind, path):
            raise Invalid(f"id {shown(object_id)} leads outside {self.root / kind}")
        return path

    def make(self, kind: str, object_id: str) -> Path:
        path = self.path(kind, object_id)
        # The run dir itself is the service's (0700, made by run_service).
        for directory in (self.root / kind, path):
            private_dir(directory, TRAVERSE_DIR)
        return path

    def remove(self, path: Path) -> None:
        """Remove the tree `<run dir>/<kind>/<id>` (a symlink there: the link only). Any
        other path (a record tampered with) is left alone."""
        parent = os.path.realpath(path.parent)
        if not _ID.match(path.name) or not any(
                parent == os.path.realpath(self.root / kind) for kind in KINDS):
            log.warning("not removing a directory outside the run dir", path=str(path))
            return
        if path.is_symlink():
            path.unlink()  # the link only, never what it points to
            return
        if not path.exists():
            return
        if mounts.mounted_below(str(path)):
            raise Internal(f"{path} still has mounts below it: not removed")
        shutil.rmtree(path, ignore_errors=True)


def write_public(path: Path, text: str) -> None:
    """Write `text` to `path` in place (a container's bind mount keeps seeing the same
    file), world-readable, never through a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 PUBLIC_FILE)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fd, PUBLIC_FILE)
        fh.write(text)
