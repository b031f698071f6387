"""User namespaces asked for by a pod (`NamespaceOption.userns_options`), a container and
its mounts (`Mount.uidMappings`), checked as containerd checks them (parseUsernsIDs).

Absent options, or mode NODE, mean the host's user namespace. Mode POD gives the pod its
own, with exactly one uid and one gid mapping that maps container id 0: what kubelet sends,
and what the executor's idmapped mounts are made for. CONTAINER and TARGET do not exist
for user namespaces."""

from __future__ import annotations

import json
from dataclasses import dataclass

from cri_api.v1 import api_pb2 as cri

from shoal_executor.domain.checks.text import enum_name, refuse

MAX_HOST_ID = 2**32 - 1  # the end of a range: ids go up to 2^32 - 2


@dataclass(frozen=True)
class IdRange:
    container_id: int
    host_id: int
    length: int

    def host_of(self, container_id: int) -> int | None:
        offset = container_id - self.container_id
        return self.host_id + offset if 0 <= offset < self.length else None


def _line(r: IdRange) -> str:
    return f"{r.container_id} {r.host_id} {r.length}\n"


@dataclass(frozen=True)
class IdMap:
    """A user namespace's mappings (container id → host id), one range each."""

    uids: IdRange
    gids: IdRange

    def oci(self) -> dict[str, list[dict[str, int]]]:
        """linux.uidMappings and gidMappings of an OCI spec."""
        return {f"{kind}Mappings": [{"containerID": r.container_id, "hostID": r.host_id,
                                     "size": r.length}]
                for kind, r in (("uid", self.uids), ("gid", self.gids))}

    def proc_lines(self) -> tuple[str, str]:
        """What /proc/<pid>/uid_map and gid_map are written."""
        return _line(self.uids), _line(self.gids)

    def host_root(self) -> tuple[int, int]:
        """The host uid and gid of the container's root."""
        return self.uids.host_id, self.gids.host_id

    def to_json(self) -> str:
        return json.dumps({k: [r.container_id, r.host_id, r.length]
                           for k, r in (("uids", self.uids), ("gids", self.gids))})

    @classmethod
    def from_json(cls, text: str) -> IdMap | None:
        """The map a record kept ("" = the host's user namespace)."""
        if not text:
            return None
        doc = json.loads(text)
        return cls(IdRange(*doc["uids"]), IdRange(*doc["gids"]))


def _range(field: str, mappings: list[cri.IDMapping], need_root: bool) -> IdRange:
    if len(mappings) != 1:
        raise refuse(field, f"{len(mappings)} mappings: exactly one is supported")
    m = mappings[0]
    if m.length < 1:
        raise refuse(f"{field}[0].length", f"{m.length}: a mapping maps at least one id")
    for name, start in (("host_id", m.host_id), ("container_id", m.container_id)):
        if start + m.length > MAX_HOST_ID:
            raise refuse(f"{field}[0]", f"{name} {start} + length {m.length} passes the "
                         f"last id ({MAX_HOST_ID - 1})")
    if need_root and m.container_id != 0:
        raise refuse(f"{field}[0].container_id", f"{m.container_id}: container id 0 must be "
                     "mapped (the mapping must start at 0)")
    return IdRange(m.container_id, m.host_id, m.length)


def id_map(field: str, uids: list[cri.IDMapping], gids: list[cri.IDMapping],
           need_root: bool = True) -> IdMap:
    return IdMap(_range(f"{field}.uids", uids, need_root),
                 _range(f"{field}.gids", gids, need_root))


def _userns(field: str, opts: cri.NamespaceOption) -> IdMap | None:
    if not opts.HasField("userns_options"):
        return None
    userns = opts.userns_options
    if userns.mode == cri.NODE:
        if userns.uids or userns.gids:
            raise refuse(field, "mode NODE (the host's user namespace) takes no mappings")
        return None
    if userns.mode != cri.POD:
        raise refuse(f"{field}.mode", f"{enum_name(cri.NamespaceMode, userns.mode)} is not a user "
                     "namespace mode (POD or NODE)")
    return id_map(field, list(userns.uids), list(userns.gids))


def check_pod_userns(config: cri.PodSandboxConfig) -> IdMap | None:
    """The pod's user namespace mappings, or None for the host's; Invalid when the options
    are not ones a user namespace can have."""
    field = "PodSandboxConfig.linux.security_context.namespace_options.userns_options"
    opts = config.linux.security_context.namespace_options
    idmap = _userns(field, opts)
    if idmap is not None:
        # kubelet refuses these with hostUsers: false: the host's namespaces are owned by
        # the host's user namespace, and the pod's root could not act in them anyway.
        for name in ("network", "pid", "ipc"):
            if getattr(opts, name) == cri.NODE:
                raise refuse(field, f"a pod user namespace cannot be used with the host's "
                             f"{name} namespace")
    return idmap


def check_container_userns(config: cri.ContainerConfig, pod: IdMap | None) -> None:
    """A container is in its pod's user namespace: options it gives must say the same."""
    field = "ContainerConfig.linux.security_context.namespace_options.userns_options"
    opts = config.linux.security_context.namespace_options
    if not opts.HasField("userns_options"):
        return
    if _userns(field, opts) != pod:
        raise refuse(field, "differs from the pod's user namespace (a container shares it)")


def mount_id_maps(config: cri.ContainerConfig, pod: IdMap | None) -> dict[int, IdMap]:
    """The idmapped mounts asked for: mount index → mappings. kubelet gives the pod's
    mappings to every volume of a pod with a user namespace; without one, an idmapped
    mount is refused (as runc 1.2 does)."""
    out: dict[int, IdMap] = {}
    for i, m in enumerate(config.mounts):
        if not (m.uidMappings or m.gidMappings):
            continue
        field = f"ContainerConfig.mounts[{i}]"
        if pod is None:
            raise refuse(field, "uid/gid mappings need the pod to have a user namespace")
        out[i] = IdMap(_range(f"{field}.uidMappings", list(m.uidMappings), False),
                       _range(f"{field}.gidMappings", list(m.gidMappings), False))
    return out
