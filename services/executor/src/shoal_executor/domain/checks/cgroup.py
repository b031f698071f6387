"""A pod's cgroup parent, normalized and kept under the pods' cgroup roots.

runc makes every missing directory of a cgroups path and never removes the parents, and it
takes a relative path as relative to its own cgroup: `../../evil` would make cgroups outside
the pods' tree and leave them behind. So the parent must be absolute (or a systemd slice
name, expanded as systemd lays slices out) and lie under one of POD_CGROUP_ROOTS, which hold
what kubelet sends with either cgroup driver and Shoal's own default."""

from __future__ import annotations

import re

from shoal_executor.config import POD_CGROUP_ROOTS
from shoal_executor.domain.checks.text import MAX_PATH, refuse, shown

# kubelet's cgroupfs driver: /kubepods[/burstable|/besteffort]/pod<uid>; its systemd driver:
# kubepods[-burstable|-besteffort]-pod<uid>.slice (under /kubepods.slice once expanded);
# Shoal's default for pods without one: /shoal.
FIELD = "PodSandboxConfig.linux.cgroup_parent"
# A cgroup directory name: no separator, no leading dot (no "." or ".."), bounded (NAME_MAX).
_COMPONENT = re.compile(r"\A[A-Za-z0-9_@:+-][A-Za-z0-9_.@:+-]{0,254}\Z")
_SLICE_PART = re.compile(r"\A[A-Za-z0-9_@:+.]+\Z")


def expand_slice(name: str) -> str:
    """The cgroup path systemd gives a slice: `a-b-c.slice` is `/a.slice/a-b.slice/
    a-b-c.slice` (as runc's systemd driver expands it)."""
    stem = name.removesuffix(".slice")
    parts = stem.split("-")
    if not stem or not all(_SLICE_PART.match(p) for p in parts):
        raise refuse(FIELD, f"{shown(name)} is not a systemd slice name")
    return "".join(f"/{'-'.join(parts[:i + 1])}.slice" for i in range(len(parts)))


def pod_cgroup_parent(value: str, roots: tuple[str, ...] = POD_CGROUP_ROOTS) -> str:
    """`value` normalized ("" stays "": none given), or Invalid naming the field."""
    if not value:
        return ""
    if len(value) > MAX_PATH:
        raise refuse(FIELD, f"longer than {MAX_PATH} characters")
    if "/" not in value and value.endswith(".slice"):
        path = expand_slice(value)
    elif value.startswith("/"):
        path = value
    else:
        raise refuse(FIELD, f"{shown(value)} is neither an absolute cgroup path nor a "
                     "systemd slice name")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for part in parts:
        if part == ".." or not _COMPONENT.match(part):
            raise refuse(FIELD, f"{shown(value)}: {shown(part)} is not a cgroup name "
                         "(no '..', separators or control characters)")
    normalized = "/" + "/".join(parts)
    if not any(normalized == root or normalized.startswith(root + "/") for root in roots):
        raise refuse(FIELD, f"{shown(value)} is not under the pods' cgroup roots "
                     f"({', '.join(roots)})")
    return normalized
