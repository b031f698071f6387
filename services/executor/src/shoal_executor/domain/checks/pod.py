"""A PodSandboxConfig checked before anything of the pod is made.

An API server validates pods before kubelet sees them, but the executor cannot count on
it: any peer on the bus may send a config. Whatever becomes a line of a file (hostname,
/etc/hosts, resolv.conf), a CNI/iptables argument (port mappings), a cgroup directory or a
/proc/sys write (sysctls) is checked here, with kubelet's own limits where it has them."""

from __future__ import annotations

import re

from cri_api.v1 import api_pb2 as cri

from shoal_executor.domain.checks.cgroup import POD_CGROUP_ROOTS, pod_cgroup_parent
from shoal_executor.domain.checks.text import (
    check_dns_name,
    check_id,
    check_ip,
    check_text,
    refuse,
    shown,
)

POD = "PodSandboxConfig"
# kubelet's limits (pkg/apis/core/validation, what glibc's resolver reads).
MAX_DNS_SERVERS = 3
MAX_DNS_SEARCHES = 32
MAX_DNS_SEARCH_CHARS = 2048
MAX_DNS_OPTIONS = 32
MAX_DNS_OPTION = 255
MAX_PORT = 65535
# Sysctl names as the API server accepts them (dots or slashes between segments).
_SYSCTL_SEGMENT = r"[a-z0-9]([-_a-z0-9]*[a-z0-9])?"
_SYSCTL_NAME = re.compile(rf"\A({_SYSCTL_SEGMENT}[./])*{_SYSCTL_SEGMENT}\Z")
MAX_SYSCTL_NAME = 253
MAX_SYSCTL_VALUE = 4096  # one page: what a /proc/sys write takes
# The namespaced sysctls (kubelet's pkg/kubelet/sysctl): only these can be set for one pod
# without changing the whole host.
IPC_SYSCTL_NAMES = frozenset({"kernel.sem"})
IPC_SYSCTL_PREFIXES = ("kernel.shm", "kernel.msg", "fs.mqueue.")
NET_SYSCTL_PREFIX = "net."


def _check_hostname(hostname: str) -> None:
    if hostname:  # "" = none: the pod's UTS namespace keeps the runtime's default
        if hostname.endswith("."):
            raise refuse(f"{POD}.hostname", f"{shown(hostname)} ends with a dot")
        check_dns_name(f"{POD}.hostname", hostname)


def _check_dns(dns: cri.DNSConfig) -> None:
    field = f"{POD}.dns_config"
    if len(dns.servers) > MAX_DNS_SERVERS:
        raise refuse(f"{field}.servers", f"{len(dns.servers)} servers, at most "
                     f"{MAX_DNS_SERVERS} are used")
    for i, server in enumerate(dns.servers):
        check_ip(f"{field}.servers[{i}]", server, scoped=True)
    if len(dns.searches) > MAX_DNS_SEARCHES:
        raise refuse(f"{field}.searches", f"{len(dns.searches)} search domains, at most "
                     f"{MAX_DNS_SEARCHES}")
    for i, search in enumerate(dns.searches):
        if search != ".":  # the root domain: searching it is allowed
            check_dns_name(f"{field}.searches[{i}]", search, underscore=True)
    if len(" ".join(dns.searches)) > MAX_DNS_SEARCH_CHARS:
        raise refuse(f"{field}.searches", f"longer than {MAX_DNS_SEARCH_CHARS} characters "
                     "in all")
    if len(dns.options) > MAX_DNS_OPTIONS:
        raise refuse(f"{field}.options", f"{len(dns.options)} options, at most "
                     f"{MAX_DNS_OPTIONS}")
    for i, option in enumerate(dns.options):
        check_text(f"{field}.options[{i}]", option, MAX_DNS_OPTION, spaces=False)
        if not option:
            raise refuse(f"{field}.options[{i}]", "empty")


def _check_port(field: str, port: int) -> None:
    if not 0 <= port <= MAX_PORT:
        raise refuse(field, f"{port} is not a port number (0-{MAX_PORT})")


def _check_ports(mappings: list[cri.PortMapping]) -> None:
    for i, pm in enumerate(mappings):
        field = f"{POD}.port_mappings[{i}]"
        _check_port(f"{field}.container_port", pm.container_port)
        _check_port(f"{field}.host_port", pm.host_port)
        if pm.host_port and not pm.container_port:
            raise refuse(f"{field}.container_port", f"must be set (1-{MAX_PORT}) with "
                         f"host_port {pm.host_port}")
        if pm.protocol not in cri.Protocol.values():
            raise refuse(f"{field}.protocol", f"{pm.protocol} is not one of "
                         f"{', '.join(cri.Protocol.keys())}")
        if pm.host_ip:
            check_ip(f"{field}.host_ip", pm.host_ip)


def _check_sysctls(sysctls: dict[str, str], host_network: bool, host_ipc: bool) -> None:
    for name, value in sorted(sysctls.items()):
        field = f"{POD}.linux.sysctls[{shown(name)}]"
        if len(name) > MAX_SYSCTL_NAME or not _SYSCTL_NAME.match(name):
            raise refuse(field, "not a sysctl name (dot-separated segments of a-z, 0-9, "
                         f"'-', '_'; at most {MAX_SYSCTL_NAME} characters)")
        ipc = name in IPC_SYSCTL_NAMES or name.startswith(IPC_SYSCTL_PREFIXES)
        net = name.startswith(NET_SYSCTL_PREFIX)
        if not (ipc or net):
            raise refuse(field, "not a namespaced sysctl (kernel.shm*, kernel.msg*, "
                         "kernel.sem, fs.mqueue.*, net.*): it would change the host")
        if net and host_network:
            raise refuse(field, "a net.* sysctl would change the host's network namespace "
                         "(the pod uses the host network)")
        if ipc and host_ipc:
            raise refuse(field, "an IPC sysctl would change the host's IPC namespace (the "
                         "pod uses the host IPC namespace)")
        # Blanks, tabs too, separate a value's fields (ip_local_port_range = "1024\t65000").
        check_text(field, value.replace("\t", " "), MAX_SYSCTL_VALUE)


def check_pod_config(config: cri.PodSandboxConfig,
                     cgroup_roots: tuple[str, ...] = POD_CGROUP_ROOTS) -> str:
    """Raise Invalid naming the first bad field; return the pod's cgroup parent,
    normalized ("" when none is given), which must lie under one of `cgroup_roots`."""
    _check_hostname(config.hostname)
    if config.HasField("dns_config"):
        _check_dns(config.dns_config)
    _check_ports(list(config.port_mappings))
    sec = config.linux.security_context
    if sec.HasField("run_as_user"):  # the pause container's user
        check_id(f"{POD}.linux.security_context.run_as_user", sec.run_as_user.value)
    opts = sec.namespace_options
    _check_sysctls(dict(config.linux.sysctls), host_network=opts.network == cri.NODE,
                   host_ipc=opts.ipc == cri.NODE)
    return pod_cgroup_parent(config.linux.cgroup_parent, cgroup_roots)

