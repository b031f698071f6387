"""The seccomp profile a container asks for: RuntimeDefault, Unconfined or a localhost
file, by SecurityProfile or by the deprecated seccomp_profile_path.

RuntimeDefault is a deny-list: the syscalls container runtimes' default profiles refuse
(kernel modules, keyrings, reboot, clock changes, mounting, namespaces tricks, tracing other
processes...) fail with EPERM; everything else is allowed. Shorter than an allow-list, and
it never breaks a workload on a syscall added to the kernel after this list was written;
the cost is that new dangerous syscalls are not blocked until added here."""

from __future__ import annotations

import json
import os
import platform
import stat
from typing import Any, Literal

from cri_api.v1 import api_pb2 as cri
from shoal_common.errors import Invalid

DENIED = [
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module",
    "delete_module", "finit_module", "get_kernel_syms", "get_mempolicy", "init_module",
    "ioperm", "iopl", "kcmp", "kexec_file_load", "kexec_load", "keyctl", "lookup_dcookie",
    "mbind", "mount", "mount_setattr", "move_mount", "move_pages", "name_to_handle_at",
    "nfsservctl", "open_by_handle_at", "open_tree", "fsopen", "fsconfig", "fsmount",
    "fspick", "perf_event_open", "personality", "pivot_root", "process_vm_readv",
    "process_vm_writev", "ptrace", "query_module", "quotactl", "reboot", "request_key",
    "set_mempolicy", "setns", "settimeofday", "stime", "swapoff", "swapon", "_sysctl",
    "syslog", "umount", "umount2", "unshare", "uselib", "userfaultfd", "ustat", "vm86",
    "vm86old",
]
EPERM = 1
MAX_PROFILE = 1 << 20


def runtime_default_profile() -> dict[str, Any]:
    arch = {"x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]}.get(platform.machine(), [])
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": arch,
        "syscalls": [{"names": DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}],
    }


Kind = Literal["runtime-default", "unconfined", "localhost"]


def _legacy_request(path: str) -> tuple[Kind, str]:
    """The deprecated seccomp_profile_path: "runtime/default", "docker/default",
    "localhost/<path>"; anything else (kubelet's default included) is Unconfined."""
    if path in ("runtime/default", "docker/default"):
        return "runtime-default", ""
    local = path.removeprefix("localhost/") if path.startswith("localhost/") else ""
    return ("localhost", local) if local else ("unconfined", "")


def _request(profile: cri.SecurityProfile | None, legacy_path: str) -> tuple[Kind, str]:
    """(kind, localhost path) the CRI asks for; the SecurityProfile wins over the path."""
    if profile is None:
        return _legacy_request(legacy_path)
    if profile.profile_type == cri.SecurityProfile.Localhost:
        return "localhost", profile.localhost_ref
    if profile.profile_type == cri.SecurityProfile.Unconfined:
        return "unconfined", ""
    return "runtime-default", ""  # RuntimeDefault is the enum's zero value


def _read_profile(path: str) -> bytes:
    """A regular file of at most MAX_PROFILE bytes: the path comes from the request, and
    /dev/zero or a FIFO must not hang or exhaust the executor."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Invalid(f"seccomp profile {path} is not a regular file")
        if st.st_size > MAX_PROFILE:
            raise Invalid(f"seccomp profile {path} is larger than {MAX_PROFILE} bytes")
        return os.read(fd, MAX_PROFILE + 1)
    finally:
        os.close(fd)


def load_profile(path: str) -> dict[str, Any]:
    """A localhost profile: an absolute path to an OCI seccomp JSON document."""
    if not os.path.isabs(path) or "\0" in path:
        raise Invalid(f"seccomp localhost profile {path[:200]!r} must be an absolute path")
    try:
        loaded = json.loads(_read_profile(path))
    except (OSError, ValueError) as exc:
        raise Invalid(f"seccomp profile {path}: {exc}") from None
    if not isinstance(loaded, dict) or "defaultAction" not in loaded:
        raise Invalid(f"seccomp profile {path} has no defaultAction")
    return loaded


def container_profile(profile: cri.SecurityProfile | None, legacy_path: str,
                      privileged: bool) -> dict[str, Any] | None:
    """The spec's linux.seccomp, None for none (unconfined, or privileged)."""
    if privileged:
        return None
    kind, path = _request(profile, legacy_path)
    if kind == "runtime-default":
        return runtime_default_profile()
    return load_profile(path) if kind == "localhost" else None
