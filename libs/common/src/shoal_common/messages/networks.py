"""Executor commands on pod networks (`shoal.v1.<node>.tasks.network.<verb>`).

A network is a CNI configuration list the executor writes into its CNI conf dir (bridge,
macvlan or ipvlan, host-local IPAM, portmap on a bridge); a pod asks for one with the
`io.shoal.network` annotation of its PodSandboxConfig. Shapes are checked here while a
body is decoded; what needs the host or the other networks (a subnet parsed and checked
for overlaps, the parent interface existing) is the executor's own check."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from shoal_common.messages.base import Message
from shoal_common.messages.fields import ObjectId

DRIVERS = ("bridge", "macvlan", "ipvlan")
Driver = Literal["bridge", "macvlan", "ipvlan"]
# A DNS label (RFC 1123, lower case): also a file name, a CNI network name and a host-local
# lease directory, so nothing in it can escape a directory or look like an option.
NetworkName = Annotated[str, Meta(pattern=r"\A[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")]
# "" = the executor picks a free one; else parsed with ipaddress by the executor.
Cidr = Annotated[str, Meta(pattern=r"\A(|[0-9A-Fa-f.:]{2,45}/[0-9]{1,3})\Z")]
IpAddress = Annotated[str, Meta(pattern=r"\A(|[0-9A-Fa-f.:]{2,45})\Z")]
# A Linux interface name (at most IFNAMSIZ-1 bytes, no "/" or white space), "" = none.
InterfaceName = Annotated[str, Meta(pattern=r"\A(|[A-Za-z0-9_][A-Za-z0-9_.-]{0,14})\Z")]


class NetworkCreateRequest(Message):
    id: ObjectId  # caller-chosen: a retry with the same id returns the network it made
    name: NetworkName
    driver: Driver = "bridge"
    subnet: Cidr = ""
    gateway: IpAddress = ""  # "" = the subnet's first address (a bridge's own address)
    parent: InterfaceName = ""  # the host interface of a macvlan or ipvlan network


class NetworkNameRequest(Message):
    name: NetworkName


class NetworkListRequest(Message):
    pass


# A network a pod may be connected to: a `shoal network create` network, or "" (the default).
NetworkRef = Annotated[str, Meta(pattern=r"\A(|[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)\Z")]


class SandboxNetworkRequest(Message):
    """Connect a ready pod sandbox to one more network (`sandbox.connect`: an interface
    eth1, eth2... in its namespace; a retry returns the attachment made) or disconnect it
    (`sandbox.disconnect`: a network it is not connected to any more is no error)."""

    id: ObjectId  # the sandbox
    network: NetworkRef


class NetworkAttachment(Message):
    network: str
    ifname: str
    ips: list[str] = []


class NetworkPod(Message):
    """A pod sandbox on a network: `joins` names the pod whose namespace it shares."""

    id: str
    pod: str = ""  # "<namespace>/<name>" of its PodSandboxConfig
    ips: list[str] = []
    joins: str = ""


class NetworkInfo(Message):
    name: str
    driver: str
    subnet: str = ""
    gateway: str = ""
    parent: str = ""
    bridge: str = ""
    id: str = ""  # "" for the default network
    default: bool = False  # the CRI's network: every pod without the annotation
    file: str = ""  # its CNI configuration list
    created_at: float = 0.0
    pods: list[NetworkPod] = []


class NetworkList(Message):
    networks: list[NetworkInfo]
