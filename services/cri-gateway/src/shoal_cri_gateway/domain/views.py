"""CRI views of pods and containers: records the gateway keeps joined with the runtime
state the supervisor reports (never cached), with kubelet's filters."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from cri_api.v1 import api_pb2 as cri
from shoal_common.messages.monitor import TaskState

from shoal_cri_gateway.domain import resources
from shoal_cri_gateway.domain.pods import Pods, gather_states
from shoal_cri_gateway.store.metadata import ContainerRecord, PodRecord

CONTAINER_STATES = {"created": cri.CONTAINER_CREATED, "running": cri.CONTAINER_RUNNING,
                    "stopped": cri.CONTAINER_EXITED}


def selected(labels: dict[str, str], selector: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_metadata(p: PodRecord) -> cri.PodSandboxMetadata:
    return cri.PodSandboxMetadata(name=p.name, uid=p.uid, namespace=p.namespace,
                                  attempt=p.attempt)


def ctr_metadata(c: ContainerRecord) -> cri.ContainerMetadata:
    return cri.ContainerMetadata(name=c.name, attempt=c.attempt)


def container_state(task: TaskState | None) -> cri.ContainerState.ValueType:
    return CONTAINER_STATES.get(task.state, cri.CONTAINER_UNKNOWN) if task else \
        cri.CONTAINER_UNKNOWN


OVERFLOW_ID = 65534  # what the kernel shows for an id a user namespace does not map


def _to_container(host_id: int, id_map: list[list[int]]) -> int:
    """A host id as the container sees it, by its /proc/<pid>/uid_map (or gid_map) lines
    `container host length`, read from the host's user namespace."""
    for inside, outside, length in id_map:
        if outside <= host_id < outside + length:
            return inside + host_id - outside
    return OVERFLOW_ID


