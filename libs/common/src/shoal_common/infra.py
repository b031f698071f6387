"""Whether a pod needs a pause process, the one rule the CRI gateway (which then prepares
no pause rootfs) and the executor (which then pins the pod's namespaces instead, see the
executor's domain/pinned.py) both apply, with the executor's `drop_infra` setting."""

from __future__ import annotations

from typing import Any

from cri_api.v1 import api_pb2 as cri


def needs_pause(config: cri.PodSandboxConfig) -> str:
    """Why the pod needs a pause process ("" = it does not): its namespaces must then be
    made by a process of the pod — a shared PID namespace's init, a user namespace's
    first process (the others are owned by it), the namespaces runc sets sysctls in."""
    opts = config.linux.security_context.namespace_options
    if opts.pid == cri.POD:
        return "its containers share a PID namespace"
    if opts.HasField("userns_options") and opts.userns_options.mode == cri.POD:
        return "it has a user namespace"
    if config.linux.sysctls:
        return "it sets sysctls"
    return ""


def drop_infra(config: Any) -> bool:
    """`services.executor.drop_infra` of a Shoal Config (read where the executor's section
    is registered; on by default)."""
    return bool(getattr(config.service("executor"), "drop_infra", True))
