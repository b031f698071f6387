"""`shoal namespaces ls|create|rm`: the node's namespaces, as `ctr namespaces` shows them.

The puller keeps them (and knows which hold images); pods and containers are the CRI
gateway's, so `rm` first asks the gateway, in that namespace, whether any are left, then
asks the puller to remove it. Checked, not locked: a pod made between the two still runs."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from shoal_common.config import Config
from shoal_common.errors import ShoalError
from shoal_common.messages.namespaces import CRI_NAMESPACE, MAX_LABELS, check_namespace

from shoal_cli.failures import CliError, each
from shoal_cli.output import SHORT

if TYPE_CHECKING:
    from shoal_common.bus import Bus
    from shoal_common.messages.namespaces import NamespaceInfo

NAMED = 5  # a refused rm names at most this many pods and containers of each kind


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    ns = sub.add_parser("namespaces", help="namespaces: ls, create, rm")
    cmds = ns.add_subparsers(dest="namespaces_command", required=True)
    ls = cmds.add_parser("ls", parents=[common],
                         help="list namespaces (created ones, those holding images, k8s.io)")
    ls.add_argument("-q", "--quiet", action="store_true", help="only names")
    create = cmds.add_parser("create", parents=[common], help="create a namespace")
    create.add_argument("name")
    create.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    rm = cmds.add_parser("rm", parents=[common],
                         help="remove namespaces that hold no image, pod or container")
    rm.add_argument("names", nargs="+", metavar="NAME")


def labels_of(items: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise CliError(f"--label {item!r}: expected KEY=VALUE")
        if len(key) > 256 or len(value) > 1024 or not (key + value).isprintable():
            raise CliError(f"--label {item!r}: a key is at most 256 printable characters, a "
                           "value at most 1024")
        labels[key] = value
    if len(labels) > MAX_LABELS:
        raise CliError(f"at most {MAX_LABELS} labels")
    return labels


def print_table(namespaces: list[NamespaceInfo]) -> None:
    rows = [["NAME", "IMAGES", "LABELS"]] + [
        [n.name, str(n.images), ",".join(f"{k}={v}" for k, v in sorted(n.labels.items()))]
        for n in namespaces]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]}".rstrip())


async def in_use(config: Config, name: str) -> str:
    """What the CRI gateway holds in namespace `name` ("" for nothing), as a sentence."""
    # Here, not at the top: `shoal up` imports this module and must not import grpc.
    import grpc
    from cri_api.v1 import api_pb2 as cri

    from shoal_cli.cri_client import connect

    try:
        async with connect(config.cri_socket, name) as api:
            pods = (await api.runtime.ListPodSandbox(cri.ListPodSandboxRequest())).items
            ctrs = (await api.runtime.ListContainers(cri.ListContainersRequest())).containers
    except grpc.aio.AioRpcError as exc:
        raise CliError(f"cannot check namespace {name} for pods and containers: "
                       f"{exc.details()}") from None
    except CliError as exc:
        raise CliError(f"cannot check namespace {name} for pods and containers: {exc}"
                       ) from None
    parts = []
    for kind, items in (("pod sandbox", [(p.id, p.metadata.name) for p in pods]),
                        ("container", [(c.id, c.metadata.name) for c in ctrs])):
        if items:
            shown = ", ".join(f"{i[:SHORT]} {n}" for i, n in items[:NAMED])
            more = f" and {len(items) - NAMED} more" if len(items) > NAMED else ""
            plural = ("es" if kind.endswith("x") else "s") if len(items) != 1 else ""
            parts.append(f"{len(items)} {kind}{plural} ({shown}{more})")
    return " and ".join(parts)


async def main(config: Config, args: argparse.Namespace) -> int:
    from shoal_cli import client

    command = f"namespaces {args.namespaces_command}"
    try:
        names = args.names if args.namespaces_command == "rm" else \
            [args.name] if args.namespaces_command == "create" else []
        for name in names:
            check_namespace(name)
        labels = labels_of(args.label) if args.namespaces_command == "create" else {}
    except (ShoalError, CliError) as exc:
        print(f"shoal {command}: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    bus = await client.connect(config)
    try:
        if args.namespaces_command == "ls":
            return await _ls(bus, args.quiet)
        if args.namespaces_command == "create":
            return await _create(bus, args.name, labels)
        return await _rm(config, bus, names)
    except ShoalError as exc:
        print(f"shoal {command}: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await bus.close()


async def _ls(bus: Bus, quiet: bool) -> int:
    from shoal_common.clients import ImagesClient
    from shoal_common.messages.namespaces import NamespaceListRequest

    reply = await ImagesClient(bus).namespaces_list(NamespaceListRequest())
    if quiet:
        for n in reply.namespaces:
            print(n.name)
    else:
        print_table(reply.namespaces)
    return 0


async def _create(bus: Bus, name: str, labels: dict[str, str]) -> int:
    from shoal_common.clients import ImagesClient
    from shoal_common.messages.namespaces import NamespaceCreateRequest

    await ImagesClient(bus).namespaces_create(NamespaceCreateRequest(name=name, labels=labels))
    print(name)
    return 0


async def _rm(config: Config, bus: Bus, names: list[str]) -> int:
    """Each name: refused while the gateway or the puller holds anything in it; the others
    are still removed."""
    from shoal_common.clients import ImagesClient
    from shoal_common.messages.namespaces import NamespaceRemoveRequest

    async def remove(name: str) -> None:
        if name == CRI_NAMESPACE:
            raise CliError(f"namespace {CRI_NAMESPACE} is the CRI's (kubelet's pods and "
                           "images): it cannot be removed")
        try:
            held = await in_use(config, name)
            if held:
                raise CliError(f"namespace {name} holds {held}: remove them first "
                               f"(shoal -n {name} rm -f ID...)")
            await ImagesClient(bus).namespaces_remove(NamespaceRemoveRequest(name=name))
        except ShoalError as exc:
            raise CliError(exc.message) from None

    return await each("namespaces rm", names, remove)
