"""The OCI runtime spec of a container: image config merged with the CRI config.

Defaults follow what kubelet expects from containerd/CRI-O: the default capability set,
masked and read-only /proc paths, /dev, /dev/pts, /dev/shm, /dev/mqueue, /sys and a
read-only cgroup mount, the pod's namespaces joined by path, cgroupfs cgroups under the
pod's parent.
"""

from __future__ import annotations

import json
import os
import signal as signals
import stat as stat_mod
from dataclasses import dataclass, field
from typing import Any

from cri_api.v1 import api_pb2 as cri
from shoal_common.errors import Invalid

from shoal_executor.domain.cgroups import HostCgroups, fit_resources, host_cgroups
from shoal_executor.domain.rootfs_users import resolve_user
from shoal_executor.domain.seccomp import runtime_default_profile

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]
ALL_CAPS = sorted({
    "CAP_AUDIT_CONTROL", "CAP_AUDIT_READ", "CAP_AUDIT_WRITE", "CAP_BLOCK_SUSPEND", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER", "CAP_FSETID", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_KILL", "CAP_LEASE",
    "CAP_LINUX_IMMUTABLE", "CAP_MAC_ADMIN", "CAP_MAC_OVERRIDE", "CAP_MKNOD", "CAP_NET_ADMIN",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_RAW", "CAP_PERFMON", "CAP_SETFCAP",
    "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID", "CAP_SYSLOG", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
    "CAP_SYS_CHROOT", "CAP_SYS_MODULE", "CAP_SYS_NICE", "CAP_SYS_PACCT", "CAP_SYS_PTRACE",
    "CAP_SYS_RAWIO", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG",
    "CAP_WAKE_ALARM",
})
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


def _grantable_caps() -> list[str]:
    """ALL_CAPS that this process' bounding set holds (containerd's cap.Current())."""
    with open("/proc/self/status") as fh:
        bnd = next(int(line.split()[1], 16) for line in fh if line.startswith("CapBnd:"))
    return [c for c in ALL_CAPS if bnd >> _CAP_NUMBERS[c] & 1]


GRANTABLE_CAPS = _grantable_caps()
MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
# Devices every container may use (c major:minor), besides what the CRI adds.
DEFAULT_DEVICES = [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2), (136, -1),
                   (10, 200)]


def own_oom_score_adj() -> int:
    try:
        with open("/proc/self/oom_score_adj") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return 0


@dataclass
class PodContext:
    """What the container needs of its pod."""

    sandbox_id: str
    config: cri.PodSandboxConfig
    netns_path: str = ""  # "" = host network
    pid_ns_path: str = ""  # the pause process' pid namespace when the pod shares one
    ipc_ns_path: str = ""
    uts_ns_path: str = ""
    hostname_path: str = ""  # files the pod provides, bind-mounted into containers
    resolv_conf_path: str = ""
    hosts_path: str = ""
    shm_path: str = ""
    host_network: bool = False
    host_pid: bool = False
    host_ipc: bool = False

    @classmethod
    def of(cls, sandbox_id: str, config: cri.PodSandboxConfig, **paths: str) -> PodContext:
        opts = config.linux.security_context.namespace_options
        return cls(sandbox_id, config, host_network=opts.network == cri.NODE,
                   host_pid=opts.pid == cri.NODE, host_ipc=opts.ipc == cri.NODE, **paths)


@dataclass
class ContainerContext:
    container_id: str
    config: cri.ContainerConfig
    image_config: dict[str, Any]
    rootfs: str  # the mounted writable snapshot
    cgroups_path: str
    is_sandbox: bool = False  # the pod's pause container
    extra_env: list[str] = field(default_factory=list)


def _env_merge(base: list[str], extra: list[str]) -> list[str]:
    out: dict[str, str] = {}
    for item in [*base, *extra]:
        key, _, _ = item.partition("=")
        out.pop(key, None)
        out[key] = item
    return list(out.values())


def parse_signal(name: str) -> int:
    """An image StopSignal ("SIGQUIT", "QUIT", "3") as a number."""
    text = name.strip().upper()
    if text.isdigit():
        return int(text)
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return int(signals.Signals[text])
    except KeyError:
        raise Invalid(f"unknown stop signal {name!r}") from None


