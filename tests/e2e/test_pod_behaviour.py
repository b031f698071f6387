"""What kubelet relies on, seen from inside real containers: networking in and between pods,
security context, limits, logs, stop escalation, exec timeouts, and restarts of Shoal's own
services while containers run."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc
from support.images import busybox_image, pause_image, push
from support.processes import ServiceProcess, ServiceSet, pids_mentioning
from support.registry import Registry

pytestmark = pytest.mark.e2e
_subnets = itertools.count(60)
SERVICES = ("puller", "snapshotter", "executor", "supervisor", "cri-gateway")


@pytest.fixture(scope="module")
def images(registry: Registry) -> dict[str, str]:
    push(registry.url, "behaviour/pause", "1", pause_image())
    push(registry.url, "behaviour/busybox", "1", busybox_image())
    return {"pause": f"{registry.host}/behaviour/pause:1",
            "busybox": f"{registry.host}/behaviour/busybox:1"}


@dataclass
class Shoal:
    services: ServiceSet
    extra: list[str]
    runtime: cri_grpc.RuntimeServiceStub
    images: cri_grpc.ImageServiceStub
    procs: dict[str, ServiceProcess] = field(default_factory=dict)
    tmp: Path = Path("/tmp")
    ids: list[str] = field(default_factory=list)  # every pod and container made

    async def restart(self, name: str) -> None:
        """kill -9 a service, then start it again under the same replica id."""
        sp = self.procs[name]
        await asyncio.to_thread(sp.kill9)
        new = self.services.start(name, replica=sp.replica, extra=self.extra)
        await asyncio.to_thread(self.services.wait_serving, new)
        self.procs[name] = new

    async def pod(self, name: str) -> tuple[str, cri.PodSandboxConfig]:
        logs = self.tmp / f"logs-{name}-{uuid.uuid4().hex[:6]}"
        logs.mkdir()
        config = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex,
                                            namespace="default"),
            hostname=name, log_directory=str(logs))
        reply = await self.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
        self.ids.append(reply.pod_sandbox_id)
        return reply.pod_sandbox_id, config

    async def run(self, pod: tuple[str, cri.PodSandboxConfig], name: str, *command: str,
                  image: str, **kw: object) -> str:
        config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name),
                                     image=cri.ImageSpec(image=image), command=list(command),
                                     log_path=f"{name}.log", **kw)  # type: ignore[arg-type]
        cid = (await self.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod[0], sandbox_config=pod[1], config=config))).container_id
        self.ids.append(cid)
        await self.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
        return cid

    async def status(self, cid: str) -> cri.ContainerStatus:
        return (await self.runtime.ContainerStatus(cri.ContainerStatusRequest(
            container_id=cid))).status

    async def wait_exit(self, cid: str, timeout: float = 30) -> cri.ContainerStatus:
        end = time.monotonic() + timeout
        while (status := await self.status(cid)).state != cri.CONTAINER_EXITED:
            assert time.monotonic() < end, f"{cid} did not exit: {status}"
            await asyncio.sleep(0.1)
        return status

    def log(self, pod: tuple[str, cri.PodSandboxConfig], name: str) -> str:
        path = Path(pod[1].log_directory) / f"{name}.log"
        return path.read_text() if path.exists() else ""

    async def exec(self, cid: str, *cmd: str, timeout: int = 10) -> cri.ExecSyncResponse:
        return await self.runtime.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=list(cmd),
                                                               timeout=timeout))


@pytest.fixture
async def shoal(services: ServiceSet, images: dict[str, str],
                tmp_path: Path) -> AsyncIterator[Shoal]:
    n = next(_subnets)
    # The services fixture's stop_all deletes them, also when a check below fails.
    services.pod_subnet, services.bridge = f"10.{n}.0.0/24", f"shoalb{n}"
    # Tests read the subnet and bridge from the last entries: keep them last.
    extra = ["--set", 'services.puller.registries."private.example".password="s3cret-pw"',
             "--set", f'cri.sandbox_image="{images["pause"]}"',
             "--set", f'services.executor.pod_subnet="10.{n}.0.0/24"',
             "--set", f'services.executor.cni_bridge="shoalb{n}"']
    procs = {name: services.start(name, extra=extra) for name in SERVICES}
    for sp in procs.values():
        await asyncio.to_thread(services.wait_serving, sp)
    async with grpc.aio.insecure_channel(f"unix://{services.node.cri_socket}") as channel:
        api = Shoal(services, extra, cri_grpc.RuntimeServiceStub(channel),
                    cri_grpc.ImageServiceStub(channel), procs, tmp_path)
        await api.images.PullImage(cri.PullImageRequest(
            image=cri.ImageSpec(image=images["busybox"])))
        yield api
        for pod in (await api.runtime.ListPodSandbox(cri.ListPodSandboxRequest())).items:
            await api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id))
            await api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(
                pod_sandbox_id=pod.id))
    root = str(services.node.root)
    # Nothing of the pods is left: mounts, conmon monitors, network namespaces, cgroups.
    mounts = Path("/proc/self/mounts").read_text()
    assert root not in mounts, [m for m in mounts.splitlines() if root in m]
    conmons = [p for p in pids_mentioning(root)
               if b"conmon" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert conmons == []
    for made in api.ids:
        assert not Path(f"/sys/fs/cgroup/memory/shoal/{made}").exists()
        assert not Path(f"/var/run/netns/shoal-{made[:32]}").exists()


async def test_localhost_in_a_pod_and_pod_ip_between_pods(shoal: Shoal,
                                                          images: dict[str, str]) -> None:
    bb = images["busybox"]
    pod_a = await shoal.pod("server")
    server = await shoal.run(pod_a, "server", "sh", "-c",
                             "while true; do echo hello-from-a | nc -l -p 8080; done", image=bb)
    client = await shoal.run(pod_a, "client", "sleep", "3600", image=bb)
    out = b""
    for _ in range(50):  # the server may need a moment to listen
        out = (await shoal.exec(client, "nc", "127.0.0.1", "8080")).stdout
        if out:
            break
        await asyncio.sleep(0.1)
    assert out == b"hello-from-a\n"
    ip = (await shoal.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(
        pod_sandbox_id=pod_a[0]))).status.network.ip
    pod_b = await shoal.pod("other")
    other = await shoal.run(pod_b, "other", "sleep", "3600", image=bb)
    reply = await shoal.exec(other, "nc", ip, "8080")
    assert reply.stdout == b"hello-from-a\n", reply
    assert (await shoal.status(server)).state == cri.CONTAINER_RUNNING
    pod_stats = (await shoal.runtime.PodSandboxStats(cri.PodSandboxStatsRequest(
        pod_sandbox_id=pod_a[0]))).stats
    assert {c.attributes.id for c in pod_stats.linux.containers} == {server, client}
    assert pod_stats.linux.memory.working_set_bytes.value > 0
    layer = pod_stats.linux.containers[0].writable_layer
    assert layer.inodes_used.value >= 0 and layer.timestamp > 0
    listed = await shoal.runtime.ListPodSandboxStats(cri.ListPodSandboxStatsRequest())
    assert {s.attributes.id for s in listed.stats} == {pod_a[0], pod_b[0]}


async def test_failed_sandbox_leaves_no_network_behind(shoal: Shoal) -> None:
    """The pause container fails (runc cannot set a sysctl that does not exist) while CNI
    ADD runs beside it: the pod's IP, veth and namespace are all given back."""
    bridge = shoal.extra[-1].split('"')[1]
    subnet_prefix = shoal.extra[-3].split('"')[1].rsplit(".", 2)[0] + "."
    before = set(Path("/var/run/netns").iterdir()) if Path("/var/run/netns").exists() else set()
    config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="broken", uid=uuid.uuid4().hex,
                                        namespace="default"),
        linux=cri.LinuxPodSandboxConfig(sysctls={"net.ipv4.shoal_no_such_sysctl": "1"}))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await shoal.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
    assert "shoal_no_such_sysctl" in (err.value.details() or "")
    ipam = Path("/var/lib/cni/networks/shoal")
    leased = [f.name for f in ipam.iterdir() if f.name.startswith(subnet_prefix)] \
        if ipam.exists() else []
    assert leased == []
    veths = subprocess.run(["ip", "-o", "link", "show", "master", bridge],
                           capture_output=True, text=True).stdout
    assert veths.strip() == ""
    after = set(Path("/var/run/netns").iterdir()) if Path("/var/run/netns").exists() else set()
    assert after - before == set()
    assert (await shoal.runtime.ListPodSandbox(cri.ListPodSandboxRequest())).items == []
    # The network still works for the next pod.
    pod = await shoal.pod("after-broken")
    status = (await shoal.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(
        pod_sandbox_id=pod[0]))).status
    assert status.network.ip.startswith(subnet_prefix)


