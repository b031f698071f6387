"""The namespaces a container joins or creates.

The pause container creates the pod's IPC and UTS namespaces; containers join them (by the
pause process' /proc/<pid>/ns paths), and its pid namespace when the pod shares one. The
network namespace is the named one the executor made for CNI, which the pause container
joins too. NODE mode means the host's namespace: no entry at all.

A pod with a user namespace has it made by the executor (see `domain.userns`), so every
container of it, the pause one too, joins it by path; the mappings are repeated for the
runtime, which needs them to know the ids its root has on the host."""

from __future__ import annotations

from typing import Any

from cri_api.v1 import api_pb2 as cri
from shoal_common.errors import Invalid

from shoal_executor.domain.spec.context import SpecInput


def _entry(kind: str, path: str) -> dict[str, str]:
    return {"type": kind, "path": path} if path else {"type": kind}


def namespaces(req: SpecInput) -> list[dict[str, str]]:
    pod, joins = req.pod, not req.ctr.is_sandbox
    out = [_entry("mount", "")]
    for kind, path, host in (("network", pod.netns_path, pod.host_network),
                             ("ipc", pod.ipc_ns_path if joins else "", pod.host_ipc),
                             ("uts", pod.uts_ns_path if joins else "", pod.host_network)):
        if not host:
            out.append(_entry(kind, path))
    pid_mode = req.sec.namespace_options.pid if req.sec is not None else cri.CONTAINER
    if not pod.host_pid:
        out.append(_entry("pid", pod.pid_ns_path if joins and pid_mode == cri.POD else ""))
    if pod.userns is not None:
        out.append(_entry("user", pod.userns_path))
    return out


def user_namespace(req: SpecInput, user: dict[str, Any]) -> dict[str, Any]:
    """linux.uidMappings and gidMappings for a pod with a user namespace. The process's
    ids must be mapped, or the runtime fails obscurely at setuid/setgroups."""
    idmap = req.pod.userns
    if idmap is None:
        return {}
    ids = [("uid", user["uid"], idmap.uids), ("gid", user["gid"], idmap.gids),
           *(("supplemental gid", g, idmap.gids) for g in user.get("additionalGids", []))]
    for what, value, ids_range in ids:
        if ids_range.host_of(value) is None:
            raise Invalid(f"container {req.cfg.metadata.name!r}: {what} {value} is not mapped "
                          f"by the pod's user namespace (container ids "
                          f"{ids_range.container_id}-"
                          f"{ids_range.container_id + ids_range.length - 1})")
    return idmap.oci()