def _caps(ctx: cri.LinuxContainerSecurityContext | None, privileged: bool) -> list[str]:
    if privileged:
        return list(GRANTABLE_CAPS)
    caps = list(DEFAULT_CAPS)
    if ctx is None or not ctx.HasField("capabilities"):
        return caps

    def norm(name: str) -> str:
        name = name.upper()
        return name if name.startswith("CAP_") else f"CAP_{name}"

    adds = [norm(c) for c in ctx.capabilities.add_capabilities]
    drops = [norm(c) for c in ctx.capabilities.drop_capabilities]
    if "CAP_ALL" in adds:
        caps = list(GRANTABLE_CAPS)
    else:
        caps += [c for c in adds if c not in caps]
    if "CAP_ALL" in drops:
        return [c for c in adds if c != "CAP_ALL"] if "CAP_ALL" not in adds else []
    unknown = [c for c in adds + drops if c not in ALL_CAPS and c != "CAP_ALL"]
    if unknown:
        raise Invalid(f"unknown capabilities: {', '.join(unknown)}")
    return [c for c in caps if c not in drops]


def _default_mounts(readonly_sys: bool) -> list[dict[str, Any]]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                     "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro" if readonly_sys else "rw"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ]


def _propagation(value: int) -> tuple[str, str]:
    """(bind option, rootfs propagation it needs)."""
    if value == cri.PROPAGATION_BIDIRECTIONAL:
        return "rshared", "rshared"
    if value == cri.PROPAGATION_HOST_TO_CONTAINER:
        return "rslave", "rslave"
    return "rprivate", ""


def _seccomp(profile: cri.SecurityProfile | None, legacy_path: str,
             privileged: bool) -> dict[str, Any] | None:
    if privileged:
        return None
    if profile is not None and profile.profile_type == cri.SecurityProfile.Localhost:
        path = profile.localhost_ref
    elif profile is not None and profile.profile_type == cri.SecurityProfile.Unconfined:
        return None
    elif profile is not None:  # RuntimeDefault (the enum's zero value)
        return runtime_default_profile()
    else:
        path = legacy_path.removeprefix("localhost/") if legacy_path.startswith(
            "localhost/") else ""
        if legacy_path in ("runtime/default", "docker/default"):
            return runtime_default_profile()
        if not path:
            return None  # kubelet's default is Unconfined unless it asks otherwise
    if not os.path.isabs(path):
        raise Invalid(f"seccomp localhost profile {path!r} must be an absolute path")
    try:
        with open(path, "rb") as fh:
            loaded = json.load(fh)
    except (OSError, ValueError) as exc:
        raise Invalid(f"seccomp profile {path}: {exc}") from None
    if not isinstance(loaded, dict) or "defaultAction" not in loaded:
        raise Invalid(f"seccomp profile {path} has no defaultAction")
    return loaded


