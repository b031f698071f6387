"""Which network a pod sandbox is on, and its network namespace's whole life.

A pod chooses with its PodSandboxConfig: `namespace_options.network = NODE` is the host's
network; otherwise the annotation `io.shoal.network` (kubelet's pods have none) says:

- absent, "" or the default network's name: the default CNI network, as always;
- `NAME`: the network `shoal network create` made as NAME (unknown: INVALID naming it);
- `none`: a network namespace of its own with only `lo`, no CNI;
- `container:<sandbox id>`: the network namespace of that pod (its address, ports and
  interfaces): no CNI for the joiner, whose record names the pod it `joins`.

A ready pod with a namespace of its own may be connected to more networks later
(`sandbox.connect`, Docker's `network connect`): interfaces eth1, eth2... without a default
route (eth0's network keeps it), each recorded before its CNI ADD and given back with CNI
DEL at a disconnect or the pod's stop; the network it was made on stays its own.

A joined namespace lives as long as any pod on it: the pod that made it, stopped or
removed, keeps its CNI attachment and namespace while another pod joins it (as a Docker
container's network stays while a container shares it), and the last pod to leave gives
them back. A joiner of a joiner joins the pod that made the namespace."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import structlog
from cri_api.v1 import api_pb2 as cri
from shoal_common import faults
from shoal_common.errors import FailedPrecondition, Invalid, NotFound, ShoalError
from shoal_common.locks import KeyedLocks
from shoal_common.messages.networks import NetworkAttachment

from shoal_executor.domain import netns, userns
from shoal_executor.domain.checks.userns import IdMap
from shoal_executor.domain.cni import AttachResult, Cni
from shoal_executor.domain.networks import NAME
from shoal_executor.store.networks import NetworkStore
from shoal_executor.store.records import (
    HOST_NETWORK,
    NO_NETWORK,
    NOTREADY,
    READY,
    REMOVING,
    Attachment,
    Records,
    SandboxRecord,
)

log = structlog.get_logger("shoal.executor.network")

ANNOTATION = "io.shoal.network"
JOIN = "container:"
_ID = re.compile(r"\A[A-Za-z0-9_+][A-Za-z0-9_.+-]{0,127}\Z")


@dataclass
class Choice:
    network: str  # SandboxRecord.network
    owner: SandboxRecord | None = None  # the pod whose namespace it joins


def _refuse(value: str, why: str) -> Invalid:
    return Invalid(f"PodSandboxConfig.annotations[{ANNOTATION}] {value[:80]!r}: {why}")


class PodNetworks:
    def __init__(self, cni: Cni, records: Records) -> None:
        self.cni = cni
        self.records = records
        self.store = NetworkStore(records.db)
        # Per namespace-making pod: a joiner's arrival and the last departure from its
        # namespace take turns (within this process; the database checks across replicas).
        self.locks = KeyedLocks()

    # -- choosing --------------------------------------------------------------------------

    async def choose(self, config: cri.PodSandboxConfig, idmap: IdMap | None) -> Choice:
        value = config.annotations.get(ANNOTATION, "")
        ports = any(p.host_port for p in config.port_mappings)
        if config.linux.security_context.namespace_options.network == cri.NODE:
            if value:
                raise _refuse(value, "a host-network pod (namespace_options.network NODE) "
                                     "is on no network")
            return Choice(HOST_NETWORK)
        if value.startswith(JOIN):
            return await self._joining(value, ports, idmap)
        if value == NO_NETWORK:
            if ports:
                raise _refuse(value, "a pod without a network publishes no ports")
            return Choice(NO_NETWORK)
        if not value or value == self._default_name():
            return Choice("")
        if not NAME.match(value):
            raise _refuse(value, "not a network name, 'none' or 'container:<pod id>'")
        rec = await self.store.get(value)
        if rec is None:
            raise Invalid(f"unknown network {value!r} (PodSandboxConfig.annotations"
                          f"[{ANNOTATION}]; see `shoal network ls`)")
        if ports and rec.driver != "bridge":
            raise _refuse(value, f"a {rec.driver} network publishes no ports (the host "
                                 "cannot reach its pods through their parent interface)")
        return Choice(value)

    def _default_name(self) -> str:
        try:
            return self.cni.network().name
        except ShoalError:
            return ""

    async def _joining(self, value: str, ports: bool, idmap: IdMap | None) -> Choice:
        target = value.removeprefix(JOIN)
        if not _ID.match(target):
            raise _refuse(value, "expected container:<pod sandbox id>")
        if ports:
            raise _refuse(value, "a pod joining another's network publishes no ports of its "
                                 "own (publish them on the pod it joins)")
        owner = await self.records.sandbox(target)
        if owner is None:
            raise _refuse(value, f"no pod sandbox {target}")
        if owner.state != READY:
            raise FailedPrecondition(f"pod sandbox {target} is not ready: its network "
                                     "cannot be joined")
        if not owner.netns_path:
            raise _refuse(value, f"pod sandbox {target} is on the host's network (ask for "
                                 "the host network instead)")
        if idmap is not None or userns.pod_idmap(Path(owner.dir)) is not None:
            raise _refuse(value, "pods with user namespaces neither join nor are joined "
                                 "(their network namespace belongs to their user namespace)")
        if owner.joins:  # the namespace's maker holds it, whoever was named
            root = owner
            owner = await self.records.sandbox(owner.joins) or SandboxRecord(
                id=root.joins, netns_path=root.netns_path, ips=root.ips, network=root.network)
        return Choice(owner.network, owner)

    @staticmethod
    def assign(record: SandboxRecord, choice: Choice, config: cri.PodSandboxConfig) -> None:
        """The choice into the sandbox's record (before its first write)."""
        md = config.metadata
        record.pod = f"{md.namespace}/{md.name}"
        record.network = choice.network
        if choice.owner is not None:
            record.joins = choice.owner.id
            record.netns_path, record.ips = choice.owner.netns_path, list(choice.owner.ips)
        elif choice.network != HOST_NETWORK:
            # Named now, so that the record's first write (the intent) also claims it: only
            # claimed namespaces are ever swept, so another node's `shoal-*` on a shared
            # host is never touched.
            record.netns_name = f"shoal-{record.id[:32]}"
            record.netns_path = netns.netns_path(record.netns_name)

    @contextlib.asynccontextmanager
    async def holding(self, owner_id: str) -> AsyncIterator[None]:
        """The namespace `owner_id` made, kept from leaving meanwhile ("": nothing)."""
        if not owner_id:
            yield
            return
        async with self.locks.hold(owner_id):
            yield

    # -- the namespace -----------------------------------------------------------------------

    async def attach(self, record: SandboxRecord, idmap: IdMap | None
                     ) -> asyncio.Task[AttachResult] | None:
        """The pod's named netns, then CNI ADD started: its tens of ms of plugin runs go on
        while the pause container is created and started (neither needs the other, only the
        namespace). None for a pod without a namespace of its own, or without CNI."""
        if record.network == HOST_NETWORK or record.joins:
            return None
        # Claimed (assign named it; the intent's write claimed it) before it exists.
        await userns.make_netns(Path(record.dir), record.netns_name, idmap)
        await faults.point("executor.sandbox.netns")
        if record.network == NO_NETWORK:
            return None
        return asyncio.create_task(self.cni.add(
            record.id, record.netns_path, runtime_config=record.runtime_config,
            network=record.network))

    async def _joiners(self, owner_id: str) -> list[str]:
        return [s.id for s in await self.records.sandboxes() if s.joins == owner_id]

    async def detach(self, record: SandboxRecord) -> None:
        """CNI DEL while the sandbox's netns claim says CNI may hold something (an IP
        lease, port mappings), then the claim says it does not — unless other pods still
        join its namespace. A DEL that fails stays owed: the next stop or remove, or the
        start-up sweep, runs it again."""
        async with self.holding(record.id):
            joiners = await self._joiners(record.id)
            if joiners:
                log.info("network kept for the pods that join it", sandbox=record.id,
                         joiners=joiners)
                return
            await self._detach_claims(record.id)

    async def _detach_claims(self, sandbox_id: str) -> None:
        for att in await self.records.attachments(sandbox_id):
            with contextlib.suppress(ShoalError):  # logged; kept, to be tried again
                await self.release_attachment(att)
        for claim in await self.records.netns_claims(sandbox_id):
            if not claim.attached:
                continue
            try:
                await self.cni.delete(sandbox_id, claim.path, runtime_config=claim.runtime_config,
                                      network=claim.network)
            except ShoalError as exc:
                log.warning("CNI DEL failed", sandbox=sandbox_id, error=exc.message)
                continue
            await self.records.netns_detached(claim.name)

    async def release(self, record: SandboxRecord) -> None:
        """At the sandbox's teardown, after detach: its namespace deleted, unless other pods
        still join it (then the last of them gives it back, see `left`)."""
        if not record.netns_name:
            return
        async with self.holding(record.id):
            if await self._joiners(record.id):
                return
            await netns.delete(record.netns_name)
            await self.records.release_netns(record.netns_name)

    async def left(self, record: SandboxRecord) -> None:
        """A joiner's record is gone: if it was the last pod on a namespace whose maker
        has stopped or gone, what the maker kept for it is given back now."""
        if not record.joins:
            return
        owner_id = record.joins
        async with self.holding(owner_id):
            if await self._joiners(owner_id):
                return
            owner = await self.records.sandbox(owner_id)
            if owner is not None and owner.state not in (NOTREADY, REMOVING):
                return  # still its maker's own
            await self._detach_claims(owner_id)
            if owner is not None and owner.state == NOTREADY:
                return  # stopped: its own remove deletes the namespace
            for claim in await self.records.netns_claims(owner_id):
                await netns.delete(claim.name)
                await self.records.release_netns(claim.name)
            log.info("released the network the last joiner held", sandbox=owner_id)

    # -- more networks -----------------------------------------------------------------------

    async def connect(self, sandbox_id: str, network: str) -> NetworkAttachment:
        network = "" if network == self._default_name() else network
        record = await self.records.sandbox(sandbox_id)
        if record is None:
            raise NotFound(f"pod sandbox {sandbox_id} not found")
        if record.joins:
            raise FailedPrecondition(f"pod sandbox {sandbox_id} shares the network namespace "
                                     f"of pod sandbox {record.joins}: connect that one")
        if record.network == HOST_NETWORK or not record.netns_path:
            raise FailedPrecondition(f"pod sandbox {sandbox_id} is on the host's network")
        if network == record.network:
            return NetworkAttachment(network=network, ifname="eth0", ips=record.ips)
        if network and await self.store.get(network) is None:
            raise Invalid(f"unknown network {network!r} (see `shoal network ls`)")
        async with self.holding(sandbox_id):  # not while its last joiner gives it back
            att, fresh = await self.records.begin_attachment(sandbox_id, network)
            if att.attached:
                return _attachment(att)
            if not fresh:  # a try cut short may have attached part of it: undone first
                await self.cni.delete(sandbox_id, att.netns_path, ifname=att.ifname,
                                      network=network)
            try:
                result = await self.cni.add(sandbox_id, att.netns_path, ifname=att.ifname,
                                            network=network, default_route=False)
            except ShoalError:
                # ADD undid the plugins it ran; DEL once more so the row may go.
                with contextlib.suppress(ShoalError):
                    await self.release_attachment(att)
                raise
            await faults.point("executor.sandbox.connected")  # attached, not yet recorded
            await self.records.attached(att, result.ips)
        log.info("sandbox connected to a network", sandbox=sandbox_id,
                 network=network or "(default)", ifname=att.ifname, ips=result.ips)
        att.ips, att.attached = result.ips, True
        return _attachment(att)

    async def disconnect(self, sandbox_id: str, network: str) -> None:
        """A network `connect` added given back (one it is not on: nothing to do)."""
        network = "" if network == self._default_name() else network
        record = await self.records.sandbox(sandbox_id)
        if record is None:
            raise NotFound(f"pod sandbox {sandbox_id} not found")
        if network == record.network and record.netns_path and not record.joins:
            raise FailedPrecondition(f"pod sandbox {sandbox_id} was made on network "
                                     f"{network or '(default)'!r}: it stays on it")
        async with self.holding(sandbox_id):
            for att in await self.records.attachments(sandbox_id):
                if att.network == network:
                    await self.release_attachment(att)
                    log.info("sandbox disconnected from a network", sandbox=sandbox_id,
                             network=network or "(default)", ifname=att.ifname)

    async def release_attachment(self, att: Attachment) -> None:
        """CNI DEL of a connected network, then its record; raises when DEL failed (the
        record stays: a later stop, remove or start-up sweep tries again)."""
        try:
            await self.cni.delete(att.sandbox_id, att.netns_path, ifname=att.ifname,
                                  network=att.network)
        except ShoalError as exc:
            log.warning("CNI DEL of a connected network failed", sandbox=att.sandbox_id,
                        network=att.network, ifname=att.ifname, error=exc.message)
            raise
        await self.records.drop_attachment(att)


def _attachment(att: Attachment) -> NetworkAttachment:
    return NetworkAttachment(network=att.network, ifname=att.ifname, ips=att.ips)
