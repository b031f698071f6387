"""`shoal network create|ls|inspect|rm|connect|disconnect`: pod networks, over the bus to
the executor (which writes them as CNI configuration lists into its conf dir). A pod is
made on one with `shoal run --network NAME`, and connected to more (eth1, eth2...) with
`shoal network connect NAME POD`."""

from __future__ import annotations

import argparse
import json
import re
import sys
import uuid
from typing import TYPE_CHECKING, Any

from shoal_common.config import Config
from shoal_common.messages.networks import DRIVERS

if TYPE_CHECKING:
    from shoal_common.clients import TasksClient
    from shoal_common.messages.networks import NetworkInfo

CONNECTS = ("connect", "disconnect")
NAME_RE = re.compile(r"\A[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")  # ... NetworkName


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    net = sub.add_parser("network", help="pod networks: create, ls, inspect, rm, connect, "
                                         "disconnect")
    cmds = net.add_subparsers(dest="network_command", required=True)
    create = cmds.add_parser("create", parents=[common], help="create a network")
    create.add_argument("name", help="a DNS label: lower-case letters, digits and '-'")
    create.add_argument("--subnet", default="", metavar="CIDR",
                        help="e.g. 10.89.5.0/24 (default: a free /24 of 10.89.0.0/16)")
    create.add_argument("--gateway", default="", metavar="IP",
                        help="default: the subnet's first address for a bridge; none for "
                             "macvlan/ipvlan")
    create.add_argument("--driver", default="bridge", choices=DRIVERS)
    create.add_argument("--parent", default="", metavar="IFACE",
                        help="the host interface of a macvlan or ipvlan network")
    ls = cmds.add_parser("ls", parents=[common], help="list networks")
    ls.add_argument("-q", "--quiet", action="store_true", help="only names")
    inspect = cmds.add_parser("inspect", parents=[common], help="networks and their pods as JSON")
    inspect.add_argument("names", nargs="+", metavar="NAME")
    rm = cmds.add_parser("rm", parents=[common], help="remove networks no pod is on")
    rm.add_argument("names", nargs="+", metavar="NAME")
    for verb, what in (("connect", "connect a ready pod to one more network"),
                       ("disconnect", "disconnect a pod from a network it was connected to")):
        cmd = cmds.add_parser(verb, parents=[common], help=what)
        cmd.add_argument("name", metavar="NETWORK",
                         help="a network's name, or '' for the default network")
        cmd.add_argument("pod", metavar="POD", help="the pod sandbox's id")


def _doc(net: NetworkInfo) -> dict[str, Any]:
    """Every field, defaults too (the bus leaves them out)."""
    doc = {f: getattr(net, f) for f in net.__struct_fields__}
    doc["pods"] = [{f: getattr(p, f) for f in p.__struct_fields__} for p in net.pods]
    return doc


def _row(net: NetworkInfo) -> list[str]:
    where = net.bridge or net.parent
    return [net.name + (" (default)" if net.default else ""), net.driver, net.subnet or "-",
            net.gateway or "-", where or "-", str(len(net.pods))]


def print_table(networks: list[NetworkInfo]) -> None:
    rows = [["NAME", "DRIVER", "SUBNET", "GATEWAY", "BRIDGE/PARENT", "PODS"],
            *(_row(n) for n in networks)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


async def _command(tasks: TasksClient, args: argparse.Namespace) -> int:
    from shoal_common.errors import ShoalError
    from shoal_common.messages.networks import (
        NetworkCreateRequest,
        NetworkListRequest,
        NetworkNameRequest,
    )

    cmd = args.network_command
    named = args.names if cmd in ("inspect", "rm") else [] if cmd == "ls" else [args.name]
    for name in named:
        if not NAME_RE.match(name) and not (name == "" and cmd in CONNECTS):
            print(f"shoal network {cmd}: {name!r} is not a network name: use lower-case "
                  "letters, digits and '-' (at most 63, a letter or digit at each end)",
                  file=sys.stderr)
            return 2
    if cmd == "create":
        info = await tasks.network_create(NetworkCreateRequest(
            id=uuid.uuid4().hex, name=args.name, driver=args.driver, subnet=args.subnet,
            gateway=args.gateway, parent=args.parent))
        print(info.name)
        return 0
    if cmd in CONNECTS:
        return await _connect(tasks, args)
    if cmd == "ls":
        listed = (await tasks.network_list(NetworkListRequest())).networks
        if args.quiet:
            print("\n".join(n.name for n in listed))
        else:
            print_table(listed)
        return 0
    code, found = 0, []
    for name in args.names:  # each reported; the others still done
        try:
            if cmd == "inspect":
                found.append(await tasks.network_get(NetworkNameRequest(name=name)))
            else:
                await tasks.network_remove(NetworkNameRequest(name=name))
                print(name)
        except ShoalError as exc:
            print(f"shoal network {cmd}: {name}: {exc.message}", file=sys.stderr)
            code = 1
    if cmd == "inspect" and found:
        docs = [_doc(info) for info in found]
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    return code


async def _connect(tasks: TasksClient, args: argparse.Namespace) -> int:
    from shoal_common.messages.networks import SandboxNetworkRequest

    req = SandboxNetworkRequest(id=args.pod, network=args.name)
    if args.network_command == "connect":
        att = await tasks.sandbox_connect(req)
        print(f"{att.ifname} {' '.join(att.ips)}".rstrip())
    else:
        await tasks.sandbox_disconnect(req)
    return 0


async def main(config: Config, args: argparse.Namespace) -> int:
    from shoal_common.clients import TasksClient
    from shoal_common.errors import ShoalError

    from shoal_cli import client

    bus = await client.connect(config)
    try:
        return await _command(TasksClient(bus), args)
    except ShoalError as exc:
        print(f"shoal network {args.network_command}: {exc.message}", file=sys.stderr)
    finally:
        await bus.close()
    return 1
