"""The executor's edge, unit by unit: what a pod, container or image config may hold; each
refusal names its field (the e2e tests drive the same through the CRI and the bus)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cri_api.v1 import api_pb2 as cri
from shoal_common.errors import Invalid
from shoal_common.messages.monitor import RESTART_ANNOTATION
from shoal_executor.domain.checks import (
    check_container_config,
    check_image_config,
    check_pod_config,
    pod_cgroup_parent,
)
from shoal_executor.domain.checks.cgroup import expand_slice
from shoal_executor.domain.checks.container import restart_policy
from shoal_executor.domain.runtime import resolv_conf

NODE = cri.NamespaceOption(network=cri.NODE, ipc=cri.NODE)


def pod(**kw: object) -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(**kw)


def linux(host: bool = False, **kw: object) -> cri.LinuxPodSandboxConfig:
    sec = cri.LinuxSandboxSecurityContext(namespace_options=NODE) if host else None
    return cri.LinuxPodSandboxConfig(security_context=sec, **kw)


def dns(**kw: list[str]) -> cri.PodSandboxConfig:
    return pod(dns_config=cri.DNSConfig(**kw))


def port(**kw: int | str) -> cri.PodSandboxConfig:
    return pod(port_mappings=[cri.PortMapping(**kw)])


BAD_PODS = [
    ("hostname", pod(hostname="web\n10.0.0.1 evil"), "control characters"),
    ("hostname", pod(hostname="\x1b[31mred"), "control characters"),
    ("hostname", pod(hostname="a" * 64), "not a DNS name"),
    ("hostname", pod(hostname=".".join(["a" * 60] * 5)), "longer than 253"),
    ("hostname", pod(hostname="-web"), "not a DNS name"),
    ("hostname", pod(hostname="web."), "ends with a dot"),
    ("hostname", pod(hostname="a..b"), "not a DNS name"),
    ("dns_config.servers[0]", dns(servers=["10.0.0.1\nnameserver 6.6.6.6"]), "control"),
    ("dns_config.servers[0]", dns(servers=["dns.google"]), "not an IP address"),
    ("dns_config.servers[0]", dns(servers=["fe80::1%eth0\nx"]), "control"),
    ("dns_config.servers[0]", dns(servers=["fe80::1%$x"]), "not an interface name"),
    ("dns_config.servers", dns(servers=["1.1.1.1"] * 4), "at most 3"),
    ("dns_config.searches[0]", dns(searches=["svc\noptions x"]), "control"),
    ("dns_config.searches[1]", dns(searches=["ok", "-bad"]), "not a DNS name"),
    ("dns_config.searches", dns(searches=[f"d{i}" for i in range(33)]), "at most 32"),
    ("dns_config.searches", dns(searches=["a" * 60 + "." + "b" * 60] * 20), "2048"),
    ("dns_config.options[0]", dns(options=["ndots:5 rotate\nnameserver x"]), "whitespace"),
    ("dns_config.options[0]", dns(options=[""]), "empty"),
    ("port_mappings[0].host_port", port(container_port=80, host_port=65536), "0-65535"),
    ("port_mappings[0].host_port", port(container_port=80, host_port=-1), "0-65535"),
    ("port_mappings[0].container_port", port(container_port=-5), "0-65535"),
    ("port_mappings[0].container_port", port(host_port=8080), "must be set"),
    ("port_mappings[0].protocol", port(container_port=1, host_port=1, protocol=3), "TCP"),
    ("port_mappings[0].host_ip", port(container_port=1, host_port=1, host_ip="::1%lo"), "zone"),
    ("port_mappings[0].host_ip", port(container_port=1, host_port=1, host_ip="any"), "not an IP"),
    ("linux.sysctls['kernel.hostname']", pod(linux=linux(sysctls={"kernel.hostname": "x"})),
     "not a namespaced sysctl"),
    ("linux.sysctls['vm.swappiness']", pod(linux=linux(sysctls={"vm.swappiness": "1"})),
     "not a namespaced sysctl"),
    ("linux.sysctls['net..x']", pod(linux=linux(sysctls={"net..x": "1"})), "not a sysctl"),
    ("linux.sysctls['net/../../x']", pod(linux=linux(sysctls={"net/../../x": "1"})),
     "not a sysctl"),
    ("linux.sysctls['NET.x']", pod(linux=linux(sysctls={"NET.x": "1"})), "not a sysctl"),
    ("linux.sysctls['net.core.somaxconn']", pod(linux=linux(
        True, sysctls={"net.core.somaxconn": "1"})), "host network"),
    ("linux.sysctls['kernel.shmmax']", pod(linux=linux(True, sysctls={"kernel.shmmax": "1"})),
     "host IPC"),
    ("linux.sysctls['net.ipv4.ip_forward']", pod(linux=linux(
        sysctls={"net.ipv4.ip_forward": "1\n"})), "control"),
    ("linux.cgroup_parent", pod(linux=linux(cgroup_parent="../../../../evil")), "absolute"),
    ("linux.security_context.run_as_user", pod(linux=cri.LinuxPodSandboxConfig(
        security_context=cri.LinuxSandboxSecurityContext(
            run_as_user=cri.Int64Value(value=-1)))), "not a user or group id"),
]


@pytest.mark.parametrize(("field", "config", "why"), BAD_PODS,
                         ids=[f"{i}-{f}" for i, (f, _, _) in enumerate(BAD_PODS)])
def test_a_bad_pod_field_is_refused_naming_it(field: str, config: cri.PodSandboxConfig,
                                               why: str) -> None:
    with pytest.raises(Invalid) as err:
        check_pod_config(config)
    assert err.value.message.startswith(f"PodSandboxConfig.{field}: "), err.value.message
    assert why in err.value.message


def test_what_kubelet_sends_passes_and_writes_a_clean_resolv_conf() -> None:
    config = pod(
        hostname="web-0.web.default.svc.cluster.local",
        dns_config=cri.DNSConfig(servers=["10.96.0.10", "fe80::1%eth0", "2001:db8::53"],
                                 searches=["default.svc.cluster.local", "corp_x.example.",
                                           "."], options=["ndots:5", "edns0", "timeout:2"]),
        port_mappings=[cri.PortMapping(container_port=80, host_port=8080, host_ip="0.0.0.0"),
                       cri.PortMapping(container_port=53, protocol=cri.UDP),
                       cri.PortMapping(container_port=9, host_port=9, protocol=cri.SCTP,
                                       host_ip="::1")],
        linux=linux(cgroup_parent="/kubepods/burstable/pod1c9f-22", sysctls={
            "net.ipv4.ip_unprivileged_port_start": "0", "kernel.shm_rmid_forced": "1",
            "kernel.msgmax": "8192", "kernel.sem": "250 32000 100 128",
            "fs.mqueue.msg_max": "10", "net.ipv4.ip_local_port_range": "1024\t65000",
            "net.ipv4.conf.eth0/100.forwarding": "1"}))
    assert check_pod_config(config) == "/kubepods/burstable/pod1c9f-22"
    assert resolv_conf(config.dns_config) == (
        "nameserver 10.96.0.10\nnameserver fe80::1%eth0\nnameserver 2001:db8::53\n"
        "search default.svc.cluster.local corp_x.example. .\n"
        "options ndots:5 edns0 timeout:2\n")
    # A host-network pod may still set IPC sysctls, a host-IPC pod net.* ones.
    host_net = cri.LinuxPodSandboxConfig(sysctls={"kernel.shmmax": "1"})
    host_net.security_context.namespace_options.network = cri.NODE
    assert check_pod_config(pod(linux=host_net)) == ""


@pytest.mark.parametrize(("value", "normalized"), [
    ("", ""),
    ("/shoal", "/shoal"),
    ("/kubepods", "/kubepods"),
    ("/kubepods/burstable/pod4b2d5c1e-1f3a-4c7e-9a0b-5d6e7f8a9b0c",
     "/kubepods/burstable/pod4b2d5c1e-1f3a-4c7e-9a0b-5d6e7f8a9b0c"),
    ("/kubepods/besteffort/podx", "/kubepods/besteffort/podx"),
    ("/kubepods/podx", "/kubepods/podx"),
    ("//kubepods///burstable/./podx/", "/kubepods/burstable/podx"),
    ("kubepods.slice", "/kubepods.slice"),
    ("kubepods-burstable-pod4b2d5c1e_1f3a.slice",
     "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod4b2d5c1e_1f3a.slice"),
    ("/kubepods.slice/kubepods-besteffort.slice", "/kubepods.slice/kubepods-besteffort.slice"),
])
def test_kubelet_cgroup_parents_are_kept_normalized(value: str, normalized: str) -> None:
    assert pod_cgroup_parent(value) == normalized


@pytest.mark.parametrize("value", [
    "../../../../evil", "/kubepods/../evil", "/kubepods/burstable/../../evil", "/",
    "/evil", "/kubepodsevil/x", "/system.slice", "system.slice", "-.slice",
    "kubepods--x.slice", "kubepods-.slice", "evil", "kubepods", "/kubepods/\nx",
    "/kubepods/.hidden", "/kubepods/" + "a" * 256, "/kubepods/" + "a/" * 3000,
    "kubepods-../../x.slice",
])
def test_cgroup_parents_outside_the_pods_roots_are_refused(value: str) -> None:
    with pytest.raises(Invalid) as err:
        pod_cgroup_parent(value)
    assert err.value.message.startswith("PodSandboxConfig.linux.cgroup_parent: ")


def test_slices_expand_as_systemd_lays_them_out() -> None:
    assert expand_slice("a-b-c.slice") == "/a.slice/a-b.slice/a-b-c.slice"
    assert pod_cgroup_parent("/custom/x", roots=("/custom",)) == "/custom/x"


def ctr(**kw: object) -> cri.ContainerConfig:
    return cri.ContainerConfig(**kw)


def sec(**kw: object) -> cri.ContainerConfig:
    return ctr(linux=cri.LinuxContainerConfig(
        security_context=cri.LinuxContainerSecurityContext(**kw)))


def res(**kw: object) -> cri.ContainerConfig:
    return ctr(linux=cri.LinuxContainerConfig(resources=cri.LinuxContainerResources(**kw)))


BAD_CONTAINERS: list[tuple[str, cri.ContainerConfig]] = [
    ("command[1]", ctr(command=["sh", "-c\0x"])),
    ("args[0]", ctr(args=["a" * (128 * 1024 + 1)])),
    ("working_dir", ctr(working_dir="relative")),
    ("working_dir", ctr(working_dir="/a\0b")),
    ("envs[0].key", ctr(envs=[cri.KeyValue(key="A=B", value="x")])),
    ("envs[0].key", ctr(envs=[cri.KeyValue(key="", value="x")])),
    ("envs[1].value", ctr(envs=[cri.KeyValue(key="A"), cri.KeyValue(key="B", value="\0")])),
    ("stop_signal", ctr(stop_signal=cri.SIGRTMAX)),
    ("mounts[0].container_path", ctr(mounts=[cri.Mount(container_path="x", host_path="/")])),
    ("mounts[0].host_path", ctr(mounts=[cri.Mount(container_path="/x", host_path="/\0")])),
    ("devices[0].host_path", ctr(devices=[cri.Device(host_path="dev/null")])),
    ("devices[0].container_path", ctr(devices=[cri.Device(host_path="/dev/null",
                                                          container_path="null")])),
    ("devices[0].permissions", ctr(devices=[cri.Device(host_path="/dev/null",
                                                       permissions="rwx")])),
    ("annotations", ctr(annotations={"a": "x" * (256 * 1024)})),
    ("annotations['a\\nb']", ctr(annotations={"a\nb": "x"})),
    ("linux.security_context.run_as_user", sec(run_as_user=cri.Int64Value(value=-1))),
    ("linux.security_context.run_as_group", sec(run_as_group=cri.Int64Value(value=2**32))),
    ("linux.security_context.supplemental_groups[0]", sec(supplemental_groups=[-2])),
    ("linux.security_context.run_as_username", sec(run_as_username="root\n")),
    ("linux.security_context.seccomp_profile_path", sec(seccomp_profile_path="localhost/\0")),
    ("linux.security_context.masked_paths[0]", sec(masked_paths=["proc/kcore"])),
    ("linux.resources.oom_score_adj", res(oom_score_adj=1001)),
    ("linux.resources.cpu_quota", res(cpu_quota=-2)),
    ("linux.resources.memory_limit_in_bytes", res(memory_limit_in_bytes=-1)),
    ("linux.resources.cpuset_cpus", res(cpuset_cpus="0-3\n")),
    ("linux.resources.unified['memory.high']", res(unified={"memory.high": "1\n2"})),
]


@pytest.mark.parametrize(("field", "config"), BAD_CONTAINERS,
                         ids=[f"{i}-{f}" for i, (f, _) in enumerate(BAD_CONTAINERS)])
def test_a_bad_container_field_is_refused_naming_it(field: str,
                                                     config: cri.ContainerConfig) -> None:
    with pytest.raises(Invalid) as err:
        check_container_config(config)
    assert err.value.message.startswith(f"ContainerConfig.{field}"), err.value.message


def test_what_kubelet_sends_for_a_container_passes() -> None:
    config = ctr(
        command=["sh", "-c", "exec app"], args=["--x=1"], working_dir="/srv",
        envs=[cri.KeyValue(key="KUBERNETES_PORT", value="tcp://10.96.0.1:443"),
              cri.KeyValue(key="weird.name-ok", value="")],
        mounts=[cri.Mount(container_path="/etc/config", host_path="/var/lib/kubelet/x")],
        devices=[cri.Device(host_path="/dev/fuse", container_path="/dev/fuse",
                            permissions="rwm")],
        annotations={"io.kubernetes.container.hash": "abc"}, stop_signal=cri.SIGTERM,
        linux=cri.LinuxContainerConfig(
            resources=cri.LinuxContainerResources(
                cpu_period=100000, cpu_quota=-1, cpu_shares=2, oom_score_adj=-997,
                memory_swap_limit_in_bytes=-1, cpuset_cpus="0-3,5", unified={
                    "memory.high": "max"}),
            security_context=cri.LinuxContainerSecurityContext(
                run_as_user=cri.Int64Value(value=65534), supplemental_groups=[1, 2],
                masked_paths=["/proc/kcore"], seccomp_profile_path="runtime/default")))
    check_container_config(config)


@pytest.mark.parametrize(("doc", "field"), [
    ({"config": "x"}, "image config.config"),
    ({"config": {"Env": "PATH=/bin"}}, "image config.config.Env"),
    ({"config": {"Entrypoint": [1]}}, "image config.config.Entrypoint"),
    ({"config": {"Cmd": ["a\0"]}}, "image config.config.Cmd[0]"),
    ({"config": {"WorkingDir": ["/"]}}, "image config.config.WorkingDir"),
    ({"config": {"User": 0}}, "image config.config.User"),
    ({"config": {"StopSignal": 9}}, "image config.config.StopSignal"),
])
def test_an_image_config_of_the_wrong_shape_is_refused(doc: dict[str, object],
                                                        field: str) -> None:
    with pytest.raises(Invalid) as err:
        check_image_config(doc, "image config")
    assert err.value.message.startswith(f"{field}: "), err.value.message


@pytest.mark.parametrize("check", [
    lambda: check_pod_config(pod(hostname="\x1b" * 1_000_000)),
    lambda: check_pod_config(dns(searches=["\n" * 1_000_000])),
    lambda: check_container_config(ctr(working_dir="x" * 1_000_000)),
])
def test_a_huge_value_is_cut_short_in_the_message(check: Callable[[], None]) -> None:
    with pytest.raises(Invalid) as err:
        check()
    assert len(err.value.message) < 400


@pytest.mark.parametrize("text,name,retries", [
    ("", "", 0), ("no:0", "", 0), ("always:0", "always", 0),
    ("unless-stopped", "unless-stopped", 0),
    ("on-failure:5", "on-failure", 5), ("on-failure", "on-failure", 0)])
def test_the_restart_annotation_becomes_the_supervisors_policy(text: str, name: str,
                                                               retries: int) -> None:
    config = cri.ContainerConfig(annotations={RESTART_ANNOTATION: text} if text else {})
    policy = restart_policy(config)
    assert (policy.name, policy.max_retries) == (name, retries)


@pytest.mark.parametrize("text", ["sometimes", "always:3", "on-failure:-1", "on-failure:x",
                                  "on-failure:1234567", "always:0\n"])
def test_a_bad_restart_annotation_is_refused(text: str) -> None:
    config = cri.ContainerConfig(annotations={RESTART_ANNOTATION: text})
    with pytest.raises(Invalid, match="restart policy"):
        check_container_config(config)
