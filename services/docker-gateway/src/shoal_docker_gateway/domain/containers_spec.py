"""A Docker create body as CRI configs: the pod (name, uid = Docker id, hostname, ports,
network, DNS) and its one container (command, env, user, mounts, resources).

What the CRI leaves to the image (Entrypoint, Cmd, Env, WorkingDir, User) is left empty
here when the client did not set it: the executor applies the image's config. The merged
values Docker's inspect shows are worked out once, at create, and kept in the record
(`config["Shoal"]`)."""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cri_api.v1 import api_pb2 as cri
from shoal_cli.failures import CliError
from shoal_cli.run import JOIN, NETWORK_ANNOTATION, _security
from shoal_common.messages.monitor import RESTART_ANNOTATION

from shoal_docker_gateway.domain import networks, paths, volumes
from shoal_docker_gateway.domain.backend import Backend
from shoal_docker_gateway.domain.containers_body import (
    flag,
    integer,
    obj,
    objects,
    refuse_unsupported,
    restart_policy,
    str_list,
    str_map,
    text,
)
from shoal_docker_gateway.domain.lookup import resolve
from shoal_docker_gateway.errors import BadParameter, Unsupported

ID_LABEL = "io.shoal.docker.id"
CTR_NAME = "main"  # the CRI container's metadata name in each Docker container's pod
PROTOCOLS = {"tcp": cri.TCP, "udp": cri.UDP, "sctp": cri.SCTP}
DEFAULT_NETWORKS = ("", "default", "bridge")


@dataclass
class Spec:
    """What create makes, and what the record keeps of it."""

    pod: cri.PodSandboxConfig
    ctr: cri.ContainerConfig
    merged: dict[str, Any] = field(default_factory=dict)  # config["Shoal"]


def _env(items: list[str]) -> list[cri.KeyValue]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not key or "\0" in item:
            raise BadParameter(f"invalid environment variable: {item[:200]!r}")
        if sep:  # a bare KEY is one the CLI found unset: Docker drops it
            out.append(cri.KeyValue(key=key, value=value))
    return out


def _port_key(key: str) -> tuple[int, str]:
    port, _, proto = key.partition("/")
    proto = (proto or "tcp").lower()
    if not port.isdigit() or not 0 < int(port) < 65536 or proto not in PROTOCOLS:
        raise BadParameter(f"invalid port specification: {key[:64]!r}")
    return int(port), proto


def free_port(proto: str) -> int:
    """An ephemeral host port the kernel says is free now (Docker's HostPort "")."""
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def ports(body: dict[str, Any], hc: dict[str, Any]) -> tuple[list[cri.PortMapping],
                                                             dict[str, list[dict[str, str]]]]:
    """HostConfig.PortBindings (and -P: every ExposedPorts key) as CRI port mappings, and
    NetworkSettings.Ports as inspect shows them (empty host ports chosen here)."""
    bindings = obj(hc, "PortBindings", "HostConfig.")
    exposed = obj(body, "ExposedPorts")
    wanted: dict[str, list[Any]] = {k: v if isinstance(v, list) else [] for k, v in
                                    bindings.items()}
    if flag(hc, "PublishAllPorts"):
        for key in exposed:
            wanted.setdefault(key, [{}])
    out: list[cri.PortMapping] = []
    shown: dict[str, list[dict[str, str]]] = {}
    for key, binds in wanted.items():
        port, proto = _port_key(key)
        for b in binds or [{}]:
            if not isinstance(b, dict):
                raise BadParameter(f"invalid HostConfig.PortBindings[{key!r}]")
            ip, host = text(b, "HostIp", "PortBindings."), text(b, "HostPort", "PortBindings.")
            low, _, high = host.partition("-")
            if host and (not low.isdigit() or (high and high != low) or
                         not 0 < int(low) < 65536):
                raise BadParameter(f"invalid host port {host!r} (ranges are not supported)")
            number = int(low) if host else free_port(proto)
            out.append(cri.PortMapping(protocol=PROTOCOLS[proto], container_port=port,
                                       host_port=number, host_ip=ip))
            shown.setdefault(f"{port}/{proto}", []).append(
                {"HostIp": ip or "0.0.0.0", "HostPort": str(number)})
    for key in exposed:
        port, proto = _port_key(key)
        shown.setdefault(f"{port}/{proto}", [])
    return out, shown


