"""The rootfs mounts of `sandbox.create` and `container.create`, confined to the snapshots.

The snapshotter makes them, but they travel over the bus: a peer holding the gateway's
credentials could send a bind mount of `/` or an overlay of host directories, which the
container would then own, and which a teardown's removal of the bundle would walk into.
Only what the snapshotter's drivers make is accepted: overlay or bind mounts, options from
an allowlist, and every directory one of a snapshot's own, `<snapshots>/<snapshot>/<dir>`
(`fs/`, `work/`). Nothing deeper: below that lie image and container files, which a running
container could swap for a symlink between this check and the mount. The paths are mounted
as resolved here."""

from __future__ import annotations

import os
from pathlib import Path

from shoal_common.messages.snapshots import Mount

from shoal_executor.domain.checks.text import check_abs_path, check_text, refuse, shown

MOUNT_TYPES = ("overlay", "bind")
MAX_MOUNTS = 8
MAX_OPTION = 64 * 1024  # a lowerdir of a few hundred layers
# Mount flags (mount(8) names) either type may carry.
FLAG_OPTIONS = frozenset({"ro", "rw", "bind", "rbind", "nosuid", "nodev", "noexec",
                          "noatime", "nodiratime", "relatime"})
# overlayfs options: the directories (checked as paths), settings with their values, words.
OVERLAY_PATHS = ("lowerdir", "upperdir", "workdir")
OVERLAY_SETTINGS = {"index": {"on", "off"}, "redirect_dir": {"on", "off", "follow", "nofollow"},
                    "metacopy": {"on", "off"}, "xino": {"on", "off", "auto"}}
OVERLAY_WORDS = frozenset({"userxattr", "volatile"})
SNAPSHOT_DEPTH = 2  # <snapshots>/<snapshot>/<dir>


def _confined(field: str, path: str, root: str) -> str:
    """`path` resolved, if it is a directory of a snapshot under `root` (resolved)."""
    check_abs_path(field, path)
    real = os.path.realpath(path)
    rel = os.path.relpath(real, root)
    parts = rel.split(os.sep)
    if parts[0] in (".", "..") or len(parts) != SNAPSHOT_DEPTH:
        raise refuse(field, f"{shown(path)} is not a directory of a snapshot in {root}")
    if not os.path.isdir(real):
        raise refuse(field, f"{shown(path)} is not a directory")
    return real


def _check_option(field: str, option: str) -> None:
    check_text(field, option, MAX_OPTION, spaces=False)
    # Options are joined with "," for mount(2), and overlayfs unescapes "\": either would
    # let one option smuggle in another.
    if "," in option or "\\" in option:
        raise refuse(field, f"{shown(option)} contains ',' or '\\'")


def _bind(field: str, m: Mount, root: str) -> Mount:
    for j, option in enumerate(m.options):
        if option not in FLAG_OPTIONS:
            raise refuse(f"{field}.options[{j}]", f"{shown(option)} is not allowed on a bind "
                         f"mount (allowed: {', '.join(sorted(FLAG_OPTIONS))})")
    return Mount(type="bind", source=_confined(f"{field}.source", m.source, root),
                 options=list(m.options))


def _overlay_option(field: str, option: str, root: str, seen: set[str]) -> str:
    """The option with its directories resolved; `seen` collects the directory keys."""
    if option in FLAG_OPTIONS or option in OVERLAY_WORDS:
        return option
    key, sep, value = option.partition("=")
    if sep and key in OVERLAY_PATHS:
        if key in seen:
            raise refuse(field, f"{key} given twice")
        seen.add(key)
        dirs = value.split(":") if key == "lowerdir" else [value]
        return f"{key}=" + ":".join(_confined(f"{field} ({key})", d, root) for d in dirs)
    if sep and value in OVERLAY_SETTINGS.get(key, ()):
        return option
    raise refuse(field, f"{shown(option)} is not an allowed overlay option "
                 f"({', '.join(OVERLAY_PATHS)}, {', '.join(OVERLAY_SETTINGS)}, "
                 f"{', '.join(sorted(OVERLAY_WORDS))} or a mount flag)")


def _overlay(field: str, m: Mount, root: str) -> Mount:
    if m.source != "overlay":
        raise refuse(f"{field}.source", f"{shown(m.source)}: an overlay's source is "
                     "'overlay'")
    seen: set[str] = set()
    options = [_overlay_option(f"{field}.options[{j}]", o, root, seen)
               for j, o in enumerate(m.options)]
    if "lowerdir" not in seen:
        raise refuse(f"{field}.options", "an overlay needs a lowerdir")
    if ("upperdir" in seen) != ("workdir" in seen):
        raise refuse(f"{field}.options", "upperdir and workdir go together")
    return Mount(type="overlay", source="overlay", options=options)


def confine_rootfs(mounts: list[Mount], snapshots_dir: Path) -> list[Mount]:
    """`mounts` with their directories resolved, or Invalid naming the first bad field."""
    if not mounts:
        raise refuse("rootfs", "no rootfs mounts given")
    if len(mounts) > MAX_MOUNTS:
        raise refuse("rootfs", f"{len(mounts)} mounts, at most {MAX_MOUNTS}")
    root = os.path.realpath(snapshots_dir)
    out = []
    for i, m in enumerate(mounts):
        field = f"rootfs[{i}]"
        if m.type not in MOUNT_TYPES:
            raise refuse(f"{field}.type", f"{shown(m.type)} is not one of "
                         f"{', '.join(MOUNT_TYPES)}")
        for j, option in enumerate(m.options):
            _check_option(f"{field}.options[{j}]", option)
        out.append(_bind(field, m, root) if m.type == "bind" else _overlay(field, m, root))
    return out
