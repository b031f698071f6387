"""Docker's container lifecycle over the CRI: create (record first, then pod + container),
start (a stopped container gets a new CRI container in the same pod), stop, kill, remove,
wait, and the state Docker reports, read from the CRI."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from cri_api.v1 import api_pb2 as cri
from shoal_common.errors import NotFound
from shoal_common.messages.monitor import KillRequest, TaskIdRequest

from shoal_docker_gateway.domain import containers_spec, events, images, paths
from shoal_docker_gateway.domain.backend import Backend
from shoal_docker_gateway.domain.containers_body import check_name, obj, restart_policy
from shoal_docker_gateway.domain.lookup import resolve
from shoal_docker_gateway.errors import BadParameter, Conflict, Unsupported
from shoal_docker_gateway.store.containers import ContainerRecord, Containers

log = structlog.get_logger("shoal.docker")
ID_RE = re.compile(r"[0-9a-f]{64}")
POLL = 0.1  # seconds between looks at a container that is expected to exit
AUTO_REMOVE_GRACE = 1.0
NAMES = ("red", "blue", "green", "quiet", "brave", "calm", "eager", "keen")
KINDS = ("shoal", "reef", "tide", "kelp", "cove", "gull", "wave", "pearl")


@dataclass
class Observed:
    """What the CRI says of a container now."""

    status: str  # Docker's: created, running, exited
    exit_code: int
    started_at: float
    finished_at: float
    pid: int = 0


def _random_name(taken: set[str]) -> str:
    for _ in range(100):
        name = f"{NAMES[uuid.uuid4().int % len(NAMES)]}_{KINDS[uuid.uuid4().int % len(KINDS)]}"
        name += f"_{uuid.uuid4().hex[:4]}"
        if name not in taken:
            return name
    return uuid.uuid4().hex[:16]


async def create(backend: Backend, name: str, body: dict[str, Any]) -> ContainerRecord:
    store = Containers(backend.records)
    image_ref = body.get("Image")
    if not isinstance(image_ref, str) or not image_ref:
        raise BadParameter("config error: Image is required")
    info = await images.find(backend, image_ref, with_config=True)
    image_cfg = obj(images.config_of(info), "config")
    cid = uuid.uuid4().hex + uuid.uuid4().hex
    name = check_name(name) if name else _random_name({r.name for r in await store.all()})
    spec = await containers_spec.build(backend, cid, name, body, info.id, image_cfg)
    rec = ContainerRecord(id=cid, name=name, image=image_ref, image_id=info.id,
                          config={**body, "Shoal": spec.merged},
                          labels=dict(spec.ctr.labels))
    try:
        await store.insert(rec)  # intent first: a gateway killed now is cleaned up at start
    except sqlite3.IntegrityError:
        other = (await store.find(name))[0]
        raise Conflict(f'Conflict. The container name "/{name}" is already in use by '
                       f'container "{other.id}". You have to remove (or rename) that '
                       "container to be able to reuse that name.") from None
    paths.log_directory(backend, cid).mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        pod_id = (await backend.cri.runtime.RunPodSandbox(cri.RunPodSandboxRequest(
            config=spec.pod))).pod_sandbox_id
        rec = await store.update(rec, pod_id=pod_id)
        cri_id = (await backend.cri.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=spec.ctr, sandbox_config=spec.pod))).container_id
    except BaseException:
        with contextlib.suppress(Exception):
            await _remove_everything(backend, rec)
        raise
    rec = await store.update(rec, cri_id=cri_id, state="created")
    await events.container(backend, rec, "create")
    return rec


def _body(rec: ContainerRecord) -> dict[str, Any]:
    return {k: v for k, v in rec.config.items() if k != "Shoal"}


async def observe(backend: Backend, rec: ContainerRecord) -> Observed:
    if not rec.cri_id:
        return Observed("created", 0, 0, 0)
    try:
        st = (await backend.cri.runtime.ContainerStatus(cri.ContainerStatusRequest(
            container_id=rec.cri_id))).status
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return Observed("exited", rec.exit_code, rec.started_at, rec.finished_at)
        raise
    state = {cri.CONTAINER_CREATED: "created", cri.CONTAINER_RUNNING: "running",
             cri.CONTAINER_EXITED: "exited"}.get(st.state, "dead")
    return Observed(state, st.exit_code, st.started_at / 1e9, st.finished_at / 1e9)


async def start(backend: Backend, rec: ContainerRecord) -> bool:
    """False if it was running already (Docker's 304)."""
    seen = await observe(backend, rec)
    if seen.status == "running":
        return False
    if not (seen.status == "exited" and await _run_again(backend, rec)):
        if seen.status == "exited":
            rec = await _recreate(backend, rec)
        await backend.cri.runtime.StartContainer(cri.StartContainerRequest(
            container_id=rec.cri_id))
    await Containers(backend.records).update(rec, state="running", started_at=time.time())
    if rec.host_config.get("AutoRemove"):
        asyncio.get_running_loop().create_task(_auto_remove(backend, rec.id))
    return True


async def _run_again(backend: Backend, rec: ContainerRecord) -> bool:
    """An exited container run again in place by the supervisor, as dockerd restarts one:
    its writable layer, what `docker cp` put there, and its `docker update`s kept. False
    when its task is gone (made before the supervisor kept tasks, say)."""
    try:
        await backend.clients.monitor.rerun(TaskIdRequest(id=rec.cri_id))
    except NotFound:
        return False
    return True


async def _recreate(backend: Backend, rec: ContainerRecord) -> ContainerRecord:
    """A new CRI container in the container's pod: the CRI never starts one twice."""
    store = Containers(backend.records)
    old = rec.cri_id
    info = await images.find(backend, rec.image_id, with_config=True)
    spec = await containers_spec.build(backend, rec.id, rec.name, _body(rec), rec.image_id,
                                       obj(images.config_of(info), "config"))
    spec.ctr.metadata.attempt = rec.restart_count + 1
    cri_id = (await backend.cri.runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=rec.pod_id, config=spec.ctr, sandbox_config=spec.pod))).container_id
    rec = await store.update(rec, cri_id=cri_id, restart_count=rec.restart_count + 1)
    with contextlib.suppress(grpc.aio.AioRpcError):
        await backend.cri.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=old))
    return rec