async def test_security_context_and_config_seen_from_inside(shoal: Shoal,
                                                            images: dict[str, str]) -> None:
    pod = await shoal.pod("inside")
    sec = cri.LinuxContainerSecurityContext(
        run_as_user=cri.Int64Value(value=1000), readonly_rootfs=True,
        capabilities=cri.Capability(drop_capabilities=["ALL"], add_capabilities=["NET_RAW"]))
    cid = await shoal.run(
        pod, "inside", "sh", "-c",
        'id -u; pwd; echo "$GREETING"; echo "$0 $1"; touch /x 2>/dev/null || echo read-only; '
        "grep CapBnd /proc/self/status; sleep 3600", "arg-one",
        image=images["busybox"], working_dir="/tmp",
        envs=[cri.KeyValue(key="GREETING", value="hi there")],
        linux=cri.LinuxContainerConfig(security_context=sec))
    for _ in range(50):
        if "CapBnd" in shoal.log(pod, "inside"):
            break
        await asyncio.sleep(0.1)
    lines = [line.split(" ", 3)[3] for line in shoal.log(pod, "inside").splitlines()]
    # `sh -c SCRIPT ARG`: the first argument after the script is $0.
    assert lines[:5] == ["1000", "/tmp", "hi there", "arg-one ", "read-only"], lines
    # The bounding set is what the container may ever have: only CAP_NET_RAW (bit 13).
    # (Its effective set is empty: a non-root process loses capabilities on exec.)
    assert lines[5].split()[-1] == f"{1 << 13:016x}"
    assert (await shoal.status(cid)).state == cri.CONTAINER_RUNNING


