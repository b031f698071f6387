"""Users and groups as the container will see them: /etc/passwd and /etc/group read from
inside the rootfs, with symlinks resolved *within* the rootfs (an image must not make us
read host files)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from shoal_common.errors import Invalid

MAX_SYMLINKS = 40
MAX_FILE = 4 << 20
MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to the kernel


def _is_id(text: str) -> bool:
    """ASCII digits only (str.isdigit also takes "²", which int() refuses), in range."""
    return text.isascii() and text.isdigit() and len(text) <= 10 and int(text) <= MAX_ID


def resolve_in_root(root: str, path: str) -> str:
    """The host path of `path` inside `root`, following symlinks as if root were `/`."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, name)
        if os.path.islink(candidate):
            hops += 1
            if hops > MAX_SYMLINKS:
                raise Invalid(f"too many symlinks resolving {path} in the rootfs")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(name)
    return os.path.join(root, *resolved)


def read_in_root(root: str, path: str) -> str | None:
    host = resolve_in_root(root, path)
    try:
        fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not os.path.isfile(f"/proc/self/fd/{fd}"):
            return None
        return os.read(fd, MAX_FILE).decode(errors="replace")
    finally:
        os.close(fd)


@dataclass
class User:
    uid: int
    gid: int
    additional_gids: list[int] = field(default_factory=list)
    home: str = "/"
    name: str = ""


def _entries(text: str | None, width: int, ids: tuple[int, ...]) -> list[list[str]]:
    """The entries with at least `width` fields whose `ids` fields are numbers: the files
    are the image's, and a malformed line is skipped as libc skips it."""
    out = []
    for line in (text or "").splitlines():
        if line and not line.startswith("#"):
            fields = line.split(":")
            if len(fields) >= width and all(_is_id(fields[i]) for i in ids):
                out.append(fields)
    return out


def _lookup(entries: list[list[str]], spec: str, what: str, path: str
            ) -> tuple[int, list[str] | None]:
    """A "name" or numeric id of a passwd or group file: (id, its entry). A number needs
    no entry, a name does."""
    if spec.isascii() and spec.isdigit():
        if not _is_id(spec):
            raise Invalid(f"{what} id {spec[:20]} is out of range (0-{MAX_ID})")
        return int(spec), next((e for e in entries if e[2] == spec), None)
    entry = next((e for e in entries if e[0] == spec), None)
    if entry is None:
        raise Invalid(f"{what} {spec[:64]!r} not found in the image's {path}")
    return int(entry[2]), entry


def resolve_user(root: str, user: str, *, group: int | None = None,
                 supplemental: list[int] | None = None, strict: bool = False) -> User:
    """Resolve an image/CRI user spec ("", "name", "uid", "uid:gid", "name:group") against
    the rootfs' passwd and group files, as runc/containerd do.

    The process's groups, as containerd sets them: the primary group first, then (unless
    `strict`, SupplementalGroupsPolicy Strict) the groups the image's /etc/group gives the
    user, then `supplemental` (the CRI's)."""
    passwd = _entries(read_in_root(root, "/etc/passwd"), 7, (2, 3))
    groups = _entries(read_in_root(root, "/etc/group"), 4, (2,))
    name_part, _, group_part = (user or "0").partition(":")
    uid, entry = _lookup(passwd, name_part, "user", "/etc/passwd")
    gid = int(entry[3]) if entry else 0
    if group_part:
        gid, _ = _lookup(groups, group_part, "group", "/etc/group")
    if group is not None:
        gid = group
    username = entry[0] if entry else ""
    image_groups = [] if strict else sorted(
        {int(g[2]) for g in groups if username and username in g[3].split(",")})
    additional = list(dict.fromkeys([gid, *image_groups, *(supplemental or [])]))
    home = entry[5] if entry and entry[5] else "/"
    return User(uid=uid, gid=gid, additional_gids=additional, home=home, name=username)
