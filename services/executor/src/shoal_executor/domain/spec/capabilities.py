"""The capability sets a container gets: Docker's default set, changed by the CRI's add and
drop lists, or everything this runtime holds for a privileged container."""

from __future__ import annotations

from cri_api.v1 import api_pb2 as cri
from shoal_common.errors import Invalid

DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]
# Capability numbers (linux/capability.h), to read this process' bounding set.
_CAP_NUMBERS = {name: i for i, name in enumerate([
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN",
    "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON",
    "CAP_BPF", "CAP_CHECKPOINT_RESTORE"])}
ALL_CAPS = sorted(_CAP_NUMBERS)
_ALL = "CAP_ALL"  # "ALL" in an add or drop list, once normalised


def _grantable_caps() -> list[str]:
    """ALL_CAPS that this process' bounding set holds (containerd's cap.Current())."""
    with open("/proc/self/status") as fh:
        bnd = next(int(line.split()[1], 16) for line in fh if line.startswith("CapBnd:"))
    return [c for c in ALL_CAPS if bnd >> _CAP_NUMBERS[c] & 1]


GRANTABLE_CAPS = _grantable_caps()


def _normalised(names: list[str]) -> list[str]:
    """CRI names may be lower case and lack the prefix ("net_admin")."""
    return [n if n.startswith("CAP_") else f"CAP_{n}" for n in (n.upper() for n in names)]


def capabilities(sec: cri.LinuxContainerSecurityContext | None, privileged: bool
                 ) -> list[str]:
    """The one set the spec uses as bounding, effective and permitted set."""
    if privileged:
        return list(GRANTABLE_CAPS)
    if sec is None or not sec.HasField("capabilities"):
        return list(DEFAULT_CAPS)
    adds = _normalised(list(sec.capabilities.add_capabilities))
    drops = _normalised(list(sec.capabilities.drop_capabilities))
    if _ALL in drops:
        # Dropping everything keeps only what is added by name (nothing if ALL is added);
        # this returns before the names are checked, as it always has.
        return [] if _ALL in adds else [c for c in adds if c != _ALL]
    unknown = [c for c in adds + drops if c not in ALL_CAPS and c != _ALL]
    if unknown:
        raise Invalid(f"unknown capabilities: {', '.join(unknown)}")
    caps = list(GRANTABLE_CAPS) if _ALL in adds else DEFAULT_CAPS + [
        c for c in adds if c not in DEFAULT_CAPS]
    return [c for c in caps if c not in drops]
