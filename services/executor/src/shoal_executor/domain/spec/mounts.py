"""The container's mounts: the standard /proc, /dev and /sys set, the CRI's bind mounts,
the files and /dev/shm its pod provides; and the rootfs propagation the binds need."""

from __future__ import annotations

import os
from typing import Any

from cri_api.v1 import api_pb2 as cri
from shoal_common.errors import Invalid

from shoal_executor.domain.spec.context import SpecInput

_NOSUID_NOEXEC_NODEV = ["nosuid", "noexec", "nodev"]
# The bind option and the rootfs propagation it needs, by CRI propagation.
_PROPAGATION = {cri.PROPAGATION_BIDIRECTIONAL: ("rshared", "rshared"),
                cri.PROPAGATION_HOST_TO_CONTAINER: ("rslave", "rslave")}
_PRIVATE = ("rprivate", "")
_STRENGTH = ["", "rslave", "rshared"]  # a rootfs shared with the host also feeds a slave


def default_mounts(readonly_sys: bool) -> list[dict[str, Any]]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": list(_NOSUID_NOEXEC_NODEV)},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                     "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": list(_NOSUID_NOEXEC_NODEV)},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": [*_NOSUID_NOEXEC_NODEV, "ro" if readonly_sys else "rw"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": [*_NOSUID_NOEXEC_NODEV, "relatime", "ro"]},
    ]


def _bind(dest: str, source: str, propagation: str = "rprivate", readonly: bool = False,
          recursive_ro: bool = False) -> dict[str, Any]:
    # `rro`: read-only all the way down, mounts below the source too (checked: the runtime
    # takes it, the mount is read-only and private).
    access = "rro" if recursive_ro else "ro" if readonly else "rw"
    return {"destination": dest, "type": "bind", "source": source,
            "options": ["rbind", propagation, access]}


def _cri_bind(m: cri.Mount, source: str = "") -> tuple[dict[str, Any], str]:
    """A CRI mount as an OCI bind mount, and the rootfs propagation it needs."""
    if not m.container_path.startswith("/"):
        raise Invalid(f"mount container_path {m.container_path!r} must be absolute")
    if not m.host_path:
        raise Invalid(f"mount for {m.container_path} has no host_path")
    if not os.path.exists(m.host_path):
        # kubelet creates hostPath volumes; a missing one is a caller error.
        raise Invalid(f"mount source {m.host_path} does not exist")
    option, needs = _PROPAGATION.get(m.propagation, _PRIVATE)
    # `source`: an idmapped copy of the host path the executor made (user namespaces).
    return _bind(m.container_path, source or m.host_path, option, m.readonly,
                 m.recursive_read_only), needs


def _pod_mounts(req: SpecInput, mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pod's hostname, resolv.conf and hosts where the CRI mounts none, and /dev/shm:
    the pod's, or a private tmpfs. The pause container needs none of the files."""
    pod, out = req.pod, []
    taken = {m["destination"] for m in mounts}
    for dest, src in (("/etc/hostname", pod.hostname_path),
                      ("/etc/resolv.conf", pod.resolv_conf_path), ("/etc/hosts", pod.hosts_path)):
        if src and not req.ctr.is_sandbox and dest not in taken:
            out.append(_bind(dest, src))
    if pod.shm_path and not req.ctr.is_sandbox:
        out.append(_bind("/dev/shm", pod.shm_path))
    elif "/dev/shm" not in taken:
        out.append({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                    "options": [*_NOSUID_NOEXEC_NODEV, "mode=1777", "size=65536k"]})
    return out


def mounts(req: SpecInput) -> tuple[list[dict[str, Any]], str]:
    """The spec's mounts, and the rootfs propagation ("" for the default) they need."""
    out = default_mounts(readonly_sys=not req.privileged)
    propagation = ""
    for i, m in enumerate(req.cfg.mounts):
        bind, needs = _cri_bind(m, req.ctr.mount_sources.get(i, ""))
        out.append(bind)
        propagation = max(propagation, needs, key=_STRENGTH.index)
    return out + _pod_mounts(req, out), propagation