async def test_memory_limit_exceeded_is_oomkilled(shoal: Shoal, images: dict[str, str]) -> None:
    pod = await shoal.pod("hog")
    cid = await shoal.run(pod, "hog", "sh", "-c",
                          'x=$(head -c 64000000 /dev/zero | tr "\\0" a); echo survived',
                          image=images["busybox"], linux=cri.LinuxContainerConfig(
                              resources=cri.LinuxContainerResources(
                                  memory_limit_in_bytes=16 << 20)))
    status = await shoal.wait_exit(cid)
    assert (status.reason, status.exit_code) == ("OOMKilled", 137)


def _memory_cgroup_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return int(Path(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes").read_text())
    raise AssertionError(f"process {pid} has no memory cgroup")


async def test_container_status_reports_current_resources(
        shoal: Shoal, images: dict[str, str]) -> None:
    """As containerd 1.6+: ContainerStatus.resources is what CreateContainer gave, as
    updated by each successful UpdateContainerResources, and survives a gateway restart."""
    swap_paired = Path("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists()
    pod = await shoal.pod("resources")
    given = cri.LinuxContainerResources(
        cpu_period=100000, cpu_quota=50000, cpu_shares=512, cpuset_cpus="0", cpuset_mems="0",
        memory_limit_in_bytes=64 << 20, oom_score_adj=500)
    cid = await shoal.run(pod, "limited", "sleep", "3600", image=images["busybox"],
                          linux=cri.LinuxContainerConfig(resources=given))
    expected = cri.LinuxContainerResources()
    expected.CopyFrom(given)
    if swap_paired:  # the executor gives no swap beyond the limit
        expected.memory_swap_limit_in_bytes = 64 << 20
    assert (await shoal.status(cid)).resources.linux == expected

    # A partial update changes what it sets (0/"" keep the current value), as runc does.
    await shoal.runtime.UpdateContainerResources(cri.UpdateContainerResourcesRequest(
        container_id=cid, linux=cri.LinuxContainerResources(
            cpu_quota=80000, cpu_shares=1024, cpuset_cpus="0-1",
            memory_limit_in_bytes=128 << 20)))
    expected.cpu_quota, expected.cpu_shares, expected.cpuset_cpus = 80000, 1024, "0-1"
    expected.memory_limit_in_bytes = 128 << 20
    if swap_paired:
        expected.memory_swap_limit_in_bytes = 128 << 20
    assert (await shoal.status(cid)).resources.linux == expected
    verbose = await shoal.runtime.ContainerStatus(cri.ContainerStatusRequest(
        container_id=cid, verbose=True))
    assert _memory_cgroup_limit(json.loads(verbose.info["info"])["pid"]) == 128 << 20

    # An update the runtime refuses is not recorded.
    with pytest.raises(grpc.aio.AioRpcError):
        await shoal.runtime.UpdateContainerResources(cri.UpdateContainerResourcesRequest(
            container_id=cid, linux=cri.LinuxContainerResources(cpuset_cpus="64-127",
                                                                 cpu_shares=2)))
    assert (await shoal.status(cid)).resources.linux == expected

    # The updated values are the gateway's durable metadata, not its memory.
    await shoal.restart("cri-gateway")
    after = await shoal.runtime.ContainerStatus(cri.ContainerStatusRequest(
        container_id=cid), wait_for_ready=True, timeout=10)  # the channel reconnects
    assert after.status.resources.linux == expected

    # The OOM score is the one the container really got: the executor raises a request
    # below its own score to it (a process may not go lower without CAP_SYS_RESOURCE).
    floor = int(Path(f"/proc/{shoal.procs['executor'].proc.pid}/oom_score_adj").read_text())
    low = await shoal.run(pod, "low", "sleep", "3600", image=images["busybox"],
                          linux=cri.LinuxContainerConfig(resources=cri.LinuxContainerResources(
                              oom_score_adj=-999)))
    assert (await shoal.status(low)).resources.linux.oom_score_adj == max(-999, floor)


async def test_logs_format_with_partial_lines(shoal: Shoal, images: dict[str, str]) -> None:
    pod = await shoal.pod("logs")
    long_line = "x" * 20000  # longer than conmon's buffer: written as P fragments then F
    cid = await shoal.run(pod, "logs", "sh", "-c",
                          f"printf 'start '; sleep 0.3; echo end; echo {long_line}; "
                          "echo err >&2", image=images["busybox"])
    await shoal.wait_exit(cid)
    entries = [line.split(" ", 3) for line in shoal.log(pod, "logs").splitlines()]
    for stamp, stream, tag, _ in entries:
        assert stream in ("stdout", "stderr") and tag in ("P", "F")
        assert stamp[4] == "-" and stamp[10] == "T"  # RFC 3339
    # Reassembling P fragments up to their F gives back the lines the program wrote.
    lines, partial = [], ""
    for _, stream, tag, text in entries:
        if stream != "stdout":
            continue
        partial += text
        if tag == "F":
            lines.append(partial)
            partial = ""
    assert lines == ["start end", long_line]
    assert any(tag == "P" for _, _, tag, _ in entries)
    assert ["stderr", "F", "err"] in [e[1:] for e in entries]


async def test_stop_escalates_to_sigkill_and_exec_times_out(shoal: Shoal,
                                                            images: dict[str, str]) -> None:
    pod = await shoal.pod("stubborn")
    cid = await shoal.run(pod, "stubborn", "sh", "-c", "trap '' TERM; while true; do sleep 1; "
                          "done", image=images["busybox"])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await shoal.exec(cid, "sleep", "10", timeout=1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    started = time.monotonic()
    await shoal.runtime.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=1))
    status = await shoal.wait_exit(cid)
    assert time.monotonic() - started < 10
    assert status.exit_code == 137  # SIGKILL after the timeout


@pytest.mark.parametrize("service", ["executor", "supervisor", "cri-gateway"])
async def test_kill_9_of_a_service_loses_nothing(shoal: Shoal, images: dict[str, str],
                                                 service: str) -> None:
    pod = await shoal.pod(f"survive-{service}")
    runner = await shoal.run(pod, "runner", "sh", "-c",
                             "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done",
                             image=images["busybox"])
    quitter = await shoal.run(pod, "quitter", "sh", "-c", "sleep 2; exit 5",
                              image=images["busybox"])
    before = await shoal.status(runner)
    verbose = await shoal.runtime.ContainerStatus(cri.ContainerStatusRequest(
        container_id=runner, verbose=True))
    pid_file = Path(f"/proc/{json.loads(verbose.info['info'])['pid']}")
    await asyncio.sleep(0.5)
    await shoal.restart(service)  # the quitter exits while (or just after) it is down
    await asyncio.sleep(2.5)
    after = await shoal.status(runner)
    assert after.state == cri.CONTAINER_RUNNING and after.started_at == before.started_at
    assert pid_file.exists()  # the very same process kept running
    done = await shoal.wait_exit(quitter)
    assert (done.exit_code, done.reason) == (5, "Error")
    ticks = [int(line.rsplit(" ", 1)[1]) for line in shoal.log(pod, "runner").splitlines()]
    assert ticks == list(range(len(ticks))) and len(ticks) >= 5  # no gap, no repeat
    stats = await shoal.runtime.ContainerStats(cri.ContainerStatsRequest(container_id=runner))
    assert stats.stats.cpu.usage_core_nano_seconds.value > 0
    out = await shoal.exec(runner, "echo", "still here")
    assert out.stdout == b"still here\n"


async def test_container_events_arrive_in_order_for_a_containers_life(
        shoal: Shoal, images: dict[str, str]) -> None:
    pod = await shoal.pod("events")
    stream = shoal.runtime.GetContainerEvents(cri.GetEventsRequest())
    received: list[cri.ContainerEventResponse] = []

    async def collect() -> None:
        async for event in stream:
            received.append(event)

    collector = asyncio.create_task(collect())
    await asyncio.sleep(0.5)  # the stream subscribes before anything happens
    cid = await shoal.run(pod, "short", "sh", "-c", "exit 2", image=images["busybox"])
    await shoal.wait_exit(cid)
    await shoal.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=cid))
    for _ in range(50):
        if any(e.container_id == cid and e.container_event_type == cri.CONTAINER_DELETED_EVENT
               for e in received):
            break
        await asyncio.sleep(0.1)
    stream.cancel()
    collector.cancel()
    mine = [e for e in received if e.container_id == cid]
    assert [e.container_event_type for e in mine] == [
        cri.CONTAINER_CREATED_EVENT, cri.CONTAINER_STARTED_EVENT, cri.CONTAINER_STOPPED_EVENT,
        cri.CONTAINER_DELETED_EVENT]
    assert mine[0].pod_sandbox_status.id == pod[0]
    stopped = next(s for s in mine[2].containers_statuses if s.id == cid)
    assert stopped.state == cri.CONTAINER_EXITED and stopped.exit_code == 2


