"""Docker's networks over the executor's named CNI networks (`shoal network`).

A Docker user network is a row in the gateway's records (Docker's name, id, labels,
options, IPAM as asked) and one Shoal network of the executor, named `dk-<name as a DNS
label>-<8 hex of the id>`: Docker's names are freer than Shoal's (compose makes
`<project>_default`). Docker's predefined networks are `bridge` (Shoal's default network,
the CRI's), `host` and `none`: listed, never made or removed.

A container is made on one network (`NetworkMode`, with
`NetworkingConfig.EndpointsConfig[net].Aliases`); `docker network connect` adds more, in
any state, through the executor's `sandbox.connect` (interfaces eth1, eth2... of its pod,
recorded in the container's `Shoal.Connected` before the executor acts), and `disconnect`
takes them away. A container on `none` is moved instead (its pod made again on the
network: it must not be running), and so is one disconnected from the network it was made
on (once it is on no other). Names are resolved on user bridge networks by domain/dns.py,
across every network the asking container is on."""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import grpc
from cri_api.v1 import api_pb2 as cri
from shoal_common.errors import NotFound as ShoalNotFound
from shoal_common.messages.networks import (
    NetworkCreateRequest,
    NetworkInfo,
    NetworkListRequest,
    NetworkNameRequest,
    SandboxNetworkRequest,
)

from shoal_docker_gateway.domain import dns, events, images
from shoal_docker_gateway.domain.backend import Backend
from shoal_docker_gateway.domain.containers_body import flag, obj, objects, str_map, text
from shoal_docker_gateway.domain.events_filters import (
    Filters,
    bool_filter,
    labels_match,
    negated_labels_match,
)
from shoal_docker_gateway.domain.images import ZERO_TIME, rfc3339
from shoal_docker_gateway.domain.lookup import resolve
from shoal_docker_gateway.errors import (
    BadParameter,
    Conflict,
    DockerError,
    NotFound,
    Unsupported,
)
from shoal_docker_gateway.store.containers import ContainerRecord, Containers
from shoal_docker_gateway.store.networks import NetworkRecord, Networks

NAME_RE = re.compile(r"\A[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}\Z")
ALIAS_RE = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}\Z")
PREDEFINED = {"bridge": "bridge", "host": "host", "none": "null"}  # name → Docker's driver
DRIVERS = ("bridge", "macvlan", "ipvlan")
# Driver options Shoal honours: the parent interface, and the one mode the executor makes.
DRIVER_OPTIONS = {"macvlan": {"parent": None, "macvlan_mode": "bridge"},
                  "ipvlan": {"parent": None, "ipvlan_mode": "l2", "ipvlan_flag": "bridge"}}
LIST_FILTERS = ("name", "id", "label", "driver", "type", "dangling", "scope")
PRUNE_FILTERS = ("until", "label", "label!")
SHOAL_PREFIX = "dk-"
MAX_ALIASES = 64
DURATION_RE = re.compile(r"\A(?:[0-9]+(?:\.[0-9]+)?(?:h|m|s|ms))+\Z")
DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(h|ms|m|s)")
SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


class Forbidden(DockerError):
    status = 403


@dataclass(frozen=True)
class Net:
    """A Docker network as the API shows it: a predefined one (`rec` None) or a user's."""

    id: str
    name: str
    driver: str
    rec: NetworkRecord | None = None

    @classmethod
    def of(cls, rec: NetworkRecord) -> Net:
        return cls(rec.id, rec.name, rec.driver, rec)


@dataclass(frozen=True)
class Attachment:
    """What a container's pod needs to be on a Docker network."""

    shoal_name: str  # the pod's io.shoal.network annotation
    net_id: str
    name: str
    dns: str  # the nameserver of its resolv.conf ("" = the host's resolv.conf)


def predefined_id(name: str) -> str:
    """A predefined network's id: Docker's are random per daemon; ours are stable."""
    return hashlib.sha256(f"shoal docker network {name}".encode()).hexdigest()


PREDEFINED_NETS = {name: Net(predefined_id(name), name, driver)
                   for name, driver in PREDEFINED.items()}
_BY_PREDEFINED_ID = {n.id: n for n in PREDEFINED_NETS.values()}


def endpoint_id(cid: str, net_id: str) -> str:
    return hashlib.sha256(f"{cid}/{net_id}".encode()).hexdigest()


