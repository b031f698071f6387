"""The namespaces a container joins or creates.

The pause container creates the pod's IPC and UTS namespaces; containers join them (by the
pause process' /proc/<pid>/ns paths), and its pid namespace when the pod shares one. The
network namespace is the named one the executor made for CNI, which the pause container
joins too. NODE mode means the host's namespace: no entry at all."""

from __future__ import annotations

from cri_api.v1 import api_pb2 as cri

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
    return out