async def test_operator_metrics_move_with_pods(shoal: Shoal, images: dict[str, str]) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def scrape(service: str) -> dict[str, float]:
        addr = shoal.procs[service].metrics_addr
        text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
        return {f"{s.name}{sorted(s.labels.items())}": s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    pod = await shoal.pod("metrics")
    await shoal.run(pod, "m", "sleep", "3600", image=images["busybox"])
    gateway = scrape("cri-gateway")
    assert gateway["shoal_cri_pod_start_seconds_count[]"] >= 1
    assert gateway["shoal_cri_pods[('state', 'ready')]"] >= 1
    assert gateway["shoal_cri_requests_total[('code', 'OK'), ('rpc', 'RunPodSandbox')]"] >= 1
    supervisor = scrape("supervisor")
    assert supervisor["shoal_supervisor_tasks[('state', 'running')]"] >= 2  # pause + m
    puller = scrape("puller")
    assert puller["shoal_puller_content_bytes[]"] > 0
    snapshotter = scrape("snapshotter")
    assert snapshotter["shoal_bus_events_consumer_pending[('consumer', "
                       f"'snapshotter-{shoal.services.node.node_id}')]"] >= 0
    # Puller and snapshotter share this machine: the layers were read from the puller's
    # files (its blobs, or its ingest files while they downloaded), not over the bus.
    assert snapshotter.get("shoal_snapshotter_layer_content_reads_total[('via', 'local')]",
                           0) + snapshotter.get(
        "shoal_snapshotter_layer_content_reads_total[('via', 'download')]", 0) >= 1
    assert "shoal_snapshotter_layer_content_reads_total[('via', 'bus')]" not in snapshotter
    # A second container of the image, unpacked by now: its snapshot is prepared on the
    # image's top chain directly, without another unpack hop.
    unpacks = "shoal_bus_request_handle_seconds_count[('subject', 'snapshots.unpack')]"
    prepares = "shoal_bus_request_handle_seconds_count[('subject', 'snapshots.prepare')]"
    await shoal.run(pod, "m2", "sleep", "3600", image=images["busybox"])
    again = scrape("snapshotter")
    assert again.get(unpacks, 0) == snapshotter.get(unpacks, 0)
    assert again[prepares] == snapshotter[prepares] + 1


async def test_every_rpc_answers(shoal: Shoal) -> None:
    status = await shoal.runtime.Status(cri.StatusRequest(verbose=True))
    assert {c.type: c.status for c in status.status.conditions} == {
        "RuntimeReady": True, "NetworkReady": True}
    versions = json.loads(status.info["version"])
    assert versions["runc"].startswith("runc version") and versions["nats_server"]
    assert "conmon" in versions["conmon"]
    assert json.loads(status.info["config"])["node_id"] == shoal.services.node.node_id
    # Secrets are redacted, registry passwords included (and where the NATS one lives).
    assert "s3cret-pw" not in status.info["config"]
    registry = json.loads(status.info["config"])["services"]["puller"]["registries"]
    assert registry["private.example"]["password"] == "<redacted>"
    # containerd 2's shape: the default handler "" first, then each configured one.
    assert [h.name for h in status.runtime_handlers] == ["", "runc"]
    await shoal.runtime.UpdateRuntimeConfig(cri.UpdateRuntimeConfigRequest(
        runtime_config=cri.RuntimeConfig(network_config=cri.NetworkConfig(
            pod_cidr="10.244.0.0/16"))))
    config = await shoal.runtime.RuntimeConfig(cri.RuntimeConfigRequest())
    assert config.linux.cgroup_driver == cri.CGROUPFS
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await shoal.runtime.CheckpointContainer(cri.CheckpointContainerRequest(
            container_id="x"))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "checkpoint" in (err.value.details() or "").lower()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await shoal.runtime.RunPodSandbox(cri.RunPodSandboxRequest(
            config=cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(
                name="h", uid="u", namespace="n")), runtime_handler="kata"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown runtime handler 'kata'" in (err.value.details() or "")


async def test_privileged_container_gets_what_this_host_can_grant(
        shoal: Shoal, images: dict[str, str]) -> None:
    """Root here lacks CAP_SYS_RESOURCE: a privileged container gets every capability the
    runtime itself holds (as containerd does), not a set runc cannot apply."""
    pod = await shoal.pod("priv")
    cid = await shoal.run(pod, "priv", "sh", "-c", "grep CapBnd /proc/self/status; sleep 3600",
                          image=images["busybox"], linux=cri.LinuxContainerConfig(
                              security_context=cri.LinuxContainerSecurityContext(
                                  privileged=True)))
    for _ in range(50):
        if "CapBnd" in shoal.log(pod, "priv"):
            break
        await asyncio.sleep(0.1)
    inside = int(shoal.log(pod, "priv").split("CapBnd:")[1].split()[0], 16)
    with open("/proc/self/status") as fh:
        host = next(int(line.split()[1], 16) for line in fh if line.startswith("CapBnd:"))
    assert inside == host
    assert (await shoal.status(cid)).state == cri.CONTAINER_RUNNING
