"""Pod networks made with `shoal network create`: each is a record in the executor's
database (the truth) and a CNI configuration list `<conf dir>/shoal-networks/<name>.conflist`
(what CNI runs, written atomically and owner-only from the record; an operator may edit it).

A bridge network is the default network's shape on a bridge of its own (`shl-<id>`): bridge
+ host-local + portmap, with the bridge plugin's per-pod `ipMasq` off and Shoal's key
`"shoal": {"masquerade": true}` on: the executor masquerades the subnet with one rule set
per network (domain/masquerade.py), there while the executor runs or any pod is on the
network (ensured at start and at create; removed at removal and, on a clean stop, for a
network no pod is on). The default network Shoal installs is the same; a config an operator
wrote without the key is used as it is (no rules). macvlan and ipvlan put pods on a host
interface's segment (`parent`) with host-local addresses and no port mappings (the host
cannot reach its own macvlan children, so a host port could not be forwarded to them).
Leases are kept under the executor's own state dir (`dataDir`), so two executors on one host
never share them.

Removal deletes the record only while no sandbox is on the network (one transaction, see
store/networks.py), then the masquerade, the file, the bridge and the lease directory; a
start finds a file without a record (a removal killed half way) and finishes it, and
rewrites a missing file."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
from shoal_common.errors import FailedPrecondition, Internal, Invalid, NotFound, ShoalError
from shoal_common.fs import private_dir, write_private
from shoal_common.messages.networks import (
    NetworkCreateRequest,
    NetworkInfo,
    NetworkNameRequest,
    NetworkPod,
)

from shoal_executor.domain import masquerade
from shoal_executor.domain.cni import SHOAL_KEY, Cni, NetworkConfig, parse_network
from shoal_executor.store.networks import Member, NetworkRecord, NetworkStore
from shoal_executor.store.records import HOST_NETWORK, NO_NETWORK

log = structlog.get_logger("shoal.executor.networks")

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
# Names a pod's annotation gives other meanings to, or that name the default network.
RESERVED = frozenset({"default", NO_NETWORK, HOST_NETWORK})
POOL = ipaddress.ip_network("10.89.0.0/16")  # free /24s for a create without --subnet
BRIDGE_PREFIX = "shl-"  # + 11 hex digits of the network id: IFNAMSIZ allows 15
SYS_NET = Path("/sys/class/net")
MAX_PREFIX = {4: 30, 6: 126}  # room for the gateway and at least one pod
NAME = re.compile(r"\A[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")  # messages.networks.NetworkName


def parse_subnet(text: str) -> Net:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise Invalid(f"subnet {text!r}: {exc}") from None
    if (net.is_loopback or net.is_multicast or net.is_link_local or net.is_unspecified
            or net.is_reserved):
        raise Invalid(f"subnet {text!r} is not a unicast range a pod can have")
    if not 8 <= net.prefixlen <= MAX_PREFIX[net.version]:
        raise Invalid(f"subnet {text!r}: the prefix length must be 8 to "
                      f"{MAX_PREFIX[net.version]}")
    return net


def parse_gateway(text: str, subnet: Net) -> str:
    try:
        gateway = ipaddress.ip_address(text)
    except ValueError as exc:
        raise Invalid(f"gateway {text!r}: {exc}") from None
    if gateway.version != subnet.version or gateway not in subnet:
        raise Invalid(f"gateway {text} is not in subnet {subnet}")
    if gateway == subnet.network_address or (
            subnet.version == 4 and gateway == subnet.broadcast_address):
        raise Invalid(f"gateway {text} is the network or broadcast address of {subnet}")
    return str(gateway)


def subnets_of(net: NetworkConfig) -> list[Net]:
    """The host-local ranges of a CNI network config (old `subnet` form too)."""
    found: list[Net] = []
    for plugin in net.plugins:
        ipam = plugin.get("ipam")
        if not isinstance(ipam, dict):
            continue
        ranges = [r for group in ipam.get("ranges") or [] if isinstance(group, list)
                  for r in group if isinstance(r, dict)]
        if isinstance(ipam.get("subnet"), str):
            ranges.append(ipam)
        for r in ranges:
            with contextlib.suppress(ValueError, TypeError):
                found.append(ipaddress.ip_network(str(r.get("subnet")), strict=False))
    return found


def bridge_subnets(net: NetworkConfig) -> list[Net]:
    """The subnets of the config's bridge plugins (the ones a masquerade is for)."""
    return subnets_of(NetworkConfig(net.name, net.version,
                                    [p for p in net.plugins if p.get("type") == "bridge"],
                                    net.source))


