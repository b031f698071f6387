"""Pod sandboxes and containers: namespaces, CNI, rootfs mounts, OCI bundles, and the
monitors (through the supervisor) that run them.

Every step is idempotent by the caller's id, so a command retried after a crash of the
executor finishes what the first attempt began instead of doing it twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cri_api.v1 import api_pb2 as cri
from google.protobuf.message import DecodeError
from shoal_common import faults
from shoal_common.bus import Bus
from shoal_common.clients import MonitorClient
from shoal_common.config import RuntimeConfig
from shoal_common.errors import FailedPrecondition, Invalid, NotFound, ShoalError
from shoal_common.infra import needs_pause
from shoal_common.messages.monitor import (
    MonitorCreateRequest,
    StopRequest,
    TaskIdRequest,
    TaskState,
)
from shoal_common.messages.snapshots import Mount
from shoal_common.messages.tasks import ContainerCreateReply, SandboxInfo

from shoal_executor.domain import features, mounts, pinned, userns
from shoal_executor.domain.checks import (
    POD_CGROUP_ROOTS,
    check_container_config,
    check_image_config,
    check_pod_config,
    confine_rootfs,
)
from shoal_executor.domain.checks.container import restart_policy
from shoal_executor.domain.checks.image_volumes import check_image_volumes
from shoal_executor.domain.cni import AttachResult, Cni
from shoal_executor.domain.image_volumes import mount_image_volumes, unmount_image_volumes
from shoal_executor.domain.paths import RunDirs, write_public
from shoal_executor.domain.pod_network import PodNetworks
from shoal_executor.domain.spec import ContainerContext, PodContext, build_spec, stop_signal
from shoal_executor.store.records import (
    CREATING,
    NOTREADY,
    READY,
    REMOVING,
    ContainerRecord,
    Records,
    SandboxRecord,
    owner_token,
)

log = structlog.get_logger("shoal.executor")

DEFAULT_CGROUP_PARENT = "/shoal"
HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
SHM_SIZE = "65536k"


def decode_proto(cls: Any, data: bytes, what: str) -> Any:
    msg = cls()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise Invalid(f"{what} is not a valid runtime.v1 message: {exc}") from None
    return msg


def _image_config(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data) if data else {}
    except (ValueError, RecursionError) as exc:
        raise Invalid(f"{what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise Invalid(f"{what} is not a JSON object")
    check_image_config(doc, what)
    return doc


def resolv_conf(dns: cri.DNSConfig | None) -> str:
    if dns is None or not (dns.servers or dns.searches or dns.options):
        try:
            return Path("/etc/resolv.conf").read_text()
        except OSError:
            return ""
    lines = [f"nameserver {s}" for s in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return "\n".join(lines) + "\n"


def port_mappings(config: cri.PodSandboxConfig) -> list[dict[str, Any]]:
    """The CNI portmap plugin's runtimeConfig.portMappings (checked by check_pod_config)."""
    return [{"hostPort": p.host_port, "containerPort": p.container_port,
             "protocol": cri.Protocol.Name(p.protocol).lower(),
             **({"hostIP": p.host_ip} if p.host_ip else {})}
            for p in config.port_mappings if p.host_port]


def pause_container_config(config: cri.PodSandboxConfig) -> cri.ContainerConfig:
    """The pause container: the pod's namespaces, user, read-only rootfs and privilege."""
    pause = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="pause"))
    sec, out = config.linux.security_context, pause.linux.security_context
    out.namespace_options.CopyFrom(sec.namespace_options)
    if sec.HasField("run_as_user"):
        out.run_as_user.CopyFrom(sec.run_as_user)
    out.readonly_rootfs = sec.readonly_rootfs
    out.privileged = sec.privileged
    return pause


@dataclass
class RuntimeSettings:
    run_dir: Path  # <run_root>/executor
    runtimes: RuntimeConfig
    cni: Cni
    # <state_root>/snapshotter/snapshots: rootfs mounts may name directories there only.
    snapshots_dir: Path
    cgroup_roots: tuple[str, ...] = POD_CGROUP_ROOTS
    drop_infra: bool = True  # no pause process where a pod needs none (domain/pinned.py)

    def where(self) -> features.Where:
        return features.Where(str(self.snapshots_dir), str(self.run_dir))

    def runtime_for(self, handler: str) -> str:
        """`handler` if configured ("" is "runc"); the supervisor maps it to its binary."""
        if handler in ("", "runc") or handler in self.runtimes.handlers:
            return handler or "runc"
        raise Invalid(f"unknown runtime handler {handler!r} (configured: "
                      f"{', '.join(self.runtimes.names())})")


