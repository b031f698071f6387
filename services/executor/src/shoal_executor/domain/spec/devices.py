"""The device nodes a container gets (linux.devices) and the cgroup rules that let it use
them (linux.resources.devices): deny all, allow the standard character devices and those
the CRI passes in; a privileged container may use every device."""

from __future__ import annotations

import os
import stat
from typing import Any

from cri_api.v1 import api_pb2 as cri
from shoal_common.errors import Invalid

from shoal_executor.domain.spec.context import SpecInput

# Devices every container may use (c major:minor, -1 = any minor): null, zero, full,
# random, urandom, tty, console, ptmx, the pts, tun.
DEFAULT_DEVICES = [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2), (136, -1),
                   (10, 200)]


def _host_device(dev: cri.Device) -> tuple[dict[str, Any], dict[str, Any]]:
    """The device node a CRI device creates in the container, and its cgroup rule."""
    try:
        st = os.stat(dev.host_path)
    except OSError as exc:
        raise Invalid(f"device {dev.host_path}: {exc.strerror}") from None
    kind = "c" if stat.S_ISCHR(st.st_mode) else "b" if stat.S_ISBLK(st.st_mode) else ""
    if not kind:
        raise Invalid(f"device {dev.host_path} is not a character or block device")
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    node = {"path": dev.container_path or dev.host_path, "type": kind, "major": major,
            "minor": minor, "fileMode": st.st_mode & 0o777, "uid": 0, "gid": 0}
    rule = {"allow": True, "type": kind, "major": major, "minor": minor,
            "access": dev.permissions or "rwm"}
    return node, rule


def devices(req: SpecInput) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(cgroup device rules, device nodes)."""
    rules: list[dict[str, Any]] = [{"allow": False, "access": "rwm"}]
    rules += [{"allow": True, "type": "c", "major": major, "access": "rwm",
               **({"minor": minor} if minor >= 0 else {})} for major, minor in DEFAULT_DEVICES]
    nodes = []
    for dev in req.cfg.devices:
        node, rule = _host_device(dev)
        nodes.append(node)
        rules.append(rule)
    # Still stat'ed above: a privileged container's missing device is refused all the same.
    return ([{"allow": True, "access": "rwm"}] if req.privileged else rules), nodes
