"""A ContainerConfig and an image config checked before anything of the container is made.

The fields checked are those that reach a file (the OCI spec's annotations), a path the
executor or runc opens or mounts (mounts, devices, seccomp profile, working directory),
execve(2) (command, args, environment: a NUL would cut them) or a kernel interface whose
refusal would surface as an obscure runc failure (ids, OOM score, cgroup values)."""

from __future__ import annotations

import re
from typing import Any

from cri_api.v1 import api_pb2 as cri
from shoal_common.messages.monitor import RESTART_ANNOTATION, RestartPolicy

from shoal_executor.domain.checks.text import (
    check_abs_path,
    check_id,
    check_no_nul,
    check_text,
    enum_name,
    refuse,
    shown,
)

CTR = "ContainerConfig"
MAX_ARG = 128 * 1024  # MAX_ARG_STRLEN: the longest single argument or variable execve takes
MAX_ANNOTATIONS = 256 * 1024  # the API server's limit on a pod's annotations, in bytes
MAX_SIGNAL = 64
OOM_SCORE_RANGE = (-1000, 1000)
_CPUSET = re.compile(r"\A[0-9,\-]{0,1024}\Z")
_DEVICE_ACCESS = re.compile(r"\A[rwm]{0,3}\Z")
_RESTART = re.compile(r"\A(no|always|unless-stopped|on-failure)(?::([0-9]{1,6}))?\Z")


def _check_process(config: cri.ContainerConfig) -> None:
    for name in ("command", "args"):
        for i, arg in enumerate(getattr(config, name)):
            check_no_nul(f"{CTR}.{name}[{i}]", arg, MAX_ARG)
    if config.working_dir:
        check_abs_path(f"{CTR}.working_dir", config.working_dir)
    for i, kv in enumerate(config.envs):
        field = f"{CTR}.envs[{i}]"
        check_no_nul(f"{field}.key", kv.key, MAX_ARG)
        if not kv.key or "=" in kv.key:
            raise refuse(f"{field}.key", f"{shown(kv.key)} is not a variable name (empty, "
                         "or contains '=')")
        check_no_nul(f"{field}.value", kv.value, MAX_ARG)
    if not 0 <= config.stop_signal <= MAX_SIGNAL:
        raise refuse(f"{CTR}.stop_signal", f"{config.stop_signal} is not a signal number "
                     f"(1-{MAX_SIGNAL}; 0: the image's)")


def _check_paths(config: cri.ContainerConfig) -> None:
    for i, m in enumerate(config.mounts):
        check_abs_path(f"{CTR}.mounts[{i}].container_path", m.container_path)
        check_no_nul(f"{CTR}.mounts[{i}].host_path", m.host_path)
        if m.recursive_read_only:
            # As kubelet and containerd: read-only below the mount needs it read-only
            # itself, and no propagation that would bring writable mounts in later.
            if not m.readonly:
                raise refuse(f"{CTR}.mounts[{i}].recursive_read_only", "needs readonly")
            if m.propagation != cri.PROPAGATION_PRIVATE:
                raise refuse(f"{CTR}.mounts[{i}].recursive_read_only", "conflicts with "
                             f"propagation {enum_name(cri.MountPropagation, m.propagation)}")
    for i, dev in enumerate(config.devices):
        check_abs_path(f"{CTR}.devices[{i}].host_path", dev.host_path)
        if dev.container_path:
            check_abs_path(f"{CTR}.devices[{i}].container_path", dev.container_path)
        if not _DEVICE_ACCESS.match(dev.permissions):
            raise refuse(f"{CTR}.devices[{i}].permissions", f"{shown(dev.permissions)} is "
                         "not a device access of 'r', 'w' and 'm'")


def _check_annotations(annotations: dict[str, str]) -> None:
    """They are written into the OCI spec (config.json)."""
    total = 0
    for key, value in annotations.items():
        check_text(f"{CTR}.annotations[{shown(key)}]", key, 317, spaces=False)
        if not key:
            raise refuse(f"{CTR}.annotations", "an annotation has an empty key")
        total += len(key.encode()) + len(value.encode())
    if total > MAX_ANNOTATIONS:
        raise refuse(f"{CTR}.annotations", f"{total} bytes, at most {MAX_ANNOTATIONS}")


