"""What each runtime handler can do beyond the basics, as CRI Status advertises it
(`RuntimeHandlerFeatures`) and as create checks it before asking for it.

- Recursive read-only mounts: the runtime must take the `rro` mount option, which
  `<runtime> features` lists (runc 1.1+). A runtime without that command (crun 1.8) is
  taken not to, as containerd does.
- User namespaces: the runtime must know the `user` namespace (`features` again), the
  kernel must idmap the snapshots' filesystem (the executor idmaps every rootfs itself,
  see `idmap`), util-linux `unshare` must be there to make the namespaces, and every
  directory above the executor's run dir must be traversable by others: the pod's root is
  an unprivileged host uid, and the runtime sets its rootfs up in the bundle as that uid.

Answers are cached: `features` per binary (by path, size and mtime, so an upgraded
runtime is asked again), the kernel's once per process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from typing import Any

from cri_api.v1 import api_pb2 as cri
from shoal_common.errors import FailedPrecondition

from shoal_executor.domain.checks.userns import (
    IdMap,
    IdRange,
    check_container_userns,
    check_pod_userns,
    mount_id_maps,
)
from shoal_executor.domain.idmap import idmap_problem, userns_fd

RRO = "recursive_read_only"
USERNS = "user_namespaces"
FEATURES = (RRO, USERNS)
# Until RuntimeStatusReply carries features, `status` reports them as components
# `feature:<handler>:<feature>` (the gateway reads the same names).
FEATURE_COMPONENT = "feature"
TITLES = {RRO: "recursive read-only mounts", USERNS: "user namespaces"}
PROBE_TIMEOUT = 5.0
# Any mapping will do to see whether a filesystem can be idmapped (critest's own).
PROBE_MAP = IdMap(IdRange(0, 65536, 65536), IdRange(0, 65536, 65536))

_runtime_cache: dict[tuple[str, int, int], tuple[dict[str, Any] | None, str]] = {}
_idmap_cache: dict[str, str | None] = {}


@dataclass(frozen=True)
class HandlerFeatures:
    supported: frozenset[str] = frozenset()
    why_not: dict[str, str] = field(default_factory=dict)  # feature → reason

    def has(self, feature: str) -> bool:
        return feature in self.supported


async def _run_features(path: str) -> tuple[dict[str, Any] | None, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            path, "features", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        async with asyncio.timeout(PROBE_TIMEOUT):
            out, _ = await proc.communicate()
    except (OSError, TimeoutError) as exc:
        return None, f"{path} features: {exc}"
    if proc.returncode != 0:
        text = out.decode(errors="replace").strip()[:200]
        return None, f"{path} features exited {proc.returncode} ({text})"
    try:
        doc = json.loads(out)
    except ValueError:
        return None, f"{path} features: not JSON"
    return (doc, "") if isinstance(doc, dict) else (None, f"{path} features: not an object")


async def runtime_features(binary: str) -> tuple[dict[str, Any] | None, str]:
    """`<binary> features` (the OCI runtime features document), or None and why not."""
    path = shutil.which(binary)
    if path is None:
        return None, f"{binary}: not found"
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _runtime_cache:
        _runtime_cache[key] = await _run_features(path)
    return _runtime_cache[key]


def _existing(path: str) -> str:
    """`path`, or its nearest existing parent (the snapshots dir may not exist yet)."""
    while not os.path.exists(path) and path not in ("", "/"):
        path = os.path.dirname(path)
    return path or "/"


async def kernel_idmap_problem(path: str) -> str | None:
    """None when the kernel idmaps mounts of `path`'s filesystem, else why not."""
    path = _existing(path)
    if path not in _idmap_cache:
        if shutil.which("unshare") is None:
            _idmap_cache[path] = "util-linux unshare: not found"
        else:
            try:
                async with userns_fd(PROBE_MAP) as fd:
                    _idmap_cache[path] = idmap_problem(path, fd)
            except Exception as exc:  # any failure means: not usable here
                _idmap_cache[path] = f"making a user namespace: {exc}"
    return _idmap_cache[path]


def traverse_problem(run_dir: str) -> str | None:
    """None when others may pass through every directory above `run_dir` (itself 0711)."""
    path = os.path.dirname(os.path.realpath(run_dir))
    while True:
        try:
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return f"{path} is not traversable by others (o+x): a pod's root cannot " \
                    "reach its rootfs"
        except OSError as exc:
            return f"{path}: {exc.strerror}"
        if path == "/":
            return None
        path = os.path.dirname(path)


async def handler_features(binary: str, snapshots_dir: str, run_dir: str) -> HandlerFeatures:
    doc, problem = await runtime_features(binary)
    supported: set[str] = set()
    why: dict[str, str] = {}
    if doc is None:
        why = dict.fromkeys(FEATURES, problem)
        return HandlerFeatures(frozenset(), why)
    if "rro" in (doc.get("mountOptions") or []):
        supported.add(RRO)
    else:
        why[RRO] = f"{binary} does not list the rro mount option"
    if "user" not in ((doc.get("linux") or {}).get("namespaces") or []):
        why[USERNS] = f"{binary} does not list the user namespace"
    elif (idmap := await kernel_idmap_problem(snapshots_dir)) is not None:
        why[USERNS] = idmap
    elif (blocked := traverse_problem(run_dir)) is not None:
        why[USERNS] = blocked
    else:
        supported.add(USERNS)
    return HandlerFeatures(frozenset(supported), why)


@dataclass(frozen=True)
class Where:
    """The directories the features depend on."""

    snapshots_dir: str
    run_dir: str


async def require(feature: str, binary: str, handler: str, where: Where) -> None:
    found = await handler_features(binary, where.snapshots_dir, where.run_dir)
    if not found.has(feature):
        raise FailedPrecondition(f"runtime handler {handler or 'runc'!r} does not support "
                                 f"{TITLES[feature]}: {found.why_not.get(feature, '')}")


async def check_pod(config: cri.PodSandboxConfig, binary: str, handler: str,
                    where: Where) -> IdMap | None:
    """The pod's user namespace mappings (None: the host's), once its handler is known to
    run them."""
    idmap = check_pod_userns(config)
    if idmap is not None:
        await require(USERNS, binary, handler, where)
    return idmap


async def check_container(config: cri.ContainerConfig, pod: IdMap | None, binary: str,
                          handler: str, where: Where) -> dict[int, IdMap]:
    """What the container asks of the features (its user namespace is the pod's, `rro`
    mounts need a runtime that takes them), and the idmapped mounts it asks for."""
    check_container_userns(config, pod)
    maps = mount_id_maps(config, pod)
    if any(m.recursive_read_only for m in config.mounts):
        await require(RRO, binary, handler, where)
    return maps