def masquerade_subnets(net: NetworkConfig | None) -> list[Net]:
    """What the executor masquerades for a network: nothing unless its config asks."""
    return bridge_subnets(net) if net is not None and net.masquerade else []


def record_subnets(rec: NetworkRecord) -> list[Net]:
    """What a bridge network's record says is masqueraded (its file written from it has the
    key): for when the file is gone or no longer parses."""
    return [ipaddress.ip_network(rec.subnet)] if rec.driver == "bridge" else []


async def host_subnets() -> list[Net]:
    """The networks of the host's interface addresses (a bridge network over one of them
    would take that traffic away from the host)."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "-j", "addr", "show", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise Internal(f"ip -j addr show: {err.decode(errors='replace').strip()}")
    found: list[Net] = []
    for link in json.loads(out or b"[]"):
        for addr in link.get("addr_info", []):
            with contextlib.suppress(ValueError, TypeError, KeyError):
                net = ipaddress.ip_network(f"{addr['local']}/{addr['prefixlen']}",
                                           strict=False)
                if not (net.is_loopback or net.is_link_local):
                    found.append(net)
    return found


def conflist(rec: NetworkRecord, ipam_dir: Path) -> dict[str, Any]:
    subnet = ipaddress.ip_network(rec.subnet)
    default_route = "0.0.0.0/0" if subnet.version == 4 else "::/0"
    ipam: dict[str, Any] = {"type": "host-local", "dataDir": str(ipam_dir),
                            "ranges": [[{"subnet": rec.subnet, **(
                                {"gateway": rec.gateway} if rec.gateway else {})}]]}
    if rec.driver == "bridge":
        ipam["routes"] = [{"dst": default_route}]
        plugins: list[dict[str, Any]] = [
            {"type": "bridge", "bridge": rec.bridge, "isGateway": True, "ipMasq": False,
             "hairpinMode": True, "ipam": ipam},
            {"type": "portmap", "capabilities": {"portMappings": True}}]
    else:
        if rec.gateway:  # the segment's router: without one, pods reach only the segment
            ipam["routes"] = [{"dst": default_route, "gw": rec.gateway}]
        mode = {"macvlan": "bridge", "ipvlan": "l2"}[rec.driver]
        plugins = [{"type": rec.driver, "master": rec.parent, "mode": mode, "ipam": ipam}]
    # A bridge's NAT is the executor's (domain/masquerade.py), not the plugin's per pod.
    own = {SHOAL_KEY: {"masquerade": True}} if rec.driver == "bridge" else {}
    return {"cniVersion": "1.0.0", "name": rec.name, **own, "plugins": plugins}


def _pods(members: list[Member]) -> list[NetworkPod]:
    return [NetworkPod(id=m.id, pod=m.pod, ips=m.ips, joins=m.joins) for m in members]


class Networks:
    def __init__(self, cni: Cni, store: NetworkStore, ipam_dir: Path,
                 default_subnet: str) -> None:
        self.cni = cni
        self.store = store
        self.ipam_dir = ipam_dir
        self.default_subnet = default_subnet

    # -- the default network -------------------------------------------------------------

    def default(self) -> NetworkConfig | None:
        try:
            return self.cni.network()
        except ShoalError:
            return None

    def default_name(self) -> str:
        net = self.default()
        return net.name if net is not None else ""

    def _default_subnets(self) -> list[Net]:
        net = self.default()
        found = subnets_of(net) if net is not None else []
        return found or [ipaddress.ip_network(self.default_subnet, strict=False)]

    async def _default_info(self, net: NetworkConfig) -> NetworkInfo:
        first = net.plugins[0]
        ranges = [r for p in net.plugins for g in (p.get("ipam") or {}).get("ranges") or []
                  if isinstance(g, list) for r in g if isinstance(r, dict)]
        subnets = subnets_of(net)
        return NetworkInfo(
            name=net.name, driver=str(first.get("type", "")), default=True, file=net.source,
            subnet=str(subnets[0]) if subnets else "",
            gateway=str(ranges[0].get("gateway", "")) if ranges else "",
            bridge=str(first.get("bridge", "")) if first.get("type") == "bridge" else "",
            parent=str(first.get("master", "")), pods=_pods(await self.store.members("")))

    # -- create ----------------------------------------------------------------------------

    def _check_name(self, name: str) -> None:
        if name in RESERVED or name == self.default_name():
            raise Invalid(f"network name {name!r} is reserved (the default network, "
                          f"{NO_NETWORK!r} and {HOST_NETWORK!r} are pods' own choices)")

    @staticmethod
    def _check_parent(driver: str, parent: str) -> None:
        if driver == "bridge":
            if parent:
                raise Invalid("--parent is for macvlan and ipvlan networks (a bridge network "
                              "has a bridge of its own)")
            return
        if not parent:
            raise Invalid(f"a {driver} network needs --parent, the host interface its pods "
                          "share")
        if parent in (".", "..") or not (SYS_NET / parent).exists():
            raise Invalid(f"parent interface {parent!r} does not exist on this host")

    @staticmethod
    def _subnet(req: NetworkCreateRequest, taken: list[Net]) -> Net:
        if req.subnet:
            return parse_subnet(req.subnet)
        for candidate in POOL.subnets(new_prefix=24):
            if not any(candidate.overlaps(t) for t in taken if t.version == 4):
                return candidate
        raise FailedPrecondition(f"no free /24 left in {POOL}: give --subnet")

    async def create(self, req: NetworkCreateRequest) -> NetworkInfo:
        self._check_name(req.name)
        self._check_parent(req.driver, req.parent)
        defaults = self._default_subnets()
        # A bridge routes its subnet on the host: it must not take one the host has.
        host = await host_subnets() if req.driver == "bridge" else []
        others = [ipaddress.ip_network(r.subnet) for r in await self.store.all()]
        subnet = self._subnet(req, [*defaults, *host, *others])
        gateway = parse_gateway(req.gateway, subnet) if req.gateway else (
            str(next(subnet.hosts())) if req.driver == "bridge" else "")
        for what, nets in (("the default pod network", defaults), ("a host address", host)):
            clash = next((n for n in nets if n.overlaps(subnet)), None)
            if clash is not None:
                raise Invalid(f"subnet {subnet} overlaps {clash}, {what}")
        net_id = self._new_id(req.driver)
        rec = NetworkRecord(name=req.name, id=net_id, request_id=req.id, driver=req.driver,
                            subnet=str(subnet), gateway=gateway, parent=req.parent,
                            bridge=BRIDGE_PREFIX + net_id[:11] if req.driver == "bridge" else "",
                            created_at=time.time())

        def check(rows: list[NetworkRecord]) -> None:
            for row in rows:
                if ipaddress.ip_network(row.subnet).overlaps(subnet):
                    raise Invalid(f"subnet {subnet} overlaps {row.subnet}, network "
                                  f"{row.name!r}")

        rec = await self.store.create(rec, check)
        self._write(rec)  # after the record: a start rewrites a file a kill left unwritten
        # After the file, from it (a retry by the same id comes here again).
        for bridged in masquerade_subnets(self._file(rec.name)):
            await masquerade.ensure(bridged)
        log.info("network created", network=rec.name, driver=rec.driver, subnet=rec.subnet)
        return await self._info(rec)

    @staticmethod
    def _new_id(driver: str) -> str:
        for _ in range(8):
            net_id = secrets.token_hex(32)
            if driver != "bridge" or not (SYS_NET / (BRIDGE_PREFIX + net_id[:11])).exists():
                return net_id
        raise Internal("no unused bridge name found")  # 8 collisions of 44 random bits

    def _file(self, name: str) -> NetworkConfig | None:
        try:
            return parse_network(self.cni.network_file(name))
        except ValueError:
            return None

    def _write(self, rec: NetworkRecord) -> None:
        private_dir(self.cni.networks_dir)
        write_private(self.cni.network_file(rec.name),
                      json.dumps(conflist(rec, self.ipam_dir), indent=2) + "\n")

    # -- read --------------------------------------------------------------------------------

    async def _info(self, rec: NetworkRecord) -> NetworkInfo:
        return NetworkInfo(name=rec.name, id=rec.id, driver=rec.driver, subnet=rec.subnet,
                           gateway=rec.gateway, parent=rec.parent, bridge=rec.bridge,
                           file=str(self.cni.network_file(rec.name)),
                           created_at=rec.created_at,
                           pods=_pods(await self.store.members(rec.name)))

    async def get(self, req: NetworkNameRequest) -> NetworkInfo:
        net = self.default()
        if net is not None and req.name == net.name:
            return await self._default_info(net)
        rec = await self.store.get(req.name)
        if rec is None:
            raise NotFound(f"no network {req.name!r} (see `shoal network ls`)")
        return await self._info(rec)

    async def list(self) -> list[NetworkInfo]:
        net = self.default()
        out = [await self._default_info(net)] if net is not None else []
        return out + [await self._info(rec) for rec in await self.store.all()]

    # -- remove ------------------------------------------------------------------------------

    async def remove(self, req: NetworkNameRequest) -> None:
        if req.name == self.default_name():
            raise FailedPrecondition(f"{req.name!r} is the default network: it is the CNI "
                                     f"configuration in {self.cni.conf_dir}, not removable here")
        rec = await self.store.remove(req.name)  # refused while any pod is on it
        await self._clean_up(self.cni.network_file(req.name), rec)
        log.info("network removed", network=req.name)

    async def _clean_up(self, path: Path, rec: NetworkRecord | None = None) -> None:
        """What a removed network left: its masquerade, its bridge, its leases, then its
        file (last, so a removal killed before the end is finished at the next start)."""
        try:
            net = parse_network(path)
        except ValueError:
            net = None
        # Whatever the file says now (an operator may have turned the key off since), and
        # the record's subnet too in case the file no longer parses: removing is a no-op
        # where there is nothing, and no other network can have an overlapping subnet.
        subnets = bridge_subnets(net) if net is not None else []
        for subnet in dict.fromkeys([*subnets, *(record_subnets(rec) if rec else [])]):
            await masquerade.remove(subnet)
        if net is not None:
            for plugin in net.plugins:
                bridge = plugin.get("bridge")
                if (plugin.get("type") == "bridge" and isinstance(bridge, str)
                        and bridge.startswith(BRIDGE_PREFIX) and "/" not in bridge):
                    await _delete_link(bridge)
            # Only this network's own directory under the executor's lease dir (a name
            # `shoal network create` could have given: never "..", never a path).
            if net.name == path.stem and NAME.match(net.name):
                await asyncio.to_thread(shutil.rmtree, self.ipam_dir / net.name, True)
        path.unlink(missing_ok=True)

    # -- start-up ----------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Rewrite a network's missing file; finish the removal of a file's network that has
        no record any more; ensure the masquerade of every network whose config asks."""
        records = {rec.name: rec for rec in await self.store.all()}
        for rec in records.values():
            if not self.cni.network_file(rec.name).exists():
                log.info("rewriting a network's missing CNI config", network=rec.name)
                self._write(rec)
        await self._sweep_files(records)
        # The files, as they are now (every record's was just rewritten if missing).
        for name, subnets in self._masqueraded(list(records.values()), from_records=False):
            for subnet in subnets:
                try:
                    await masquerade.ensure(subnet)
                except ShoalError as exc:
                    # Logged, not raised: a node that cannot start serves no pod at all,
                    # one without the NAT still serves pods their node and each other.
                    log.error("could not set up a network's masquerade",
                              network=name or self.default_name(), subnet=str(subnet),
                              error=exc.message)

    # Sequence, not list: in this class's annotations `list` is the method above.
    def _masqueraded(self, recs: Sequence[NetworkRecord], *, from_records: bool
                     ) -> Sequence[tuple[str, Sequence[Net]]]:
        """(name, subnets) of the default network ("") and the `recs` networks whose config
        asks for the executor's masquerade; `from_records`: a network whose file is gone or
        broken by what its record says."""
        found = [("", masquerade_subnets(self.default()))]
        for rec in recs:
            net = self._file(rec.name)
            found.append((rec.name, record_subnets(rec) if net is None and from_records
                          else masquerade_subnets(net)))
        return [(name, subnets) for name, subnets in found if subnets]

    async def close(self) -> None:
        """On a clean stop: the masquerade of each network no pod is on goes (the next start
        puts it back); a network with pods keeps it, so they still reach out meanwhile.
        Failures (iptables', the database's) are logged: the stop goes on."""
        try:
            networks = self._masqueraded(await self.store.all(), from_records=True)
        except Exception as exc:
            log.warning("could not list the networks to drop their masquerade",
                        error=str(exc))
            return
        for name, subnets in networks:
            try:
                if await self.store.members(name):
                    continue
                for subnet in subnets:
                    await masquerade.remove(subnet)
            except Exception as exc:
                log.warning("could not drop a network's masquerade",
                            network=name or self.default_name(), error=str(exc))

    async def _sweep_files(self, records: dict[str, NetworkRecord]) -> None:
        if not self.cni.networks_dir.is_dir():
            return
        for path in sorted(self.cni.networks_dir.iterdir()):
            # Asked again: another replica may have made it since the listing above.
            if (path.suffix == ".conflist" and path.stem not in records
                    and await self.store.get(path.stem) is None):
                log.info("finishing a network's removal", file=str(path))
                await self._clean_up(path)
            elif path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write killed before its rename


async def _delete_link(name: str) -> None:
    if not os.path.exists(SYS_NET / name):
        return
    proc = await asyncio.create_subprocess_exec(
        "ip", "link", "delete", name, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0 and os.path.exists(SYS_NET / name):
        raise Internal(f"ip link delete {name}: {out.decode(errors='replace').strip()}")