class Runtime:
    def __init__(self, settings: RuntimeSettings, records: Records, bus: Bus) -> None:
        self.s = settings
        self.records = records
        self.bus = bus
        self.dirs = RunDirs(settings.run_dir)
        self.owner = owner_token()  # names this process in the operations it records
        self.net = PodNetworks(settings.cni, records)

    # -- helpers -----------------------------------------------------------------------

    def _sandbox_dir(self, sandbox_id: str) -> Path:
        return self.dirs.path("sandboxes", sandbox_id)

    def _bundle_dir(self, container_id: str) -> Path:
        return self.dirs.path("bundles", container_id)

    def _monitor(self, namespace: str) -> MonitorClient:
        return MonitorClient(self.bus, namespace=namespace)

    async def _write_bundle(self, container_id: str, spec: dict[str, Any]) -> Path:
        bundle = self.dirs.make("bundles", container_id)
        tmp = bundle / "config.json.tmp"
        # Owner-only from the first byte: the spec holds the container's environment.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(spec, indent=1))
        tmp.replace(bundle / "config.json")
        return bundle

    # -- sandboxes ---------------------------------------------------------------------

    async def create_sandbox(self, sandbox_id: str, config_bytes: bytes, pause_config: bytes,
                             rootfs: list[Mount], namespace: str,
                             handler: str = "") -> SandboxInfo:
        runtime = self.s.runtime_for(handler)
        # Everything the request asks for is checked before anything is made.
        config = decode_proto(cri.PodSandboxConfig, config_bytes, "PodSandboxConfig")
        cgroup_parent = check_pod_config(config, self.s.cgroup_roots)
        image_config = _image_config(pause_config, "pause image config")
        # Empty for a pod without a pause process (the gateway prepares none for it).
        rootfs = confine_rootfs(rootfs, self.s.snapshots_dir) if rootfs else []
        idmap = await features.check_pod(config, self.s.runtimes.binary(runtime), runtime,
                                         self.s.where())
        existing = await self.records.sandbox(sandbox_id)
        if existing is not None and existing.made():
            return self._info(existing)
        # After the repeat of a finished create is answered: the pod it joins may be gone.
        choice = await self.net.choose(config, idmap)
        if existing is not None and existing.abandoned():
            # Killed mid-create and not undone at start (the supervisor did not answer):
            # undone now, since CNI ADD cannot be run twice into one namespace.
            await self.remove_sandbox(sandbox_id, namespace)
            existing = None
        pod_dir = self._sandbox_dir(sandbox_id)
        host_network = config.linux.security_context.namespace_options.network == cri.NODE
        record = existing or SandboxRecord(
            id=sandbox_id, created_at=time.time(), dir=str(pod_dir),
            cgroup_parent=cgroup_parent or DEFAULT_CGROUP_PARENT)
        record.runtime_config = {"portMappings": port_mappings(config)}
        record.state, record.owner = CREATING, self.owner
        record.pinned = self.s.drop_infra and not needs_pause(config) and idmap is None
        if not record.pinned and not rootfs:
            raise Invalid("this pod needs a pause container (" + (needs_pause(config) or
                          "services.executor.drop_infra is off") + "), and no rootfs was "
                          "given for it")
        self.net.assign(record, choice, config)
        # The intent, before anything is set up: a kill from here on leaves a record the
        # next start undoes (domain/reconcile.py).
        async with self.net.holding(record.joins):
            await self.records.put_sandbox(record, claim_netns=True)
        self.dirs.make("sandboxes", sandbox_id)
        network: asyncio.Task[AttachResult] | None = None
        try:
            network = await self.net.attach(record, idmap)
            hostname = config.hostname or (os.uname().nodename if host_network else "")
            self._pod_files(pod_dir, config, hostname)
            if record.pinned:
                await pinned.pin(pod_dir, config, hostname)
                await faults.point("executor.sandbox.pinned")
                pid = 0
            else:
                pid = (await self._start_pause(record, config, image_config, rootfs, runtime,
                                               namespace)).pid
            if network is not None:
                record.ips = (await network).ips
                await faults.point("executor.sandbox.network")
            # Containers bind-mount it; the pause container does not, so it can come last.
            write_public(pod_dir / "hosts", HOSTS + (
                f"{record.ips[0]}\t{hostname}\n" if record.ips and hostname else ""))
            record.pid = pid
            record.state, record.owner = READY, ""
            # A completion mark (the intent was durable): see Database.transaction.
            await self.records.put_sandbox(record, durable=False)
        except BaseException:
            log.warning("sandbox setup failed; tearing down", sandbox=sandbox_id)
            if network is not None:
                # Let a CNI ADD still running finish (cancelled midway it could not undo
                # itself); the teardown's CNI DEL then gives back what it attached.
                with contextlib.suppress(BaseException):
                    await asyncio.shield(network)
            await self._teardown(record, namespace, forget=False)
            raise
        log.info("sandbox ready", sandbox=sandbox_id, ip=record.ips[0] if record.ips else "",
                 pid=record.pid)
        return self._info(record)

    def _pod_files(self, pod_dir: Path, config: cri.PodSandboxConfig, hostname: str) -> None:
        """hostname and resolv.conf (from checked fields: no line can be injected), and a
        tmpfs for the pod's /dev/shm unless it shares the host's IPC namespace."""
        write_public(pod_dir / "hostname", hostname + "\n")
        write_public(pod_dir / "resolv.conf", resolv_conf(
            config.dns_config if config.HasField("dns_config") else None))
        shm = pod_dir / "shm"
        shm.mkdir(exist_ok=True)
        ipc = config.linux.security_context.namespace_options.ipc
        if not mounts.is_mountpoint(str(shm)) and ipc != cri.NODE:
            mounts.mount_tmpfs(str(shm), ["nosuid", "nodev", "noexec", "mode=1777",
                                          f"size={SHM_SIZE}"])

    async def _start_pause(self, record: SandboxRecord, config: cri.PodSandboxConfig,
                           image_config: dict[str, Any], rootfs: list[Mount], runtime: str,
                           namespace: str) -> TaskState:
        """The pause container's rootfs, bundle and process (created, then started)."""
        pause_id = record.id
        rootfs_dir = self.dirs.make("bundles", pause_id) / "rootfs"
        pod_dir = Path(record.dir)
        idmap = userns.pod_idmap(pod_dir)
        await userns.mount_rootfs(rootfs, str(rootfs_dir), rootfs_dir.parent, pod_dir, idmap)
        await faults.point("executor.sandbox.rootfs")
        pod = PodContext.of(record.id, config, idmap, netns_path=record.netns_path,
                            userns_path=userns.ns_file(pod_dir, idmap))
        spec = build_spec(pod, ContainerContext(
            pause_id, pause_container_config(config), image_config, str(rootfs_dir),
            f"{record.cgroup_parent}/{pause_id}", is_sandbox=True))
        bundle = await self._write_bundle(pause_id, spec)
        monitor = self._monitor(namespace)
        state = await monitor.create(MonitorCreateRequest(
            id=pause_id, bundle=str(bundle), runtime_handler=runtime,
            sandbox_id=record.id, cgroup_path=spec["linux"]["cgroupsPath"]))
        if state.state == "created":
            state = await monitor.start(TaskIdRequest(id=pause_id))
        await faults.point("executor.sandbox.started")
        return state

    def _info(self, r: SandboxRecord) -> SandboxInfo:
        return SandboxInfo(id=r.id, state=r.state, ip=r.ips[0] if r.ips else "",
                           additional_ips=r.ips[1:], netns_path=r.netns_path, pid=r.pid,
                           created_at=r.created_at, pinned=r.pinned)

    async def sandbox_status(self, sandbox_id: str) -> SandboxInfo:
        record = await self.records.sandbox(sandbox_id)
        if record is None:
            raise NotFound(f"sandbox {sandbox_id} not found")
        return self._info(record)

    async def stop_sandbox(self, sandbox_id: str, namespace: str) -> SandboxInfo:
        """Stop every container of the pod and the pause process, detach the network.
        Idempotent; the namespace and files stay until remove."""
        record = await self.records.sandbox(sandbox_id)
        if record is None:
            raise NotFound(f"sandbox {sandbox_id} not found")
        containers = await self.records.containers_of(sandbox_id)

        async def stop_processes() -> None:
            await _all(*(self.stop_container(c.id, 0.0, namespace) for c in containers))
            try:
                if not record.pinned:
                    await self._monitor(namespace).stop(StopRequest(id=sandbox_id,
                                                                    timeout=0.0))
            except NotFound:
                pass
            await faults.point("executor.sandbox.stopping")

        # CNI DEL (~80 ms) beside the kills: a stopped pod's processes get SIGKILL at once,
        # so none needs the network any more; both halves are idempotent, for a retry.
        await _all(stop_processes(), self.net.detach(record))
        await faults.point("executor.sandbox.stopped")
        if record.state != REMOVING:  # a remove under way stays one (a restart finishes it)
            record.state = NOTREADY
        await self.records.put_sandbox(record)
        return self._info(record)

    async def remove_sandbox(self, sandbox_id: str, namespace: str) -> None:
        record = await self.records.sandbox(sandbox_id)
        if record is None:
            return
        if record.state not in (NOTREADY, REMOVING):
            await self.stop_sandbox(sandbox_id, namespace)
        record.state, record.owner = REMOVING, self.owner
        await self.records.put_sandbox(record)  # the intent: a restart finishes it
        for ctr in await self.records.containers_of(sandbox_id):
            await self.remove_container(ctr.id, namespace)
        await faults.point("executor.sandbox.removing")
        await self._teardown(record, namespace, forget=True)

    async def _teardown(self, record: SandboxRecord, namespace: str, forget: bool) -> None:
        """Remove every trace of a sandbox: monitor, rootfs mount, shm, netns, files. A
        setup that failed after the pause process started leaves it running: it is killed
        first, since the supervisor refuses to delete a running task."""
        monitor = self._monitor(namespace)
        failure: ShoalError | None = None
        try:
            if not record.pinned:  # a pinned pod never has a pause task
                await monitor.stop(StopRequest(id=record.id, signal=9, timeout=0.0))
                await monitor.delete(TaskIdRequest(id=record.id))
        except ShoalError as exc:
            if not isinstance(exc, NotFound):
                log.warning("deleting the pause task", sandbox=record.id, error=exc.message)
                failure = exc
        await self.net.detach(record)
        await mounts.unmount(str(self._bundle_dir(record.id) / "rootfs"))
        mounts.unmount_below(str(self._bundle_dir(record.id)))
        await mounts.unmount(str(self._sandbox_dir(record.id) / "shm"))
        await pinned.unpin(self._sandbox_dir(record.id))
        await userns.unmount_pod(self._sandbox_dir(record.id))
        await self.net.release(record)
        self.dirs.remove(self._bundle_dir(record.id))
        self.dirs.remove(self._sandbox_dir(record.id))
        if not forget:  # a failed create: not made (its retry makes it anew)
            record.state, record.pid, record.owner, record.pinned = NOTREADY, 0, "", False
            await self.records.put_sandbox(record)
        elif failure is not None:
            raise failure  # the record stays for a retry: without it the pause task leaks
        else:
            await faults.point("executor.sandbox.removed")
            await self.records.delete_sandbox(record.id)
            await self.net.left(record)

    # -- containers --------------------------------------------------------------------

    async def create_container(self, container_id: str, sandbox_id: str, config_bytes: bytes,
                               sandbox_config: bytes, image_config: bytes,
                               rootfs: list[Mount], namespace: str,
                               handler: str = "") -> ContainerCreateReply:
        runtime = self.s.runtime_for(handler)
        # Everything the request asks for is checked before anything is made.
        config = decode_proto(cri.ContainerConfig, config_bytes, "ContainerConfig")
        check_container_config(config)
        pod_config = decode_proto(cri.PodSandboxConfig, sandbox_config, "PodSandboxConfig")
        check_pod_config(pod_config, self.s.cgroup_roots)
        image = _image_config(image_config, "image config")
        rootfs = confine_rootfs(rootfs, self.s.snapshots_dir)
        volumes = check_image_volumes(config, self.s.snapshots_dir)
        existing = await self.records.container(container_id)
        if existing is not None and existing.pid:
            return ContainerCreateReply(id=container_id, pid=existing.pid,
                                        bundle=existing.bundle,
                                        stop_signal=existing.stop_signal)
        sandbox = await self.records.sandbox(sandbox_id)
        if sandbox is None:
            raise NotFound(f"sandbox {sandbox_id} not found")
        if sandbox.state != "ready" or not sandbox.made():
            raise FailedPrecondition(f"sandbox {sandbox_id} is not ready")
        bundle_dir = self._bundle_dir(container_id)
        rootfs_dir = bundle_dir / "rootfs"
        pod_dir = self._sandbox_dir(sandbox_id)
        idmap = userns.pod_idmap(pod_dir)
        id_maps = await features.check_container(config, idmap, self.s.runtimes.binary(
            runtime), runtime, self.s.where())
        ns_paths = _pod_namespaces(sandbox, pod_dir)
        pod = PodContext.of(sandbox_id, pod_config, idmap, netns_path=sandbox.netns_path,
                            userns_path=userns.ns_file(pod_dir, idmap), **ns_paths,
                            hostname_path=str(pod_dir / "hostname"),
                            resolv_conf_path=str(pod_dir / "resolv.conf"),
                            hosts_path=str(pod_dir / "hosts"),
                            shm_path=str(pod_dir / "shm") if not pod_config.linux.
                            security_context.namespace_options.ipc == cri.NODE else "")
        signal = stop_signal(config, image)
        # The intent first (pid 0 = not made yet): a crash from here on leaves a record that
        # a retry finishes and a remove (or the start-up sweep) undoes.
        record = ContainerRecord(container_id, sandbox_id, str(bundle_dir), signal, 0,
                                 owner=self.owner)
        await self.records.put_container(record)
        try:
            self.dirs.make("bundles", container_id)
            await userns.mount_rootfs(rootfs, str(rootfs_dir), bundle_dir, pod_dir, idmap)
            await mount_image_volumes(volumes, config, bundle_dir)
            sources = await userns.mount_volumes(config, id_maps, bundle_dir, pod_dir, idmap)
            await faults.point("executor.container.rootfs")
            spec = build_spec(pod, ContainerContext(
                container_id, config, image, str(rootfs_dir),
                f"{sandbox.cgroup_parent}/{container_id}", mount_sources=sources))
            bundle = await self._write_bundle(container_id, spec)
            state = await self._monitor(namespace).create(MonitorCreateRequest(
                id=container_id, bundle=str(bundle), log_path=config.log_path,
                runtime_handler=runtime, tty=config.tty, stdin=config.stdin,
                stdin_once=config.stdin_once, sandbox_id=sandbox_id,
                cgroup_path=spec["linux"]["cgroupsPath"], restart=restart_policy(config)))
            await faults.point("executor.container.created")
        except BaseException:
            try:
                await asyncio.shield(self.remove_container(container_id, namespace))
            except ShoalError as exc:  # the record stays: a later remove finishes the job
                log.warning("undoing a failed container create", container=container_id,
                            error=exc.message)
            raise
        record.pid, record.owner = state.pid, ""
        await self.records.put_container(record, durable=False)  # a completion mark
        return ContainerCreateReply(id=container_id, pid=state.pid, bundle=str(bundle),
                                    stop_signal=signal)

    async def start_container(self, container_id: str, namespace: str) -> TaskState:
        if await self.records.container(container_id) is None:
            raise NotFound(f"container {container_id} not found")
        monitor = self._monitor(namespace)
        try:
            return await monitor.start(TaskIdRequest(id=container_id))
        except FailedPrecondition:
            # A start repeated after its reply was lost (the gateway, this executor or the
            # supervisor killed meanwhile) finds a short-lived container already exited:
            # the first start did start it, so the repeat succeeds as on a running one.
            state = await monitor.state(TaskIdRequest(id=container_id))
            if state.state == "stopped" and state.started_at > 0:
                return state
            raise

    async def stop_container(self, container_id: str, timeout: float,
                             namespace: str) -> TaskState:
        record = await self.records.container(container_id)
        if record is None:
            raise NotFound(f"container {container_id} not found")
        return await self._monitor(namespace).stop_task(StopRequest(
            id=container_id, signal=record.stop_signal, timeout=timeout))

    async def remove_container(self, container_id: str, namespace: str) -> None:
        record = await self.records.container(container_id)
        if record is None:
            return
        try:
            # The CRI removes running containers too: kill first (a no-op once stopped).
            await self._monitor(namespace).stop(StopRequest(id=container_id, signal=9,
                                                            timeout=0.0))
            await self._monitor(namespace).delete(TaskIdRequest(id=container_id))
        except NotFound:
            pass
        # Found by id, not by the recorded path: only ever under the run dir.
        bundle = self._bundle_dir(record.id)
        await mounts.unmount(str(bundle / "rootfs"))
        await unmount_image_volumes(bundle)
        mounts.unmount_below(str(bundle))  # idmapped volumes, an interrupted mount's layers
        self.dirs.remove(bundle)
        await self.records.delete_container(container_id)


def _pod_namespaces(sandbox: SandboxRecord, pod_dir: Path) -> dict[str, str]:
    """Where a container finds the pod's PID, IPC and UTS namespaces: its pinned files, or
    its pause process's (a pinned pod shares no PID namespace)."""
    if sandbox.pinned:
        return {"pid_ns_path": "", "ipc_ns_path": pinned.path(pod_dir, "ipc"),
                "uts_ns_path": pinned.path(pod_dir, "uts")}
    proc = f"/proc/{sandbox.pid}/ns"
    return {"pid_ns_path": f"{proc}/pid", "ipc_ns_path": f"{proc}/ipc",
            "uts_ns_path": f"{proc}/uts"}


async def _all(*steps: Awaitable[Any]) -> None:
    """Run `steps` together and let each finish (a CNI DEL cut short could not undo
    itself); then raise the first failure."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