def shoal_name(name: str, net_id: str) -> str:
    """A Shoal network name (a DNS label) for Docker network `name`: unique by the id."""
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40].strip("-") or "net"
    return f"{SHOAL_PREFIX}{base}-{net_id[:8]}"


def _no_such(ref: str) -> NotFound:
    return NotFound(f"network {ref} not found")


# -- finding -------------------------------------------------------------------------------


async def find(backend: Backend, ref: str) -> Net:
    """The one network `ref` names: a full id, a name, or an id prefix (Docker's order)."""
    if not isinstance(ref, str) or not ref or len(ref) > 256:
        raise _no_such(str(ref)[:256])
    if ref in _BY_PREDEFINED_ID:
        return _BY_PREDEFINED_ID[ref]
    found = await Networks(backend.records).find(ref)
    if len(found) == 1 and ref in (found[0].id, found[0].name):
        return Net.of(found[0])
    if ref in PREDEFINED_NETS:
        return PREDEFINED_NETS[ref]
    matches = [Net.of(r) for r in found]
    if re.fullmatch(r"[0-9a-f]+", ref):
        matches += [n for n in PREDEFINED_NETS.values() if n.id.startswith(ref)]
    if not matches:
        raise _no_such(ref)
    if len(matches) > 1:
        raise BadParameter(f"network {ref} is ambiguous ({len(matches)} matches found based "
                           "on ID prefix)")
    return matches[0]


def net_key(rec: ContainerRecord) -> str:
    """The id of the Docker network container `rec` is on ("" if none: it shares another
    container's network, or is on a Shoal network that is not Docker's)."""
    merged = rec.config.get("Shoal", {})
    joined = merged.get("Network") if isinstance(merged, dict) else None
    if isinstance(joined, dict) and isinstance(joined.get("Id"), str):
        return str(joined["Id"])
    mode = merged.get("NetworkMode", "default") if isinstance(merged, dict) else "default"
    if mode in ("", "default", "bridge"):
        return PREDEFINED_NETS["bridge"].id
    if mode in ("host", "none"):
        return PREDEFINED_NETS[mode].id
    return ""


def connected(rec: ContainerRecord) -> dict[str, list[str]]:
    """The networks `network connect` added to container `rec`: Docker id → its aliases."""
    merged = rec.config.get("Shoal", {})
    found = merged.get("Connected") if isinstance(merged, dict) else None
    if not isinstance(found, dict):
        return {}
    return {str(k): [a for a in v if isinstance(a, str)] if isinstance(v, list) else []
            for k, v in found.items()}


def net_keys(rec: ContainerRecord) -> list[str]:
    """Every Docker network container `rec` is on: the one it was made on first."""
    return [k for k in (net_key(rec), *connected(rec)) if k]


async def _net_of(backend: Backend, rec: ContainerRecord) -> Net | None:
    return await _net_by_key(backend, net_key(rec))


async def _net_by_key(backend: Backend, key: str) -> Net | None:
    if key in _BY_PREDEFINED_ID:
        return _BY_PREDEFINED_ID[key]
    found = await Networks(backend.records).by_id(key) if key else None
    return Net.of(found) if found is not None else None


async def _info(backend: Backend, net: Net) -> NetworkInfo | None:
    """What the executor says of the network (None: host, none, or not made yet)."""
    if net.rec is not None:
        try:
            return await backend.clients.tasks.network_get(
                NetworkNameRequest(name=net.rec.shoal_name))
        except ShoalNotFound:
            return None
    if net.name == "bridge":
        listed = await backend.clients.tasks.network_list(NetworkListRequest())
        return next((i for i in listed.networks if i.default), None)
    return None


def _create_request(rec: NetworkRecord) -> NetworkCreateRequest:
    return NetworkCreateRequest(id=rec.id, name=rec.shoal_name, driver=rec.driver,  # type: ignore[arg-type]
                                subnet=str(rec.ipam.get("Subnet", "")),
                                gateway=str(rec.ipam.get("Gateway", "")),
                                parent=rec.options.get("parent", ""))


async def ensure_shoal(backend: Backend, rec: NetworkRecord) -> NetworkInfo:
    """The Shoal network of `rec`, made again if a killed create left only the row (the
    executor's create is idempotent by the row's id)."""
    try:
        return await backend.clients.tasks.network_get(NetworkNameRequest(name=rec.shoal_name))
    except ShoalNotFound:
        return await backend.clients.tasks.network_create(_create_request(rec))


# -- create --------------------------------------------------------------------------------