def _bind_options(opts: str, where: str) -> tuple[bool, int]:
    readonly, propagation = False, cri.PROPAGATION_PRIVATE
    for opt in filter(None, opts.split(",")):
        if opt in ("ro", "rw"):
            readonly = opt == "ro"
        elif opt in ("rshared", "shared"):
            propagation = cri.PROPAGATION_BIDIRECTIONAL
        elif opt in ("rslave", "slave"):
            propagation = cri.PROPAGATION_HOST_TO_CONTAINER
        elif opt not in ("z", "Z", "nocopy", "private", "rprivate", "consistent", "cached",
                         "delegated"):
            raise BadParameter(f"invalid mode {opt!r} in {where}")
    return readonly, propagation


@dataclass
class _Mount:
    target: str
    source: str  # a host path, or a volume's name
    volume: bool
    readonly: bool = False
    propagation: int = cri.PROPAGATION_PRIVATE


def _binds(hc: dict[str, Any]) -> list[_Mount]:
    out = []
    for bind in str_list(hc, "Binds", "HostConfig.") or []:
        parts = bind.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/"):
            raise BadParameter(f"invalid volume specification: '{bind[:200]}'")
        ro, prop = _bind_options(parts[2] if len(parts) == 3 else "", f"bind {bind[:200]!r}")
        src = parts[0]
        if not src.startswith("/"):
            volumes.check_name(src)
        out.append(_Mount(parts[1], src, not src.startswith("/"), ro, prop))
    for m in objects(hc, "Mounts", "HostConfig."):
        kind, target = text(m, "Type", "Mounts."), text(m, "Target", "Mounts.")
        source = text(m, "Source", "Mounts.")
        if not target.startswith("/"):
            raise BadParameter(f"invalid mount config: Target {target[:200]!r} must be "
                               "an absolute path")
        if kind == "bind":
            if not source.startswith("/"):
                raise BadParameter(f"invalid mount config for type \"bind\": Source "
                                   f"{source[:200]!r} must be an absolute path")
            if not os.path.exists(source):
                raise BadParameter(f"invalid mount config for type \"bind\": bind source "
                                   f"path does not exist: {source}")
        elif kind == "volume":
            source = volumes.check_name(source or volumes.anonymous_name())
        else:
            raise Unsupported(f"mount type {kind!r} is not supported by Shoal")
        out.append(_Mount(target, source, kind == "volume", flag(m, "ReadOnly", "Mounts.")))
    return out


async def mounts(backend: Backend, body: dict[str, Any], hc: dict[str, Any],
                 image_volumes: dict[str, Any]) -> tuple[list[cri.Mount], list[str],
                                                         list[dict[str, Any]]]:
    """The CRI mounts, the anonymous volumes made for them (`rm -v` removes those), and the
    Mounts inspect shows. A missing bind source directory is made, as Docker does for -v;
    a named volume is made on first use."""
    wanted = _binds(hc)
    taken = {m.target for m in wanted}
    anonymous: list[str] = []
    for target in [*obj(body, "Volumes"), *image_volumes]:
        if isinstance(target, str) and target.startswith("/") and target not in taken:
            taken.add(target)
            anonymous.append(volumes.anonymous_name())
            wanted.append(_Mount(target, anonymous[-1], True))
    out, shown = [], []
    for m in wanted:
        if m.volume:
            host = str(await volumes.ensure_volume(backend, m.source))
        else:
            host = m.source
            await asyncio.to_thread(Path(host).mkdir, parents=True, exist_ok=True)
        out.append(cri.Mount(container_path=m.target, host_path=host, readonly=m.readonly,
                             propagation=m.propagation))  # type: ignore[arg-type]
        shown.append({"Type": "volume" if m.volume else "bind",
                      **({"Name": m.source, "Driver": "local"} if m.volume else {}),
                      "Source": host, "Destination": m.target, "Mode": "ro" if m.readonly
                      else "", "RW": not m.readonly, "Propagation": "" if m.volume
                      else "rprivate"})
    return out, anonymous, shown