def build_spec(pod: PodContext, ctr: ContainerContext,
               cgroups: HostCgroups | None = None) -> dict[str, Any]:
    """`cgroups`: what the host's cgroups can enforce (detected once when not given)."""
    cgroups = cgroups or host_cgroups()
    cfg = ctr.config
    img = ctr.image_config.get("config") or {}
    sec = cfg.linux.security_context if cfg.HasField("linux") else None
    res = cfg.linux.resources if cfg.HasField("linux") else None
    privileged = bool(sec and sec.privileged)

    # Command: CRI command replaces the entrypoint, CRI args replace cmd (kubelet semantics).
    entrypoint = list(cfg.command) or ([] if cfg.command else list(img.get("Entrypoint") or []))
    cmd = list(cfg.args) or ([] if cfg.command else list(img.get("Cmd") or []))
    if cfg.command and not cfg.args:
        cmd = []
    args = entrypoint + cmd
    if not args:
        raise Invalid(f"container {cfg.metadata.name!r}: no command specified (neither the "
                      "CRI config nor the image has one)")

    env = _env_merge(list(img.get("Env") or []) or [f"PATH={DEFAULT_PATH}"],
                     [f"{kv.key}={kv.value}" for kv in cfg.envs] + ctr.extra_env)
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, f"PATH={DEFAULT_PATH}")
    hostname = pod.config.hostname or ""
    if hostname and not any(e.startswith("HOSTNAME=") for e in env):
        env.append(f"HOSTNAME={hostname}")

    user_spec = img.get("User") or ""
    group = None
    if sec is not None:
        if sec.HasField("run_as_user"):
            user_spec = str(sec.run_as_user.value)
        elif sec.run_as_username:
            user_spec = sec.run_as_username
        if sec.HasField("run_as_group"):
            group = sec.run_as_group.value
    user = resolve_user(ctr.rootfs, user_spec, group=group,
                        supplemental=list(sec.supplemental_groups) if sec else [])
    if not any(e.startswith("HOME=") for e in env):
        env.append(f"HOME={user.home}")

    caps = _caps(sec, privileged)
    process: dict[str, Any] = {
        "terminal": bool(cfg.tty),
        "user": {"uid": user.uid, "gid": user.gid,
                 **({"additionalGids": user.additional_gids} if user.additional_gids else {})},
        "args": args,
        "env": env,
        "cwd": cfg.working_dir or img.get("WorkingDir") or "/",
        "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
        "noNewPrivileges": bool(sec and sec.no_new_privs),
    }
    if res is not None and res.oom_score_adj:
        # Without CAP_SYS_RESOURCE a process cannot lower its OOM score below its parent's
        # (runc then fails obscurely); clamp as containerd's restrict_oom_score_adj does.
        process["oomScoreAdj"] = max(res.oom_score_adj, own_oom_score_adj())

    readonly_sys = not privileged
    mounts = _default_mounts(readonly_sys)
    rootfs_propagation = ""
    for m in cfg.mounts:
        if not m.container_path.startswith("/"):
            raise Invalid(f"mount container_path {m.container_path!r} must be absolute")
        if not m.host_path:
            raise Invalid(f"mount for {m.container_path} has no host_path")
        if not os.path.exists(m.host_path):
            # kubelet creates hostPath volumes; a missing one is a caller error.
            raise Invalid(f"mount source {m.host_path} does not exist")
        option, needs = _propagation(m.propagation)
        if needs == "rshared" or (needs == "rslave" and rootfs_propagation != "rshared"):
            rootfs_propagation = needs
        mounts.append({"destination": m.container_path, "type": "bind",
                       "source": m.host_path,
                       "options": ["rbind", option, "ro" if m.readonly else "rw"]})
    for dest, src in (("/etc/hostname", pod.hostname_path),
                      ("/etc/resolv.conf", pod.resolv_conf_path),
                      ("/etc/hosts", pod.hosts_path)):
        if src and not ctr.is_sandbox and not any(x["destination"] == dest for x in mounts):
            mounts.append({"destination": dest, "type": "bind", "source": src,
                           "options": ["rbind", "rprivate", "rw"]})
    if pod.shm_path and not ctr.is_sandbox:
        mounts.append({"destination": "/dev/shm", "type": "bind", "source": pod.shm_path,
                       "options": ["rbind", "rprivate", "rw"]})
    elif not any(x["destination"] == "/dev/shm" for x in mounts):
        mounts.append({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                       "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]})

    namespaces: list[dict[str, str]] = [{"type": "mount"}]
    ns_opts = sec.namespace_options if sec is not None else None
    # The pause container creates the pod's IPC and UTS namespaces; containers join them
    # (by the pause process' /proc/<pid>/ns paths). The network namespace is the named
    # one the executor made for CNI. NODE mode means the host's: no namespace entry.
    for kind, path, host in (("network", pod.netns_path, pod.host_network),
                             ("ipc", pod.ipc_ns_path, pod.host_ipc),
                             ("uts", pod.uts_ns_path, pod.host_network)):
        if host:
            continue
        if path and (kind == "network" or not ctr.is_sandbox):
            namespaces.append({"type": kind, "path": path})
        else:
            namespaces.append({"type": kind})
    pid_mode = ns_opts.pid if ns_opts is not None else cri.CONTAINER
    if not pod.host_pid:
        if pid_mode == cri.POD and pod.pid_ns_path and not ctr.is_sandbox:
            namespaces.append({"type": "pid", "path": pod.pid_ns_path})
        else:
            namespaces.append({"type": "pid"})

    devices = [{"allow": False, "access": "rwm"}]
    devices += [{"allow": True, "type": "c", "major": major, "access": "rwm",
                 **({"minor": minor} if minor >= 0 else {})}
                for major, minor in DEFAULT_DEVICES]
    linux_devices = []
    for dev in cfg.devices:
        try:
            st = os.stat(dev.host_path)
        except OSError as exc:
            raise Invalid(f"device {dev.host_path}: {exc.strerror}") from None
        kind = "c" if stat_mod.S_ISCHR(st.st_mode) else "b" if stat_mod.S_ISBLK(
            st.st_mode) else ""
        if not kind:
            raise Invalid(f"device {dev.host_path} is not a character or block device")
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        linux_devices.append({"path": dev.container_path or dev.host_path, "type": kind,
                              "major": major, "minor": minor, "fileMode": st.st_mode & 0o777,
                              "uid": 0, "gid": 0})
        devices.append({"allow": True, "type": kind, "major": major, "minor": minor,
                        "access": dev.permissions or "rwm"})
    if privileged:
        devices = [{"allow": True, "access": "rwm"}]

    resources: dict[str, Any] = {"devices": devices}
    if res is not None:
        cpu: dict[str, Any] = {}
        if res.cpu_shares:
            cpu["shares"] = res.cpu_shares
        if res.cpu_quota:
            cpu["quota"] = res.cpu_quota
        if res.cpu_period:
            cpu["period"] = res.cpu_period
        if res.cpuset_cpus:
            cpu["cpus"] = res.cpuset_cpus
        if res.cpuset_mems:
            cpu["mems"] = res.cpuset_mems
        if cpu:
            resources["cpu"] = cpu
        if res.memory_limit_in_bytes:
            resources["memory"] = {"limit": res.memory_limit_in_bytes}
            if res.memory_swap_limit_in_bytes:
                resources["memory"]["swap"] = res.memory_swap_limit_in_bytes
            elif cgroups.swap_accounting:
                # No swap beyond the limit: exceeding it OOM-kills, as kubelet expects.
                resources["memory"]["swap"] = res.memory_limit_in_bytes
        if res.hugepage_limits:
            resources["hugepageLimits"] = [{"pageSize": h.page_size, "limit": h.limit}
                                           for h in res.hugepage_limits]
        if res.unified:
            resources["unified"] = dict(res.unified)
        resources = fit_resources(resources, cgroups, ctr.container_id)

    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "resources": resources,
        "cgroupsPath": ctr.cgroups_path,
        "devices": linux_devices,
    }
    if not privileged:
        linux["maskedPaths"] = list(sec.masked_paths) if sec and sec.masked_paths \
            else list(MASKED_PATHS)
        linux["readonlyPaths"] = list(sec.readonly_paths) if sec and sec.readonly_paths \
            else list(READONLY_PATHS)
    seccomp = _seccomp(sec.seccomp if sec is not None and sec.HasField("seccomp") else None,
                       sec.seccomp_profile_path if sec is not None else "", privileged)
    if seccomp is not None:
        linux["seccomp"] = seccomp
    if rootfs_propagation:
        linux["rootfsPropagation"] = rootfs_propagation
    if ctr.is_sandbox and pod.config.HasField("linux") and pod.config.linux.sysctls:
        linux["sysctl"] = dict(pod.config.linux.sysctls)

    annotations = dict(cfg.annotations)
    annotations["io.kubernetes.cri.container-type"] = "sandbox" if ctr.is_sandbox \
        else "container"
    annotations["io.kubernetes.cri.sandbox-id"] = pod.sandbox_id
    return {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": ctr.rootfs, "readonly": bool(sec and sec.readonly_rootfs)},
        "hostname": hostname if not pod.host_network else "",
        "mounts": mounts,
        "annotations": annotations,
        "linux": linux,
    }


def stop_signal(cfg: cri.ContainerConfig, image_config: dict[str, Any]) -> int:
    if cfg.stop_signal:
        return int(cfg.stop_signal)  # the CRI Signal enum values are the signal numbers
    name = (image_config.get("config") or {}).get("StopSignal") or ""
    return parse_signal(name) if name else int(signals.SIGTERM)