def _check_security(sec: cri.LinuxContainerSecurityContext) -> None:
    field = f"{CTR}.linux.security_context"
    if sec.HasField("run_as_user"):
        check_id(f"{field}.run_as_user", sec.run_as_user.value)
    if sec.HasField("run_as_group"):
        check_id(f"{field}.run_as_group", sec.run_as_group.value)
    for i, gid in enumerate(sec.supplemental_groups):
        check_id(f"{field}.supplemental_groups[{i}]", gid)
    if sec.supplemental_groups_policy not in cri.SupplementalGroupsPolicy.values():
        raise refuse(f"{field}.supplemental_groups_policy", f"{sec.supplemental_groups_policy}"
                     f" is not one of {', '.join(cri.SupplementalGroupsPolicy.keys())}")
    check_text(f"{field}.run_as_username", sec.run_as_username, 256)
    check_no_nul(f"{field}.seccomp_profile_path", sec.seccomp_profile_path)
    check_no_nul(f"{field}.seccomp.localhost_ref", sec.seccomp.localhost_ref)
    for name in ("masked_paths", "readonly_paths"):
        for i, path in enumerate(getattr(sec, name)):
            check_abs_path(f"{field}.{name}[{i}]", path)


def _check_resources(res: cri.LinuxContainerResources) -> None:
    field = f"{CTR}.linux.resources"
    low, high = OOM_SCORE_RANGE
    if not low <= res.oom_score_adj <= high:
        raise refuse(f"{field}.oom_score_adj", f"{res.oom_score_adj} is outside {low}..{high}")
    for name, minimum in (("cpu_period", 0), ("cpu_shares", 0), ("cpu_quota", -1),
                          ("memory_limit_in_bytes", 0), ("memory_swap_limit_in_bytes", -1)):
        if getattr(res, name) < minimum:
            raise refuse(f"{field}.{name}", f"{getattr(res, name)} is below {minimum}")
    for name in ("cpuset_cpus", "cpuset_mems"):
        if not _CPUSET.match(getattr(res, name)):
            raise refuse(f"{field}.{name}", f"{shown(getattr(res, name))} is not a list of "
                         "numbers and ranges")
    for key, value in res.unified.items():
        # The key is checked when resources are fitted (a cgroup file name); the value is
        # written into that file.
        check_text(f"{field}.unified[{shown(key)}]", value, 4096)


def restart_policy(config: cri.ContainerConfig) -> RestartPolicy:
    """The restart policy the Docker gateway asks for (`name[:max retries]` in an
    annotation); none for a CRI client that does not set it (kubelet restarts its own)."""
    text = config.annotations.get(RESTART_ANNOTATION, "")
    if not text:
        return RestartPolicy()
    match = _RESTART.match(text)
    if match is None or (int(match[2] or 0) and match[1] != "on-failure"):
        raise refuse(f"{CTR}.annotations[{RESTART_ANNOTATION}]",
                     f"{shown(text)} is not a restart policy (no, always, unless-stopped, "
                     "on-failure[:N])")
    return RestartPolicy(name="" if match[1] == "no" else match[1],
                         max_retries=int(match[2] or 0))


def check_container_config(config: cri.ContainerConfig) -> None:
    """Raise Invalid naming the first bad field."""
    _check_process(config)
    _check_paths(config)
    _check_annotations(dict(config.annotations))
    restart_policy(config)
    if config.HasField("linux"):
        _check_security(config.linux.security_context)
        _check_resources(config.linux.resources)


# The image config keys the spec reads, and the type each must have.
_IMAGE_LISTS = ("Entrypoint", "Cmd", "Env")
_IMAGE_STRINGS = ("WorkingDir", "User", "StopSignal")


def check_image_config(doc: dict[str, Any], what: str) -> None:
    """The parts of an image config (JSON from the puller) the spec reads have the types
    the image spec gives them, without NULs: a peer may send any JSON."""
    config = doc.get("config")
    if config is None:
        return
    if not isinstance(config, dict):
        raise refuse(f"{what}.config", "not a JSON object")
    for key in _IMAGE_LISTS:
        items = config.get(key)
        if items is None:
            continue
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise refuse(f"{what}.config.{key}", "not a list of strings")
        for i, item in enumerate(items):
            check_no_nul(f"{what}.config.{key}[{i}]", item, MAX_ARG)
    for key in _IMAGE_STRINGS:
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise refuse(f"{what}.config.{key}", "not a string")
        check_no_nul(f"{what}.config.{key}", value)
