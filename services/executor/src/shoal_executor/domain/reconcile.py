"""The executor's start-up reconcile: every operation a killed executor left half done is
finished or undone before this one serves, then whatever it made on the host that no record
claims any more is removed.

Half done, and its recorded owner no longer alive (another replica may be mid-operation): a
sandbox `creating` (undone: the gateway's retry of the create makes it anew) or `removing`
(finished), a container whose task was never recorded (pid 0: undone). Swept only where this
node's records prove it is ours, since other nodes may share the host: network namespaces
claimed in the `netns` table by no sandbox, with their CNI attachments and host-local leases
(not every `shoal-*` namespace: only the claimed ones); bundle and sandbox
directories under the run dir (this node's alone) that no record names, with the mounts
below them; and, in the background once serving, supervisor tasks no record names (the
executor records every task before it makes it)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import structlog
from shoal_common.clients import MonitorClient
from shoal_common.errors import DeadlineExceeded, NotFound, ShoalError, Unavailable
from shoal_common.messages.monitor import StopRequest, TaskIdRequest, TaskListRequest

from shoal_executor.domain import mounts, netns
from shoal_executor.domain.cni import Cni
from shoal_executor.domain.paths import KINDS
from shoal_executor.domain.runtime import Runtime
from shoal_executor.store.records import NetnsClaim

log = structlog.get_logger("shoal.executor.reconcile")

# The supervisor reads a request's namespace only for a create's events: any will do here.
NAMESPACE = "k8s.io"
UNDO_BUDGET = 30.0  # per object: one the supervisor cannot undo now keeps its record
TASKS_BUDGET = 30.0  # for the supervisor to answer the task list (it may be starting too)
HOST_LOCAL_DIR = "/var/lib/cni/networks"


async def before_serving(runtime: Runtime) -> None:
    await undo_half_done(runtime)
    await sweep_attachments(runtime)
    await sweep_netns(runtime)
    await sweep_dirs(runtime)


async def _bounded(op: Coroutine[Any, Any, None], what: str, object_id: str) -> bool:
    """One undo; one that fails keeps its record, so the caller's retry, its remove or the
    next start finishes it. False when the supervisor does not answer: the undos left then
    wait for those, rather than hold up the start for UNDO_BUDGET each."""
    try:
        async with asyncio.timeout(UNDO_BUDGET):
            await op
    except (ShoalError, TimeoutError) as exc:
        log.warning("could not undo a half-done operation yet", kind=what, id=object_id,
                    error=getattr(exc, "message", "") or type(exc).__name__)
        return not isinstance(exc, TimeoutError | Unavailable | DeadlineExceeded)
    return True


async def undo_half_done(rt: Runtime) -> None:
    for sandbox in await rt.records.sandboxes():
        if sandbox.abandoned():
            log.info("finishing a half-done sandbox operation", sandbox=sandbox.id,
                     state=sandbox.state)
            # Its containers first, the pause task, CNI, mounts, netns, files, the record.
            if not await _bounded(rt.remove_sandbox(sandbox.id, NAMESPACE), "sandbox",
                                  sandbox.id):
                return
    sandboxes = {s.id for s in await rt.records.sandboxes()}
    for ctr in await rt.records.containers():
        if ctr.abandoned() or ctr.sandbox_id not in sandboxes:
            log.info("undoing a half-made container", container=ctr.id)
            if not await _bounded(rt.remove_container(ctr.id, NAMESPACE), "container",
                                  ctr.id):
                return


async def sweep_attachments(rt: Runtime) -> None:
    """Networks connected after a pod was made whose connect was cut short, or whose pod's
    record is gone with CNI DEL still owed: DEL, then the record (before the namespaces
    are swept: DEL needs the namespace's path only, which the plugins tolerate gone)."""
    sandboxes = {s.id for s in await rt.records.sandboxes()}
    for att in await rt.records.attachments():
        if att.abandoned() or att.sandbox_id not in sandboxes:
            log.info("sweeping a network connection", sandbox=att.sandbox_id,
                     network=att.network, ifname=att.ifname, attached=att.attached)
            with contextlib.suppress(ShoalError):  # logged; tried again at the next start
                await rt.net.release_attachment(att)


async def sweep_netns(rt: Runtime) -> None:
    """Claims no sandbox record holds: CNI DEL, leases, the namespace, then the claim."""
    claims = await rt.records.netns_claims()
    # Read after the claims: a claim is written with its sandbox record, so one listed
    # above whose sandbox is missing here is truly nobody's — unless a pod still joins it
    # (its maker was removed first: the namespace stays until the last joiner leaves).
    sandboxes = await rt.records.sandboxes()
    claimed = {s.id for s in sandboxes} | {s.joins for s in sandboxes if s.joins}
    for claim in claims:
        if claim.sandbox_id in claimed:
            continue
        log.info("sweeping an unclaimed network namespace", netns=claim.name,
                 sandbox=claim.sandbox_id, attached=claim.attached)
        try:
            released = await release_network(rt.s.cni, claim)
            await netns.delete(claim.name)
        except ShoalError as exc:
            log.warning("could not sweep a network namespace", netns=claim.name,
                        error=exc.message)
            continue
        if released:
            await rt.records.drop_netns_claim(claim.name)


async def release_network(cni: Cni, claim: NetnsClaim) -> bool:
    """CNI DEL by the sandbox id (the plugins tolerate a namespace already gone), then any
    host-local lease still naming that id. False when DEL failed: the claim stays, to be
    tried again at the next start."""
    if not claim.attached:
        return True
    ok = True
    try:
        await cni.delete(claim.sandbox_id, claim.path, runtime_config=claim.runtime_config,
                         network=claim.network)
    except ShoalError as exc:
        log.warning("CNI DEL of an unclaimed sandbox failed", sandbox=claim.sandbox_id,
                    error=exc.message)
        ok = False
    try:
        leases = lease_dirs(cni, claim.network)
    except ShoalError:
        leases = []
    for directory in leases:
        removed = await asyncio.to_thread(remove_leases, directory, claim.sandbox_id)
        if removed:
            log.info("removed IP leases", sandbox=claim.sandbox_id, ips=removed)
    return ok


def lease_dirs(cni: Cni, network: str = "") -> list[Path]:
    """host-local's lease directories of a network (dataDir/<network>; "" = the default)."""
    net = cni.network(network)
    found = []
    for plugin in net.plugins:
        ipam = plugin.get("ipam") or {}
        if isinstance(ipam, dict) and ipam.get("type") == "host-local":
            found.append(Path(str(ipam.get("dataDir") or HOST_LOCAL_DIR)) / net.name)
    return found


def remove_leases(directory: Path, container_id: str) -> list[str]:
    """Lease files (named by IP, holding `<container id>\\r\\n<ifname>`) of `container_id`,
    removed under host-local's own lock; other ids' leases are never touched."""
    if not directory.is_dir():
        return []
    removed = []
    fd = os.open(directory / "lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for entry in directory.iterdir():
            if entry.name == "lock" or entry.name.startswith("last_reserved_ip"):
                continue
            try:
                owner = entry.read_text(errors="replace").split()
            except OSError:
                continue
            if owner and owner[0] == container_id:
                entry.unlink(missing_ok=True)
                removed.append(entry.name)
    finally:
        os.close(fd)  # releases the lock
    return removed


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first (so each unmounts from the top)."""
    root = os.path.realpath(path)
    with open("/proc/self/mountinfo") as fh:
        points = {_unescape(line.split(" ", 5)[4]) for line in fh}
    return sorted((p for p in points if p == root or p.startswith(root + "/")),
                  key=lambda p: p.count("/"), reverse=True)


def _entries(directory: Path) -> set[str]:
    try:
        return set(os.listdir(directory))
    except FileNotFoundError:
        return set()


async def sweep_dirs(rt: Runtime) -> None:
    """Bundle and sandbox directories no record names, unmounted (rootfs, shm, image
    volumes) and removed."""
    listed = {kind: _entries(rt.s.run_dir / kind) for kind in KINDS}
    # Read after listing: a record is written before its directory is made, and removed
    # after it, so a directory listed above without a record here is nobody's.
    sandboxes = {s.id for s in await rt.records.sandboxes()}
    claimed = {"sandboxes": sandboxes,
               "bundles": sandboxes | {c.id for c in await rt.records.containers()}}
    for kind, names in listed.items():
        for name in sorted(names - claimed[kind]):
            path = rt.s.run_dir / kind / name
            log.info("sweeping an unclaimed directory", path=str(path))
            try:
                rt.dirs.path(kind, name)  # a name no id could have is left alone
                for point in mounts_below(path):
                    await mounts.unmount(point)
                rt.dirs.remove(path)
            except ShoalError as exc:
                log.warning("could not sweep a directory", path=str(path), error=exc.message)


async def sweep_tasks(rt: Runtime) -> None:
    """Supervisor tasks no record names, killed and deleted. Run once serving: it waits
    for the supervisor, which may be starting at the same time."""
    monitor = MonitorClient(rt.bus, namespace=NAMESPACE)
    try:
        tasks = (await monitor.list_tasks(TaskListRequest(), timeout=TASKS_BUDGET)).tasks
    except ShoalError as exc:
        log.warning("could not list the supervisor's tasks; not sweeping them",
                    error=exc.message)
        return
    # Read after the list: a task is made after its record and deleted before it.
    claimed = ({s.id for s in await rt.records.sandboxes()}
               | {c.id for c in await rt.records.containers()})
    for task in tasks:
        if task.id in claimed:
            continue
        log.info("sweeping a task no record claims", task=task.id, state=task.state)
        try:
            await monitor.stop(StopRequest(id=task.id, signal=9, timeout=0.0))
            await monitor.delete(TaskIdRequest(id=task.id))
        except NotFound:
            pass
        except ShoalError as exc:
            log.warning("could not sweep a task", task=task.id, error=exc.message)
