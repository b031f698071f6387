"""The RuntimeDefault seccomp profile.

A deny-list: the syscalls container runtimes' default profiles refuse (kernel modules,
keyrings, reboot, clock changes, mounting, namespaces tricks, tracing other processes...)
fail with EPERM; everything else is allowed. Shorter than an allow-list, and it never
breaks a workload on a syscall added to the kernel after this list was written; the cost
is that new dangerous syscalls are not blocked until added here."""

from __future__ import annotations

import platform
from typing import Any

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


def runtime_default_profile() -> dict[str, Any]:
    arch = {"x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]}.get(platform.machine(), [])
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": arch,
        "syscalls": [{"names": DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}],
    }