def resources(hc: dict[str, Any], res: cri.LinuxContainerResources) -> None:
    res.memory_limit_in_bytes = integer(hc, "Memory", "HostConfig.")
    swap = integer(hc, "MemorySwap", "HostConfig.", low=-1)
    if swap > 0:
        res.memory_swap_limit_in_bytes = swap
    nano = integer(hc, "NanoCpus", "HostConfig.")
    quota = integer(hc, "CpuQuota", "HostConfig.", low=-1)
    if nano and quota:
        raise BadParameter("Conflicting options: Nano CPUs and CPU Period cannot both be set")
    if nano:
        res.cpu_period, res.cpu_quota = 100_000, max(nano * 100_000 // 1_000_000_000, 1000)
    else:
        res.cpu_period = integer(hc, "CpuPeriod", "HostConfig.", high=1_000_000)
        res.cpu_quota = max(quota, 0)
    res.cpu_shares = integer(hc, "CpuShares", "HostConfig.", high=262144)
    res.cpuset_cpus = text(hc, "CpusetCpus", "HostConfig.")
    res.cpuset_mems = text(hc, "CpusetMems", "HostConfig.")
    res.oom_score_adj = integer(hc, "OomScoreAdj", "HostConfig.", low=-1000, high=1000)


def _security_context(body: dict[str, Any], hc: dict[str, Any], sec:
                      cri.LinuxContainerSecurityContext) -> None:
    user = text(body, "User")
    if user:
        try:
            sec.CopyFrom(_security(user))
        except CliError as exc:
            raise BadParameter(str(exc).replace("--user", "User")) from None
    groups = str_list(hc, "GroupAdd", "HostConfig.") or []
    if not all(g.isdigit() for g in groups):
        raise Unsupported("HostConfig.GroupAdd: only numeric group ids are supported")
    sec.supplemental_groups.extend(int(g) for g in groups)
    sec.privileged = flag(hc, "Privileged", "HostConfig.")
    sec.readonly_rootfs = flag(hc, "ReadonlyRootfs", "HostConfig.")
    caps = [c.upper().removeprefix("CAP_") for c in str_list(hc, "CapAdd", "HostConfig.")
            or []]
    drops = [c.upper().removeprefix("CAP_") for c in str_list(hc, "CapDrop", "HostConfig.")
             or []]
    sec.capabilities.add_capabilities.extend(caps)
    sec.capabilities.drop_capabilities.extend(drops)
    for opt in str_list(hc, "SecurityOpt", "HostConfig.") or []:
        if opt.startswith("no-new-privileges"):
            sec.no_new_privs = True
        elif opt.startswith("seccomp"):
            sec.seccomp.profile_type = cri.SecurityProfile.Unconfined
        elif opt.startswith("apparmor"):
            sec.apparmor.profile_type = cri.SecurityProfile.Unconfined


def command(body: dict[str, Any], image: dict[str, Any]) -> tuple[list[str], list[str],
                                                                  list[str]]:
    """(CRI command, CRI args, Docker's Path+Args). Docker: an Entrypoint set replaces the
    image's and drops its Cmd; `--entrypoint ""` clears it, leaving the Cmd."""
    entrypoint, cmd = str_list(body, "Entrypoint"), str_list(body, "Cmd")
    image_cmd = list(image.get("Cmd") or [])
    if entrypoint is not None and entrypoint in ([], [""]):
        argv = cmd if cmd is not None else image_cmd
        return argv, [], argv
    if entrypoint:
        return entrypoint, cmd or [], entrypoint + (cmd or [])
    effective = list(image.get("Entrypoint") or []) + (cmd if cmd is not None else image_cmd)
    return [], cmd or [], effective


async def network(backend: Backend, body: dict[str, Any], hc: dict[str, Any],
                  pod: cri.PodSandboxConfig) -> tuple[str, dict[str, str]]:
    """HostConfig.NetworkMode on the pod: the mode as inspect names it, and the Docker user
    network it joins ({"Id", "Name"}; {} for none). On a user bridge network the pod's
    nameserver is the network's gateway, where the gateway answers for its containers'
    names (domain/dns.py), unless the client named its own (Dns)."""
    mode = text(hc, "NetworkMode", "HostConfig.")
    joined: dict[str, str] = {}
    if mode in DEFAULT_NETWORKS:
        return ("default" if not mode else mode), joined
    if mode == "host":
        if pod.port_mappings:
            pod.ClearField("port_mappings")  # Docker drops them with a warning
        pod.linux.security_context.namespace_options.network = cri.NODE
    elif mode.startswith(JOIN):
        if pod.port_mappings:
            raise BadParameter("conflicting options: port publishing and the container type "
                               "network mode")
        target = await resolve(backend, mode.removeprefix(JOIN))
        pod.annotations[NETWORK_ANNOTATION] = JOIN + target.pod_id
    elif mode == "none":
        pod.annotations[NETWORK_ANNOTATION] = mode
    else:
        att = await networks.attach(backend, body, mode)
        if att is None:  # a Shoal network's own name (`shoal network create`)
            pod.annotations[NETWORK_ANNOTATION] = mode
        else:
            pod.annotations[NETWORK_ANNOTATION] = att.shoal_name
            if att.dns and not pod.dns_config.servers:
                pod.dns_config.servers.append(att.dns)
            joined = {"Id": att.net_id, "Name": att.name}
    return mode, joined


def _dns(hc: dict[str, Any], pod: cri.PodSandboxConfig) -> None:
    servers = str_list(hc, "Dns", "HostConfig.") or []
    searches = str_list(hc, "DnsSearch", "HostConfig.") or []
    if servers or searches:
        pod.dns_config.servers.extend(servers)
        pod.dns_config.searches.extend(searches)


def _sysctls(hc: dict[str, Any], pod: cri.PodSandboxConfig) -> None:
    for key, value in str_map(hc, "Sysctls", "HostConfig.").items():
        pod.linux.sysctls[key] = value


def hostname(body: dict[str, Any], cid: str) -> str:
    name = text(body, "Hostname") or cid[:12]
    domain = text(body, "Domainname")
    return f"{name}.{domain}" if domain else name


async def build(backend: Backend, cid: str, name: str, body: dict[str, Any], image_ref: str,
                image: dict[str, Any]) -> Spec:
    """The CRI configs of container `cid` named `name` from its create body; `image` is the
    image config's `config` (Entrypoint, Cmd, Env, Volumes...)."""
    hc = obj(body, "HostConfig")
    refuse_unsupported(hc)
    policy, retries = restart_policy(hc)
    labels = {ID_LABEL: cid}
    port_mappings, shown_ports = ports(body, hc)
    pod = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=cid, namespace=backend.namespace),
        hostname=hostname(body, cid), log_directory=str(paths.log_directory(backend, cid)),
        port_mappings=port_mappings, labels=labels)
    _dns(hc, pod)
    _sysctls(hc, pod)
    mode, joined = await network(backend, body, hc, pod)
    if text(hc, "IpcMode", "HostConfig.") == "host":
        pod.linux.security_context.namespace_options.ipc = cri.NODE
    # Docker's container is the first process of a PID namespace of its own (kubelet's
    # CONTAINER): the pod then needs no pause process either.
    pod.linux.security_context.namespace_options.pid = cri.CONTAINER
    if text(hc, "PidMode", "HostConfig.") == "host":
        pod.linux.security_context.namespace_options.pid = cri.NODE
    cmd, args, argv = command(body, image)
    env = str_list(body, "Env") or []
    ctr = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=CTR_NAME), image=cri.ImageSpec(image=image_ref),
        command=cmd, args=args, envs=_env(env), working_dir=text(body, "WorkingDir"),
        log_path=paths.LOG_FILE, labels=labels, tty=flag(body, "Tty"),
        stdin=flag(body, "OpenStdin"),
        # dockerd closes a container's stdin when its attached client leaves only without a
        # terminal: `run -it` then detach (ctrl-p ctrl-q) leaves the shell running.
        stdin_once=flag(body, "StdinOnce") and not flag(body, "Tty"))
    if policy != "no":  # kept by the supervisor, which runs the container again itself
        ctr.annotations[RESTART_ANNOTATION] = f"{policy}:{retries}"
    ctr.linux.security_context.namespace_options.CopyFrom(
        pod.linux.security_context.namespace_options)
    resources(hc, ctr.linux.resources)
    _security_context(body, hc, ctr.linux.security_context)
    if ctr.linux.security_context.privileged:
        pod.linux.security_context.privileged = True  # the CRI's rule: the pod is too
    crimounts, anonymous, shown_mounts = await mounts(backend, body, hc,
                                                      obj(image, "Volumes"))
    ctr.mounts.extend(crimounts)
    merged = {"Path": argv[0] if argv else "", "Args": argv[1:], "Ports": shown_ports,
              "Mounts": shown_mounts, "AnonymousVolumes": anonymous, "NetworkMode": mode,
              **({"Network": joined} if joined else {}),
              "Env": _merged_env(list(image.get("Env") or []), env),
              "WorkingDir": text(body, "WorkingDir") or str(image.get("WorkingDir") or ""),
              "User": text(body, "User") or str(image.get("User") or ""),
              "Hostname": pod.hostname, "ImageCmd": image.get("Cmd"),
              "ImageEntrypoint": image.get("Entrypoint"), "ImageLabels": image.get("Labels"),
              "StopSignal": text(body, "StopSignal") or str(image.get("StopSignal") or "")}
    return Spec(pod=pod, ctr=ctr, merged=merged)


def _merged_env(image_env: list[str], env: list[str]) -> list[str]:
    merged: dict[str, str] = {}
    for item in [*image_env, *env]:
        if "=" in item:
            merged[item.partition("=")[0]] = item
    return list(merged.values())