def _check_unsupported(body: dict[str, Any]) -> None:
    for key, what in (("Internal", "internal networks"), ("EnableIPv6", "EnableIPv6"),
                      ("Ingress", "ingress networks"), ("ConfigOnly", "config-only networks")):
        if flag(body, key):
            raise Unsupported(f"{what} are not supported by Shoal" if key != "EnableIPv6"
                              else "EnableIPv6 is not supported by Shoal")
    if text(obj(body, "ConfigFrom"), "Network", "ConfigFrom."):
        raise Unsupported("ConfigFrom is not supported by Shoal")
    if text(body, "Scope") not in ("", "local"):
        raise Unsupported(f"network scope {text(body, 'Scope')!r} is not supported by Shoal: "
                          "only \"local\"")


def _options(driver: str, options: dict[str, str]) -> None:
    allowed = DRIVER_OPTIONS.get(driver, {})
    for key, value in options.items():
        if key not in allowed:
            raise Unsupported(f"network option {key!r} is not supported by Shoal's {driver} "
                              "driver")
        wanted = allowed[key]
        if wanted is not None and value != wanted:
            raise Unsupported(f"network option {key}={value!r}: Shoal's {driver} networks "
                              f"are {key}={wanted}")


def _ipam(body: dict[str, Any]) -> dict[str, str]:
    """IPAM as the executor takes it: one pool, its Subnet and Gateway."""
    ipam = obj(body, "IPAM")
    if text(ipam, "Driver", "IPAM.") not in ("", "default"):
        raise Unsupported(f"IPAM driver {text(ipam, 'Driver', 'IPAM.')!r} is not supported "
                          "by Shoal: only \"default\"")
    if str_map(ipam, "Options", "IPAM."):
        raise Unsupported("IPAM options are not supported by Shoal")
    pools = objects(ipam, "Config", "IPAM.")
    if len(pools) > 1:
        raise Unsupported("a Shoal network has one IPAM pool (one subnet)")
    if not pools:
        return {}
    pool = pools[0]
    if text(pool, "IPRange", "IPAM.Config.") or str_map(pool, "AuxiliaryAddresses",
                                                        "IPAM.Config."):
        raise Unsupported("IPAM IPRange and AuxiliaryAddresses are not supported by Shoal")
    subnet, gateway = text(pool, "Subnet", "IPAM.Config."), text(pool, "Gateway",
                                                                 "IPAM.Config.")
    out: dict[str, str] = {}
    if subnet:
        try:
            out["Subnet"] = str(ipaddress.ip_network(subnet, strict=True))
        except ValueError as exc:
            raise BadParameter(f"invalid subnet {subnet[:64]!r}: {exc}") from None
    if gateway:
        if not subnet:
            raise BadParameter("a gateway needs its subnet (IPAM.Config.Subnet)")
        try:
            out["Gateway"] = str(ipaddress.ip_address(gateway))
        except ValueError:
            raise BadParameter(f"invalid gateway {gateway[:64]!r}") from None
    return out


async def create(backend: Backend, body: dict[str, Any]) -> NetworkRecord:
    name = text(body, "Name")
    if not NAME_RE.match(name):
        raise BadParameter(f"invalid network name {name[:200]!r}: only "
                           "[a-zA-Z0-9][a-zA-Z0-9_.-] are allowed, at most 128 characters")
    if name in PREDEFINED:
        raise Forbidden(f"operation is not permitted on predefined {name} network ")
    driver = text(body, "Driver") or "bridge"
    if driver not in DRIVERS:
        raise Unsupported(f"network driver {driver!r} is not supported by Shoal: bridge, "
                          "macvlan or ipvlan")
    _check_unsupported(body)
    options = str_map(body, "Options")
    _options(driver, options)
    net_id = secrets.token_hex(32)
    rec = NetworkRecord(id=net_id, name=name, shoal_name=shoal_name(name, net_id),
                        driver=driver, attachable=flag(body, "Attachable"),
                        labels=str_map(body, "Labels"), options=options, ipam=_ipam(body))
    store = Networks(backend.records)
    try:
        await store.insert(rec)  # the row first: a killed create is made at the next use
    except sqlite3.IntegrityError:
        raise Conflict(f"network with name {name} already exists") from None
    try:
        info = await backend.clients.tasks.network_create(_create_request(rec))
    except BaseException:
        await store.delete(rec.id)
        raise
    if driver == "bridge":
        await dns_of(backend).serve(dns.Target(rec.id, info.gateway, info.subnet, info.bridge))
    await events.emit(backend, "network", "create", rec.id, {"name": name, "type": driver})
    return rec