async def _auto_remove(backend: Backend, cid: str) -> None:
    try:
        rec = await resolve(backend, cid)
        await wait_exit(backend, rec)
        # Attached streams read the log to its end within a poll or two; then it goes.
        await asyncio.sleep(AUTO_REMOVE_GRACE)
        rec = await resolve(backend, cid)
        await remove(backend, rec, force=True, volumes=True)
    except Exception as exc:  # a container removed meanwhile, or the CRI away: logged
        log.info("auto-remove did not finish", container=cid, error=str(exc))


async def wait_exit(backend: Backend, rec: ContainerRecord) -> Observed:
    while True:
        seen = await observe(backend, rec)
        if seen.status in ("exited", "dead"):
            return seen
        await asyncio.sleep(POLL)
        fresh = await Containers(backend.records).by_id(rec.id)
        if fresh is None:
            return seen
        rec = fresh


async def stop(backend: Backend, rec: ContainerRecord, timeout: int) -> bool:
    """False if it was not running (Docker's 304)."""
    seen = await observe(backend, rec)
    if seen.status != "running":
        if rec.cri_id and restart_policy(rec.host_config)[0] != "no":
            # Between two runs of its restart policy (or in the making of one): the stop,
            # which the supervisor sees, ends the policy.
            await backend.cri.runtime.StopContainer(cri.StopContainerRequest(
                container_id=rec.cri_id, timeout=timeout), timeout=timeout + 60)
            await _note_exit(backend, rec)
        return False
    backend.seen.expect(rec.id, "die")
    await events.container(backend, rec, "kill", signal=str(_stop_signal(rec)))
    await backend.cri.runtime.StopContainer(cri.StopContainerRequest(
        container_id=rec.cri_id, timeout=timeout), timeout=timeout + 60)
    await _note_exit(backend, rec)
    await backend.seen.wait(rec.id, "die")  # Docker's order: kill, die, stop
    await events.container(backend, rec, "stop")
    return True


def _stop_signal(rec: ContainerRecord) -> int:
    """The signal a stop sends first (the container's or its image's StopSignal)."""
    try:
        return parse_signal(str(rec.config.get("Shoal", {}).get("StopSignal") or "SIGTERM"))
    except BadParameter:
        return int(signal.SIGTERM)


async def restart(backend: Backend, rec: ContainerRecord, timeout: int) -> None:
    """Docker's restart: a stop if it runs, a start; events kill, die, stop, start,
    restart."""
    await stop(backend, rec, timeout)
    backend.seen.expect(rec.id, "start")
    await start(backend, await resolve(backend, rec.id))
    await backend.seen.wait(rec.id, "start")
    await events.container(backend, rec, "restart")


async def _note_exit(backend: Backend, rec: ContainerRecord) -> None:
    seen = await observe(backend, rec)
    await Containers(backend.records).update(rec, state=seen.status, exit_code=seen.exit_code,
                                             finished_at=seen.finished_at)


def parse_signal(text: str) -> int:
    name = (text or "SIGKILL").upper()
    if name.isdigit():
        number = int(name)
        if not 0 < number < 65:
            raise BadParameter(f"invalid signal: {text}")
        return number
    try:
        return int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
    except KeyError:
        raise BadParameter(f"invalid signal: {text}") from None


async def kill(backend: Backend, rec: ContainerRecord, signum: int) -> None:
    seen = await observe(backend, rec)
    if seen.status != "running":
        raise Conflict(f"Cannot kill container: {rec.id}: Container {rec.id} is not running")
    await events.container(backend, rec, "kill", signal=str(signum))
    if signum == signal.SIGKILL:
        await backend.cri.runtime.StopContainer(cri.StopContainerRequest(
            container_id=rec.cri_id, timeout=0))
        await _note_exit(backend, rec)
        return
    await backend.clients.monitor.kill(KillRequest(id=rec.cri_id, signal=signum))


