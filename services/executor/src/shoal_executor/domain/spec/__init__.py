"""The OCI runtime spec of a container: image config merged with the CRI config.

Defaults follow what kubelet expects from containerd/CRI-O: the default capability set,
masked and read-only /proc paths, /dev, /dev/pts, /dev/shm, /dev/mqueue, /sys and a
read-only cgroup mount, the pod's namespaces joined by path, cgroupfs cgroups under the
pod's parent.

As containerd composes a spec from SpecOpts, one module builds each section from the same
SpecInput: process, mounts, namespaces, devices, resources, security. Here they return
their part instead of editing a shared spec, so that build_spec below shows the document's
whole layout, and its key order, in one place.
"""

from __future__ import annotations

from typing import Any

from shoal_executor.domain.cgroups import HostCgroups, cgroups_path, host_cgroups
from shoal_executor.domain.spec.capabilities import ALL_CAPS, DEFAULT_CAPS, GRANTABLE_CAPS
from shoal_executor.domain.spec.context import ContainerContext, PodContext, SpecInput
from shoal_executor.domain.spec.devices import DEFAULT_DEVICES, devices
from shoal_executor.domain.spec.mounts import mounts
from shoal_executor.domain.spec.namespaces import namespaces, user_namespace
from shoal_executor.domain.spec.process import (
    DEFAULT_PATH,
    own_oom_score_adj,
    parse_signal,
    process,
    stop_signal,
)
from shoal_executor.domain.spec.resources import resources
from shoal_executor.domain.spec.security import (
    MASKED_PATHS,
    READONLY_PATHS,
    confinement,
    sysctls,
)

__all__ = [
    "ALL_CAPS", "DEFAULT_CAPS", "DEFAULT_DEVICES", "DEFAULT_PATH", "GRANTABLE_CAPS",
    "MASKED_PATHS", "OCI_VERSION", "READONLY_PATHS", "ContainerContext", "PodContext",
    "build_spec", "own_oom_score_adj", "parse_signal", "stop_signal",
]

OCI_VERSION = "1.0.2"


def _annotations(req: SpecInput) -> dict[str, str]:
    out = dict(req.cfg.annotations)
    out["io.kubernetes.cri.container-type"] = "sandbox" if req.ctr.is_sandbox else "container"
    out["io.kubernetes.cri.sandbox-id"] = req.pod.sandbox_id
    return out


def build_spec(pod: PodContext, ctr: ContainerContext,
               cgroups: HostCgroups | None = None) -> dict[str, Any]:
    """`cgroups`: what the host's cgroups can enforce (detected once when not given)."""
    # On v2 the container's parent may offer fewer controllers than the root.
    req = SpecInput(pod, ctr, (cgroups or host_cgroups()).below(ctr.cgroups_path))
    # The order the sections are built in decides which fault of a config with several
    # is reported: keep it.
    proc = process(req)
    spec_mounts, propagation = mounts(req)
    spec_namespaces = namespaces(req)
    device_rules, device_nodes = devices(req)
    linux: dict[str, Any] = {
        "namespaces": spec_namespaces,
        "resources": resources(req, device_rules),
        "cgroupsPath": cgroups_path(ctr.cgroups_path, req.host),  # the driver's form
        "devices": device_nodes,
        **confinement(req),
    }
    if propagation:
        linux["rootfsPropagation"] = propagation
    linux.update(sysctls(req))
    linux.update(user_namespace(req, proc["user"]))
    return {
        "ociVersion": OCI_VERSION,
        "process": proc,
        "root": {"path": ctr.rootfs, "readonly": bool(req.sec and req.sec.readonly_rootfs)},
        "hostname": req.hostname if not pod.host_network else "",
        "mounts": spec_mounts,
        "annotations": _annotations(req),
        "linux": linux,
    }