# -- a container's network (containers_spec) -------------------------------------------------


def _aliases(ep: dict[str, Any], where: str) -> list[str]:
    value = ep.get("Aliases")
    if value is None:
        return []
    if (not isinstance(value, list) or len(value) > MAX_ALIASES
            or not all(isinstance(a, str) and ALIAS_RE.match(a) for a in value)):
        raise BadParameter(f"invalid {where}Aliases: up to {MAX_ALIASES} names of "
                           "[A-Za-z0-9_.-]")
    return list(value)


def check_endpoint(ep: dict[str, Any], where: str) -> list[str]:
    """An EndpointSettings a client sent: its aliases (what Shoal cannot honour: 501)."""
    ipam = obj(ep, "IPAMConfig", where)
    for key in ("IPv4Address", "IPv6Address"):
        if text(ipam, key, f"{where}IPAMConfig."):
            raise Unsupported(f"{where}IPAMConfig.{key}: static addresses are not supported "
                              "by Shoal")
    if ipam.get("LinkLocalIPs") or ep.get("Links") or text(ep, "MacAddress", where) \
            or ep.get("DriverOpts"):
        raise Unsupported(f"{where}: Links, LinkLocalIPs, MacAddress and DriverOpts are not "
                          "supported by Shoal")
    return _aliases(ep, where)


def endpoints(body: dict[str, Any]) -> dict[str, Any]:
    nc = obj(body, "NetworkingConfig")
    return obj(nc, "EndpointsConfig", "NetworkingConfig.")


async def attach(backend: Backend, body: dict[str, Any], mode: str) -> Attachment | None:
    """The Docker network NetworkMode `mode` names (None: it names none; it may be a Shoal
    network's own name, which the executor checks), its endpoint config checked."""
    try:
        net = await find(backend, mode)
    except NotFound:
        return None
    if net.rec is None:
        raise BadParameter(f"network mode {mode[:80]!r}: name the {net.name} network by its "
                           "name")
    eps = endpoints(body)
    if len(eps) > 1:
        raise BadParameter("Container cannot be connected to network endpoints: "
                           + ", ".join(str(k)[:80] for k in eps))
    for key, ep in eps.items():
        if key not in (mode, net.name, net.id):
            raise BadParameter(f"NetworkingConfig.EndpointsConfig names network {key[:80]!r},"
                               f" not the container's network {net.name}")
        if ep is not None and not isinstance(ep, dict):
            raise BadParameter("invalid NetworkingConfig.EndpointsConfig: expected objects")
        check_endpoint(ep or {}, "NetworkingConfig.EndpointsConfig.")
    info = await ensure_shoal(backend, net.rec)
    server = info.gateway if net.driver == "bridge" else ""
    if server:  # listening before the pod's first query
        await dns_of(backend).serve(dns.Target(net.id, info.gateway, info.subnet,
                                               info.bridge))
    return Attachment(net.rec.shoal_name, net.id, net.name, server)


def aliases_of(rec: ContainerRecord, net: Net) -> list[str]:
    """The aliases container `rec` was given on `net` (its EndpointsConfig entry, or its
    connect's EndpointConfig)."""
    extra = connected(rec)
    if net.id in extra:
        return extra[net.id]
    eps = rec.config.get("NetworkingConfig")
    eps = eps.get("EndpointsConfig") if isinstance(eps, dict) else None
    if not isinstance(eps, dict):
        return []
    mode = rec.config.get("Shoal", {}).get("NetworkMode")
    for key in (net.name, net.id, mode):
        ep = eps.get(key) if isinstance(key, str) else None
        if isinstance(ep, dict) and isinstance(ep.get("Aliases"), list):
            return [a for a in ep["Aliases"] if isinstance(a, str)]
    return []


# -- documents -------------------------------------------------------------------------------


def _prefix(info: NetworkInfo | None) -> int:
    try:
        return ipaddress.ip_network(info.subnet).prefixlen if info and info.subnet else 0
    except ValueError:
        return 0


def _addresses(info: NetworkInfo | None, pod_id: str) -> tuple[str, str]:
    """The (IPv4, IPv6) address of pod `pod_id` on the network ("" when it has none)."""
    pod = next((p for p in info.pods if p.id == pod_id), None) if info and pod_id else None
    v4 = next((ip for ip in pod.ips if ":" not in ip), "") if pod else ""
    v6 = next((ip for ip in pod.ips if ":" in ip), "") if pod else ""
    return v4, v6