# What `docker update` may change, all resources (the CLI sends every one, 0 = unchanged).
UPDATABLE = ("Memory", "MemorySwap", "NanoCpus", "CpuShares", "CpuPeriod", "CpuQuota",
             "CpusetCpus", "CpusetMems")
REFUSED_UPDATES = ("BlkioWeight", "KernelMemory", "MemoryReservation", "PidsLimit",
                   "CpuRealtimePeriod", "CpuRealtimeRuntime")


async def update(backend: Backend, rec: ContainerRecord, body: dict[str, Any]) -> None:
    """New limits for a container: applied now through the CRI if it runs (or is created),
    and kept for later runs."""
    for key in REFUSED_UPDATES:
        if body.get(key) not in (None, 0, ""):
            raise Unsupported(f"updating {key} is not supported by Shoal")
    policy = body.get("RestartPolicy")
    if isinstance(policy, dict) and policy.get("Name"):
        raise Unsupported("updating the restart policy is not supported by Shoal yet")
    hc = dict(rec.host_config)
    hc.update({k: body[k] for k in UPDATABLE if body.get(k) not in (None, 0, "")})
    if body.get("NanoCpus"):
        hc.pop("CpuQuota", None)
        hc.pop("CpuPeriod", None)
    elif body.get("CpuQuota") or body.get("CpuPeriod"):
        hc.pop("NanoCpus", None)
    res = cri.LinuxContainerResources()
    containers_spec.resources(hc, res)  # checks every field as a create does
    if (await observe(backend, rec)).status in ("created", "running"):
        await backend.cri.runtime.UpdateContainerResources(cri.UpdateContainerResourcesRequest(
            container_id=rec.cri_id, linux=res))
    await Containers(backend.records).update(rec, config={**rec.config, "HostConfig": hc})
    await events.container(backend, rec, "update")


async def rename(backend: Backend, rec: ContainerRecord, name: str) -> None:
    """A new unique name (409 when taken)."""
    name = check_name(name)
    try:
        await Containers(backend.records).rename(rec.id, name)
    except sqlite3.IntegrityError:
        raise Conflict(f'Conflict. The container name "/{name}" is already in use') from None
    await events.container(backend, rec, "rename", name=name, oldName=f"/{rec.name}")


async def remove(backend: Backend, rec: ContainerRecord, force: bool, volumes: bool) -> None:
    seen = await observe(backend, rec)
    if seen.status == "running" and not force:
        raise Conflict(f"You cannot remove a running container {rec.id}. Stop the container "
                       "before attempting removal or force remove")
    store = Containers(backend.records)
    rec = await store.update(rec, state="removing")  # intent: finished at start if killed
    backend.gone.add(rec)  # its exit may come after the row is gone
    if seen.status == "running":
        backend.seen.expect(rec.id, "die")
        await events.container(backend, rec, "kill", signal=str(signal.SIGKILL))
    await _remove_everything(backend, rec)
    backend.execs.forget_container(rec.id)
    await backend.seen.wait(rec.id, "die")  # Docker's order: kill, die, destroy
    await events.container(backend, rec, "destroy")
    if volumes:
        from shoal_docker_gateway.domain import volumes as vols

        for name in rec.config.get("Shoal", {}).get("AnonymousVolumes", []):
            with contextlib.suppress(Exception):
                await vols.remove(backend, name, force=True)


async def _remove_everything(backend: Backend, rec: ContainerRecord) -> None:
    """The pod (and so its container), the log directory, the record."""
    if rec.pod_id:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await backend.cri.runtime.StopPodSandbox(cri.StopPodSandboxRequest(
                pod_sandbox_id=rec.pod_id))
        try:
            await backend.cri.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(
                pod_sandbox_id=rec.pod_id))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
    if ID_RE.fullmatch(rec.id):  # a pod's uid is anyone's text: never a path out of ours
        await asyncio.to_thread(shutil.rmtree, paths.log_directory(backend, rec.id), True)
    await Containers(backend.records).delete(rec.id)


async def reconcile(backend: Backend) -> None:
    """At start: finish what a killed gateway left half done (records `creating` or
    `removing` are removed with their pods), and remove pods of the Docker namespace that
    no record names (a create killed before its record had the pod's id)."""
    store = Containers(backend.records)
    records = await store.all()
    for rec in records:
        if rec.state in ("creating", "removing"):
            log.info("finishing a half-done container", container=rec.id, state=rec.state)
            await _remove_everything(backend, rec)
    known = {r.id for r in records if r.state not in ("creating", "removing")}
    pods = (await backend.cri.runtime.ListPodSandbox(cri.ListPodSandboxRequest())).items
    for pod in pods:
        docker_id = pod.labels.get(containers_spec.ID_LABEL, "")
        if docker_id not in known:
            await _remove_everything(backend, ContainerRecord(
                id=docker_id or pod.metadata.uid, name="", image="", config={},
                pod_id=pod.id))