def _proc_user(pid: int) -> cri.ContainerUser | None:
    """The real ids the process runs with (/proc/<pid>/status: the host's ids, mapped back
    into its user namespace); None when it cannot be read (gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        maps = [[[int(n) for n in line.split()] for line in
                 Path(f"/proc/{pid}/{kind}_map").read_text().splitlines()]
                for kind in ("uid", "gid")]
    except (OSError, ValueError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    try:
        uid, gid = (int(fields[key].split()[0]) for key in ("Uid", "Gid"))
        groups = [int(g) for g in fields.get("Groups", "").split()]
    except (KeyError, IndexError, ValueError):
        return None
    return cri.ContainerUser(linux=cri.LinuxContainerUser(
        uid=_to_container(uid, maps[0]), gid=_to_container(gid, maps[1]),
        supplemental_groups=[_to_container(g, maps[1]) for g in groups]))


def _spec_user(bundle: str) -> cri.ContainerUser | None:
    """The ids the OCI spec gives the process: what it runs with once started."""
    try:
        spec: Any = json.loads((Path(bundle) / "config.json").read_text())
        user = spec["process"]["user"]
        return cri.ContainerUser(linux=cri.LinuxContainerUser(
            uid=int(user["uid"]), gid=int(user["gid"]),
            supplemental_groups=[int(g) for g in user.get("additionalGids") or []]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # removed meanwhile: no user to report


def container_user(task: TaskState | None) -> cri.ContainerUser | None:
    """ContainerStatus.user: the running process's ids, else (created, exited, or its
    /proc gone) those of the spec."""
    if task is None:
        return None
    if task.state == "running" and task.pid:
        found = _proc_user(task.pid)
        if found is not None:
            return found
    return _spec_user(task.bundle) if task.bundle else None


def pod_status(pod: PodRecord, state: str) -> cri.PodSandboxStatus:
    config = cri.PodSandboxConfig()
    config.ParseFromString(pod.config)
    return cri.PodSandboxStatus(
        id=pod.id, metadata=pod_metadata(pod),
        state=cri.SANDBOX_READY if state == "ready" else cri.SANDBOX_NOTREADY,
        created_at=pod.created_at_ns,
        network=cri.PodSandboxNetworkStatus(ip=pod.ip, additional_ips=[
            cri.PodIP(ip=ip) for ip in pod.additional_ips]),
        linux=cri.LinuxPodSandboxStatus(namespaces=cri.Namespace(
            options=config.linux.security_context.namespace_options)),
        labels=pod.labels, annotations=pod.annotations,
        runtime_handler=pod.runtime_handler)


async def container_status(ctr: ContainerRecord, task: TaskState | None
                           ) -> cri.ContainerStatus:
    config = cri.ContainerConfig()
    config.ParseFromString(ctr.config)
    created = await resources.base(ctr.config, task.bundle if task is not None else "")
    status = cri.ContainerStatus(
        id=ctr.id, metadata=ctr_metadata(ctr), state=container_state(task),
        created_at=ctr.created_at_ns, image=cri.ImageSpec(image=ctr.image),
        image_ref=ctr.image_ref, image_id=ctr.image_id, labels=ctr.labels,
        annotations=ctr.annotations, mounts=list(config.mounts), log_path=ctr.log_path,
        resources=resources.current(created, ctr.updated_resources))
    user = await asyncio.to_thread(container_user, task)
    if user is not None:
        status.user.CopyFrom(user)
    if task is not None:
        status.started_at = int(task.started_at * 1e9)
        status.finished_at = int(task.finished_at * 1e9)
        status.exit_code = task.exit_code
        status.reason = task.reason
        status.message = task.message
    return status


def pod_matches(p: PodRecord, f: cri.PodSandboxFilter | cri.PodSandboxStatsFilter | None
                ) -> bool:
    return f is None or ((not f.id or p.id.startswith(f.id))
                         and selected(p.labels, dict(f.label_selector)))


def container_matches(c: ContainerRecord,
                      f: cri.ContainerFilter | cri.ContainerStatsFilter | None) -> bool:
    return f is None or ((not f.id or c.id.startswith(f.id))
                         and (not f.pod_sandbox_id or c.pod_id.startswith(f.pod_sandbox_id))
                         and selected(c.labels, dict(f.label_selector)))


class Views:
    """Each view shows the caller's Shoal namespace (`ns`) only."""

    def __init__(self, pods: Pods) -> None:
        self.pods = pods

    async def pod_status(self, ns: str, pod_id: str
                         ) -> tuple[cri.PodSandboxStatus, dict[str, str]]:
        """The status, and the verbose info containerd gives."""
        pod = await self.pods.meta.pod(pod_id, ns)
        state = await self.pods.sandbox_state(pod)
        info = {"info": json.dumps({"netnsPath": pod.netns_path, "state": state,
                                    "runtimeHandler": pod.runtime_handler or "runc"})}
        return pod_status(pod, state), info

    async def list_pods(self, ns: str, f: cri.PodSandboxFilter | None
                        ) -> list[cri.PodSandbox]:
        pods = [p for p in await self.pods.meta.pods(ns) if pod_matches(p, f)]
        states = await gather_states(self.pods, pods)
        items = []
        for p in pods:
            state = cri.SANDBOX_READY if states[p.id] == "ready" else cri.SANDBOX_NOTREADY
            if f is not None and f.HasField("state") and f.state.state != state:
                continue
            items.append(cri.PodSandbox(id=p.id, metadata=pod_metadata(p), state=state,
                                        created_at=p.created_at_ns, labels=p.labels,
                                        annotations=p.annotations,
                                        runtime_handler=p.runtime_handler))
        return items

    async def container_status(self, ns: str, container_id: str
                               ) -> tuple[cri.ContainerStatus, dict[str, str]]:
        ctr = await self.pods.meta.container(container_id, ns)
        task = await self.pods.task_state(ns, ctr.id)
        info = {"info": json.dumps({"sandboxID": ctr.pod_id, "pid": task.pid if task else 0,
                                    "bundle": task.bundle if task else ""})}
        return await container_status(ctr, task), info

    async def list_containers(self, ns: str, f: cri.ContainerFilter | None
                              ) -> list[cri.Container]:
        tasks = await self.pods.task_states(ns)
        out = []
        for c in await self.pods.meta.containers(ns):
            state = container_state(tasks.get(c.id))
            if not container_matches(c, f) or (
                    f is not None and f.HasField("state") and f.state.state != state):
                continue
            out.append(cri.Container(id=c.id, pod_sandbox_id=c.pod_id,
                                     metadata=ctr_metadata(c),
                                     image=cri.ImageSpec(image=c.image), image_ref=c.image_ref,
                                     image_id=c.image_id, state=state,
                                     created_at=c.created_at_ns, labels=c.labels,
                                     annotations=c.annotations))
        return out

    async def pod_statuses(self, pod: PodRecord
                           ) -> tuple[cri.PodSandboxStatus, list[cri.ContainerStatus]]:
        """A pod's status with every container's, as a container event carries them."""
        status = pod_status(pod, await self.pods.sandbox_state(pod))
        tasks = await self.pods.task_states(pod.shoal_namespace)
        containers = await asyncio.gather(*(
            container_status(c, tasks.get(c.id))
            for c in await self.pods.meta.containers(pod.shoal_namespace, pod.id)))
        return status, list(containers)