def _members(net: Net, info: NetworkInfo | None, recs: list[ContainerRecord]
             ) -> dict[str, dict[str, str]]:
    """Docker's `Containers` of a network: the containers on it, by id."""
    out = {}
    plen = _prefix(info)
    for rec in recs:
        if net.id not in net_keys(rec) or rec.state in ("creating", "removing"):
            continue
        v4, v6 = _addresses(info, rec.pod_id)
        if net.name not in ("host", "none") and not (v4 or v6):
            continue  # its pod is not on the network (yet)
        out[rec.id] = {"Name": rec.name, "EndpointID": endpoint_id(rec.id, net.id),
                       "MacAddress": "", "IPv4Address": f"{v4}/{plen}" if v4 else "",
                       "IPv6Address": f"{v6}/{plen}" if v6 else ""}
    return out


def doc(net: Net, info: NetworkInfo | None,
        containers: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """The network as Docker's API shows it."""
    rec = net.rec
    pools = [{"Subnet": info.subnet, **({"Gateway": info.gateway} if info.gateway else {})}
             ] if info is not None and info.subnet else []
    return {
        "Name": net.name, "Id": net.id, "Created": rfc3339(rec.created) if rec else ZERO_TIME,
        "Scope": "local", "Driver": net.driver, "EnableIPv6": False,
        "IPAM": {"Driver": "default", "Options": None if rec is None else {}, "Config": pools},
        "Internal": False, "Attachable": rec.attachable if rec else False, "Ingress": False,
        "ConfigFrom": {"Network": ""}, "ConfigOnly": False, "Containers": containers or {},
        "Options": dict(rec.options) if rec else {}, "Labels": dict(rec.labels) if rec else {},
    }


async def inspect(backend: Backend, ref: str) -> dict[str, Any]:
    dns_of(backend)
    net = await find(backend, ref)
    info = await _info(backend, net)
    recs = await Containers(backend.records).all()
    return doc(net, info, _members(net, info, recs))


def _endpoint(rec: ContainerRecord, net: Net, info: NetworkInfo | None) -> dict[str, Any]:
    v4, v6 = _addresses(info, rec.pod_id)
    aliases = None
    if net.rec is not None:  # on a user network: its aliases and the short id (compose
        aliases = list(dict.fromkeys([*aliases_of(rec, net), rec.id[:12]]))  # looks for it)
    on_it = bool(v4 or v6) or net.name in ("host", "none")
    return {"IPAMConfig": None, "Links": None, "Aliases": aliases, "NetworkID": net.id,
            "EndpointID": endpoint_id(rec.id, net.id) if on_it else "",
            "Gateway": info.gateway if info is not None and v4 else "",
            "IPAddress": v4, "IPPrefixLen": _prefix(info) if v4 else 0, "IPv6Gateway": "",
            "GlobalIPv6Address": v6, "GlobalIPv6PrefixLen": _prefix(info) if v6 else 0,
            "MacAddress": "", "DriverOpts": None}


async def settings(backend: Backend, rec: ContainerRecord) -> dict[str, Any]:
    """A container inspect's NetworkSettings."""
    dns_of(backend)
    merged = rec.config.get("Shoal", {})
    out: dict[str, Any] = {
        "Bridge": "", "SandboxID": rec.pod_id, "HairpinMode": False,
        "LinkLocalIPv6Address": "", "LinkLocalIPv6PrefixLen": 0,
        "Ports": merged.get("Ports", {}), "SandboxKey": "", "SecondaryIPAddresses": None,
        "SecondaryIPv6Addresses": None, "EndpointID": "", "Gateway": "",
        "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0, "IPAddress": "", "IPPrefixLen": 0,
        "IPv6Gateway": "", "MacAddress": "", "Networks": {}}
    for i, key in enumerate(net_keys(rec)):
        net = await _net_by_key(backend, key)
        if net is None:
            continue
        ep = out["Networks"][net.name] = _endpoint(rec, net, await _info(backend, net))
        if i == 0 and net.name == "bridge":  # the default network's address, also at the top
            for field in ("EndpointID", "Gateway", "IPAddress", "IPPrefixLen",
                          "GlobalIPv6Address", "GlobalIPv6PrefixLen"):
                out[field] = ep[field]
    return out


# -- list, remove, prune -----------------------------------------------------------------


async def _all_nets(backend: Backend) -> list[tuple[Net, NetworkInfo | None]]:
    listed = (await backend.clients.tasks.network_list(NetworkListRequest())).networks
    by_name = {i.name: i for i in listed if not i.default}
    default = next((i for i in listed if i.default), None)
    out: list[tuple[Net, NetworkInfo | None]] = [
        (n, default if n.name == "bridge" else None) for n in PREDEFINED_NETS.values()]
    out += [(Net.of(r), by_name.get(r.shoal_name)) for r in
            await Networks(backend.records).all()]
    return out


def _matches(net: Net, filters: Filters, used: set[str]) -> bool:
    if "name" in filters and not any(w in net.name for w in filters["name"]):
        return False
    if "id" in filters and not any(w in net.id for w in filters["id"]):
        return False
    if "driver" in filters and net.driver not in filters["driver"]:
        return False
    if "scope" in filters and "local" not in filters["scope"]:
        return False
    if not labels_match(net.rec.labels if net.rec else {}, filters.get("label", [])):
        return False
    if not negated_labels_match(net.rec.labels if net.rec else {}, filters.get("label!", [])):
        return False
    for kind in filters.get("type", []):
        if kind not in ("custom", "builtin"):
            raise BadParameter(f"invalid filter: 'type'='{kind}'")
    if filters.get("type") and ("builtin" if net.rec is None else "custom") not in \
            filters["type"]:
        return False
    dangling = bool_filter(filters, "dangling")
    return dangling is None or dangling == (net.rec is not None and net.id not in used)


async def listing(backend: Backend, filters: Filters) -> list[dict[str, Any]]:
    dns_of(backend)
    used = {k for r in await Containers(backend.records).all() for k in net_keys(r)}
    return [doc(net, info) for net, info in await _all_nets(backend)
            if _matches(net, filters, used)]


async def remove(backend: Backend, ref: str) -> None:
    net = await find(backend, ref)
    if net.rec is None:
        raise Forbidden(f"{net.name} is a pre-defined network and cannot be removed")
    users = [r for r in await Containers(backend.records).all() if net.id in net_keys(r)]
    if users:
        raise Forbidden(f"error while removing network: network {net.name} id {net.id} has "
                        "active endpoints")
    try:
        await backend.clients.tasks.network_remove(NetworkNameRequest(name=net.rec.shoal_name))
    except ShoalNotFound:
        pass  # a create killed before the executor made it, or a remove killed after
    await dns_of(backend).forget(net.id)
    await Networks(backend.records).delete(net.id)
    await events.emit(backend, "network", "destroy", net.id,
                      {"name": net.name, "type": net.driver})


def parse_until(value: str) -> float:
    """Docker's `until`: a Unix time, an RFC 3339 time, or a Go duration before now."""
    try:
        return float(value)
    except ValueError:
        pass
    if DURATION_RE.match(value):
        return time.time() - sum(float(n) * SECONDS[u] for n, u in DURATION_PART.findall(value))
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise BadParameter(f"invalid filter 'until={value[:64]}'") from None


async def prune(backend: Backend, filters: Filters) -> list[str]:
    """Every user network no container is on (and that `filters` match): their names."""
    untils = [parse_until(v) for v in filters.get("until", [])]
    used = {k for r in await Containers(backend.records).all() for k in net_keys(r)}
    deleted = []
    for rec in await Networks(backend.records).all():
        if rec.id in used or any(rec.created >= u for u in untils) or \
                not labels_match(rec.labels, filters.get("label", [])) or \
                not negated_labels_match(rec.labels, filters.get("label!", [])):
            continue
        try:
            await remove(backend, rec.id)
        except (DockerError, ShoalNotFound):
            continue  # a container joined it meanwhile
        deleted.append(rec.name)
    return deleted


# -- connect, disconnect -----------------------------------------------------------------------


async def _movable(backend: Backend, rec: ContainerRecord, verb: str, net: Net) -> None:
    from shoal_docker_gateway.domain.containers import observe  # it imports this module

    _shared(rec, net)
    if (await observe(backend, rec)).status == "running":
        raise Unsupported(f"cannot {verb} running container {rec.name}: its pod would be made "
                          f"again on the new network; stop it first")


def _shared(rec: ContainerRecord, net: Net) -> None:
    mode = rec.config.get("Shoal", {}).get("NetworkMode", "")
    if net.name == "host" or mode == "host" or str(mode).startswith("container:"):
        raise Forbidden("container sharing network namespace with another container or host "
                        "cannot be connected to any other network")


async def connect(backend: Backend, ref: str, body: dict[str, Any]) -> None:
    net = await find(backend, ref)
    rec = await resolve(backend, text(body, "Container") or "")
    aliases = check_endpoint(obj(body, "EndpointConfig"), "EndpointConfig.")
    if net.id in net_keys(rec):
        raise Forbidden(f"endpoint with name {rec.name} already exists in network {net.name}")
    if aliases and net.rec is None:
        raise BadParameter("network-scoped alias is supported only for containers in user "
                           "defined networks")
    if net.name == "none" or net_key(rec) == PREDEFINED_NETS["none"].id:
        await _movable(backend, rec, "connect", net)  # nothing to add to: made again
        await _move(backend, rec, net, aliases)
    else:
        _shared(rec, net)
        await _add(backend, rec, net, aliases)
    await events.emit(backend, "network", "connect", net.id,
                      {"container": rec.id, "name": net.name, "type": net.driver})


def _with_connected(rec: ContainerRecord, nets: dict[str, list[str]]) -> dict[str, Any]:
    return {**rec.config, "Shoal": {**rec.config.get("Shoal", {}), "Connected": nets}}


async def _add(backend: Backend, rec: ContainerRecord, net: Net, aliases: list[str]) -> None:
    """One more network for the container's pod: recorded first (the executor's connect is
    idempotent: a retry finds what a cut-short one did), undone in the record if refused."""
    if not rec.pod_id or rec.state in ("creating", "removing"):
        raise Conflict(f"container {rec.id} is being created or removed")
    shoal_name, server = "", ""
    if net.rec is not None:
        info = await ensure_shoal(backend, net.rec)
        shoal_name, server = net.rec.shoal_name, info.gateway if net.driver == "bridge" else ""
        if server:
            await dns_of(backend).serve(dns.Target(net.id, info.gateway, info.subnet,
                                                   info.bridge))
    store = Containers(backend.records)
    rec = await store.update(rec, config=_with_connected(rec, {**connected(rec),
                                                               net.id: aliases}))
    try:
        await backend.clients.tasks.sandbox_connect(SandboxNetworkRequest(
            id=rec.pod_id, network=shoal_name))
    except BaseException:
        fresh = await resolve(backend, rec.id)
        left = {k: v for k, v in connected(fresh).items() if k != net.id}
        await store.update(fresh, config=_with_connected(fresh, left))
        raise


async def disconnect(backend: Backend, ref: str, body: dict[str, Any]) -> None:
    net = await find(backend, ref)
    rec = await resolve(backend, text(body, "Container") or "")
    flag(body, "Force")  # checked; nothing to force
    if net.id not in net_keys(rec):
        raise Forbidden(f"container {rec.id} is not connected to network {net.name}")
    if net.id in connected(rec):
        await backend.clients.tasks.sandbox_disconnect(SandboxNetworkRequest(
            id=rec.pod_id, network=net.rec.shoal_name if net.rec is not None else ""))
        left = {k: v for k, v in connected(rec).items() if k != net.id}
        await Containers(backend.records).update(rec, config=_with_connected(rec, left))
    elif net.name == "none":
        return
    elif connected(rec):
        raise Unsupported(f"cannot disconnect container {rec.name} from {net.name}, the "
                          "network it was made on, while it is on others: disconnect those "
                          "first")
    else:
        await _movable(backend, rec, "disconnect", net)
        await _move(backend, rec, PREDEFINED_NETS["none"], [])
    await events.emit(backend, "network", "disconnect", net.id,
                      {"container": rec.id, "name": net.name, "type": net.driver})


def _moved_body(rec: ContainerRecord, net: Net, aliases: list[str]
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the create body with the new network, the same to build from): its anonymous
    volumes are named binds in the second, so the rebuilt container keeps them."""
    body = copy.deepcopy({k: v for k, v in rec.config.items() if k != "Shoal"})
    hc = body.get("HostConfig")
    hc = body["HostConfig"] = hc if isinstance(hc, dict) else {}
    hc["NetworkMode"] = net.name
    body["NetworkingConfig"] = {"EndpointsConfig": {net.name: {"Aliases": aliases}}
                                if net.rec is not None else {}}
    merged = rec.config.get("Shoal", {})
    anonymous = set(merged.get("AnonymousVolumes", []))
    kept = [f"{m['Name']}:{m['Destination']}{'' if m.get('RW', True) else ':ro'}"
            for m in merged.get("Mounts", []) if isinstance(m, dict)
            and m.get("Type") == "volume" and m.get("Name") in anonymous]
    build = copy.deepcopy(body)
    build["HostConfig"]["Binds"] = [*(build["HostConfig"].get("Binds") or []), *kept]
    return body, build


async def _move(backend: Backend, rec: ContainerRecord, net: Net, aliases: list[str]) -> None:
    """Container `rec` (not running) on `net`: a new pod there with a new CRI container,
    recorded, then the old pod removed."""
    from shoal_docker_gateway.domain import containers_spec  # it imports this module

    body, build = _moved_body(rec, net, aliases)
    info = await images.find(backend, rec.image_id, with_config=True)
    spec = await containers_spec.build(backend, rec.id, rec.name, build, rec.image_id,
                                       obj(images.config_of(info), "config"))
    old = rec.pod_id
    if old:  # a new CRI identity: the old pod is there until the record names the new one
        with_status = await backend.cri.runtime.PodSandboxStatus(
            cri.PodSandboxStatusRequest(pod_sandbox_id=old))
        spec.pod.metadata.attempt = with_status.status.metadata.attempt + 1
    pod_id = (await backend.cri.runtime.RunPodSandbox(cri.RunPodSandboxRequest(
        config=spec.pod))).pod_sandbox_id
    try:
        cri_id = (await backend.cri.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=spec.ctr, sandbox_config=spec.pod))).container_id
    except BaseException:
        await _remove_pod(backend, pod_id)
        raise
    merged = {**spec.merged, "AnonymousVolumes": rec.config.get("Shoal", {}).get(
        "AnonymousVolumes", [])}
    await Containers(backend.records).update(rec, pod_id=pod_id, cri_id=cri_id,
                                             state="created", config={**body,
                                                                      "Shoal": merged})
    if old:
        await _remove_pod(backend, old)


async def _remove_pod(backend: Backend, pod_id: str) -> None:
    for call, req in ((backend.cri.runtime.StopPodSandbox,
                       cri.StopPodSandboxRequest(pod_sandbox_id=pod_id)),
                      (backend.cri.runtime.RemovePodSandbox,
                       cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))):
        try:
            await call(req)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise


# -- name resolution (domain/dns.py) ---------------------------------------------------------


async def _targets(backend: Backend) -> list[dns.Target]:
    recs = [r for r in await Networks(backend.records).all() if r.driver == "bridge"]
    if not recs:
        return []
    listed = (await backend.clients.tasks.network_list(NetworkListRequest())).networks
    infos = {i.name: i for i in listed if not i.default}
    return [dns.Target(r.id, i.gateway, i.subnet, i.bridge) for r in recs
            if (i := infos.get(r.shoal_name)) is not None and i.gateway and i.subnet]


async def _names(backend: Backend, net_id: str) -> dns.Names:
    """Network `net_id`'s containers: their names, aliases and ids → their addresses."""
    rec = await Networks(backend.records).by_id(net_id)
    out = dns.Names()
    if rec is None:
        return out
    net = Net.of(rec)
    info = await _info(backend, net)
    pods: dict[str, list[str]] = {}
    for p in info.pods if info is not None else []:
        pods.setdefault(p.id, []).extend(p.ips)
    for ctr in await Containers(backend.records).all():
        ips = pods.get(ctr.pod_id) if ctr.pod_id else None
        if not ips or net_id not in net_keys(ctr) or ctr.state in ("creating", "removing"):
            continue
        for ip in ips:  # where else its asker may find names
            out.peers[ip] = [k for k in net_keys(ctr) if k != net_id]
        valid = []
        for ip in ips:
            try:
                out.by_reverse[ipaddress.ip_address(ip).reverse_pointer] = ctr.name
            except ValueError:
                continue
            valid.append(ip)
        for name in {ctr.name, ctr.id, ctr.id[:12], *aliases_of(ctr, net)}:
            out.by_name.setdefault(name.lower(), []).extend(valid)
    return out


def dns_of(backend: Backend) -> dns.DnsService:
    """The gateway's DNS service, started on first use (or by `start`, at the gateway's
    start, so that containers already on networks resolve after a restart)."""
    if backend.dns is None:
        backend.dns = dns.DnsService(partial(_targets, backend), partial(_names, backend))
        backend.dns.start()
    return backend.dns


async def start(backend: Backend) -> None:
    dns_of(backend)


async def stop(backend: Backend) -> None:
    service, backend.dns = backend.dns, None
    if service is not None:
        await service.close()
