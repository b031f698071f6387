"""The `shoal` command: launcher (`shoal up`), bus client (`shoal status`, `ping`, `pull`,
`images`, `rmi`, `push`, `image import|export`, `namespaces`) and CRI client (`shoal run`,
`ps`, `pods`, `logs`, `exec`, `stop`, `rm`, `inspect`). `shoal -n NAME` puts a command in
a namespace (default k8s.io, kubelet's)."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from pathlib import Path

import structlog
from shoal_common import nats_auth
from shoal_common.catalog import lookup
from shoal_common.config import Config, ConfigError, load_config
from shoal_common.errors import ShoalError
from shoal_common.logging import configure_logging
from shoal_common.messages.namespaces import CRI_NAMESPACE, check_namespace

from shoal_cli import namespaces, networks

# The bus client and the launcher (nats-py, aiohttp) are imported by the commands that use
# them: the CRI commands start in half the time without them. The CRI client (grpc) is
# imported only by the pod commands: `shoal up` never has grpc, which the zygote it forks
# must not have, and is some 10 MiB smaller without it.
POD_COMMANDS = frozenset({"run", "ps", "pods", "logs", "exec", "stop", "rm", "inspect"})


def _replicas(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        for part in item.split(","):
            name, sep, count = part.partition("=")
            try:
                svc = lookup(name.strip())
            except KeyError as exc:
                raise SystemExit(f"shoal: --replicas {part}: {exc.args[0]}") from None
            if not sep or not count.isdigit() or not 1 <= int(count) <= 16:
                raise SystemExit(f"shoal: --replicas {part}: expected SERVICE=N with 1 <= N <= 16")
            out[svc.name] = int(count)
    return out


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML config file")
    common.add_argument("--node-id", help="overrides node_id")
    common.add_argument("--nats-url", help="NATS URL (for `up`: use this external NATS "
                        "instead of starting one)")
    common.add_argument("--state-root", help="overrides state_root")
    common.add_argument("--run-root", help="overrides run_root")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set any config key, e.g. --set log.level=debug")

    parser = argparse.ArgumentParser(prog="shoal", description="Shoal container runtime")
    parser.add_argument("-n", "--namespace", metavar="NAME",
                        help=f"the namespace of images, pods and containers (default "
                             f"{CRI_NAMESPACE}, kubelet's; for `events`: only this one)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", parents=[common], help="run NATS and every service")
    up.add_argument("--replicas", action="append", default=[], metavar="SERVICE=N",
                    help="run N replicas of a service (repeatable or comma-separated)")
    st = sub.add_parser("status", parents=[common], help="health of every replica")
    st.add_argument("--wait", type=float, default=1.0, help="seconds to collect replies")
    pg = sub.add_parser("ping", parents=[common], help="bus round trip to a service")
    pg.add_argument("service")
    pg.add_argument("-c", "--count", type=int, default=4)

    # The global `shoal -n NAME`, also taken after these commands (as it was first);
    # SUPPRESS: unless given here, the global one stands.
    ns = argparse.ArgumentParser(add_help=False)
    ns.add_argument("-n", "--namespace", default=argparse.SUPPRESS, metavar="NAME",
                    help="same as `shoal -n NAME`")
    pl = sub.add_parser("pull", parents=[common, ns], help="pull an image, showing progress")
    pl.add_argument("image")
    pl.add_argument("--user", default="", help="registry credentials USER:PASSWORD")
    im = sub.add_parser("images", parents=[common, ns], help="list images")
    im.add_argument("-q", "--quiet", action="store_true", help="only image ids")
    rmi = sub.add_parser("rmi", parents=[common, ns], help="remove images")
    rmi.add_argument("images", nargs="+")
    ph = sub.add_parser("push", parents=[common, ns], help="push an image to a registry")
    ph.add_argument("image", help="a name, id or id prefix in the store")
    ph.add_argument("target", nargs="?", default="",
                    help="registry reference to push to (default: IMAGE's own name)")
    ph.add_argument("--user", default="", help="registry credentials USER:PASSWORD")
    _add_image_commands(sub, common, ns)
    _add_pod_commands(sub, common)
    networks.add_parser(sub, common)
    namespaces.add_parser(sub, common)
    ev = sub.add_parser("events", parents=[common], help="tail events (live or replayed)")
    ev.add_argument("--topic", action="append", default=[],
                    help="e.g. images.create, tasks.exit (repeatable; default all)")
    ev.add_argument("-n", "--namespace", default=argparse.SUPPRESS, metavar="NAME",
                    help="only this namespace (e.g. k8s.io; default: every one)")
    ev.add_argument("--all-nodes", action="store_true",
                    help="every node sharing this NATS, not only --node-id")
    ev.add_argument("--since", help="replay from a time: 10m, 2h, or ISO 8601")
    ev.add_argument("-f", "--follow", action="store_true",
                    help="keep tailing (default when --since is not given)")
    ev.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser


def _add_image_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                        common: argparse.ArgumentParser, ns: argparse.ArgumentParser) -> None:
    """`shoal image import|export` (module transfer), as `docker load|save`."""
    image = sub.add_parser("image", help="import and export image archives")
    cmds = image.add_subparsers(dest="image_command", required=True)
    ex = cmds.add_parser("export", parents=[common, ns],
                         help="write images to an OCI archive (docker load reads it too)")
    ex.add_argument("file", help="the archive to write (replaced once whole)")
    ex.add_argument("images", nargs="+", metavar="IMAGE", help="a name, id or id prefix")
    im = cmds.add_parser("import", parents=[common, ns],
                         help="load an OCI layout or docker archive (tar, or gzip/bzip2/xz)")
    im.add_argument("file")
    im.add_argument("--base-name", default="", metavar="REPOSITORY",
                    help="name for images the archive names only by a tag, or not at all")


def _add_pod_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                      common: argparse.ArgumentParser) -> None:
    """CRI client commands (module pods), like crictl's; ids may be unique prefixes."""
    run = sub.add_parser("run", parents=[common],
                         help="run a command in a new pod, following its output")
    run.add_argument("--name", help="pod and container name (default: generated)")
    run.add_argument("--pull", action="store_true", help="pull the image even if present")
    run.add_argument("--rm", action="store_true", help="remove the pod when it exits")
    run.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("-w", "--workdir", metavar="DIR")
    run.add_argument("--user", metavar="USER[:GID]", help="uid or user name, optional gid")
    run.add_argument("--memory", metavar="BYTES", help="memory limit (k, m, g suffixes)")
    run.add_argument("-p", "--publish", action="append", default=[],
                     metavar="[IP:]HOSTPORT:CONTAINERPORT[/PROTO]")
    run.add_argument("--network", default="", metavar="NAME|host|none|container:ID",
                     help="a network of `shoal network ls` (default: the default one), the "
                          "host's, none (only lo), or the network of a pod or container")
    run.add_argument("image")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="replaces the image's CMD")
    ps = sub.add_parser("ps", parents=[common], help="list containers")
    ps.add_argument("-a", "--all", action="store_true", help="also those not running")
    ps.add_argument("-q", "--quiet", action="store_true", help="only full ids")
    ps.add_argument("--name", help="only containers whose name matches this regex")
    ps.add_argument("--pod", help="only containers of this pod (id or prefix)")
    pd = sub.add_parser("pods", parents=[common], help="list pod sandboxes")
    pd.add_argument("-q", "--quiet", action="store_true", help="only full ids")
    lg = sub.add_parser("logs", parents=[common], help="print a container's log")
    lg.add_argument("-f", "--follow", action="store_true",
                    help="keep printing until the container exits")
    lg.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    lg.add_argument("container")
    ex = sub.add_parser("exec", parents=[common], help="run a command in a container")
    ex.add_argument("--timeout", type=int, default=0, help="seconds (default: none)")
    ex.add_argument("container")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    st = sub.add_parser("stop", parents=[common], help="stop containers or pods")
    st.add_argument("-t", "--timeout", type=int, default=10,
                    help="seconds between the stop signal and SIGKILL (default 10)")
    st.add_argument("ids", nargs="+", metavar="ID")
    rm = sub.add_parser("rm", parents=[common], help="remove containers or pods")
    rm.add_argument("-f", "--force", action="store_true", help="stop running containers")
    rm.add_argument("ids", nargs="+", metavar="ID")
    ins = sub.add_parser("inspect", parents=[common],
                         help="status of containers or pods as JSON")
    ins.add_argument("ids", nargs="+", metavar="ID")


def _load(args: argparse.Namespace) -> Config:
    try:
        config = load_config(args.config, overrides=args.set, flags={
            "node_id": args.node_id, "nats.url": args.nats_url,
            "state_root": args.state_root, "run_root": args.run_root})
    except ConfigError as exc:
        raise SystemExit(f"shoal: invalid configuration: {exc}") from None
    admin = nats_auth.password_file(Path(config.nats_store_dir) / "auth", nats_auth.ADMIN)
    if args.command != "up" and not config.nats.user and admin.exists():
        # On the node `shoal up` runs: the CLI is the admin user of its secured bus.
        config.nats.user, config.nats.password_file = nats_auth.ADMIN, str(admin)
    return config


def _namespace(args: argparse.Namespace) -> None:
    """Check `-n`; default it to k8s.io, but for `events`, where none means every one."""
    if args.namespace is not None:
        try:
            check_namespace(args.namespace)
        except ShoalError as exc:
            raise SystemExit(f"shoal: -n: {exc.message}") from None
    elif args.command != "events":
        args.namespace = CRI_NAMESPACE


def _up(args: argparse.Namespace, config: Config) -> None:
    replicas = _replicas(args.replicas)
    zygote: tuple[int, socket.socket] | None = None
    why = "launcher.preload = false"
    if config.launcher.preload:
        # Before the launcher has a loop, threads or logging: the zygote forked here must
        # have none of them (and shares with the launcher what both imported).
        from shoal_cli.zygote import Job, fork_zygote, zygote_ident

        made = fork_zygote(zygote_ident(config), config.launcher.malloc_arena_max,
                           config.launcher.merge_pages)
        if isinstance(made, Job):  # a service the zygote forked, long after
            made.run()
            return
        zygote, why = (made, "") if isinstance(made, tuple) else (None, made)
    from shoal_cli.launcher import Launcher

    configure_logging(config.log, service="launcher", node=config.node_id)
    if zygote is None:
        structlog.get_logger("shoal.launcher").info("services are exec'd", why=why)
    if args.nats_url is None:
        # The embedded server listens where nats.embedded.listen says; point at it.
        config.nats.url = f"nats://{config.nats.embedded.listen}"
    launcher = Launcher(config, config_path=args.config, overrides=args.set,
                        replicas=replicas, external_nats=args.nats_url is not None,
                        zygote=zygote)
    sys.exit(asyncio.run(launcher.run()))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _namespace(args)
    config = _load(args)
    if args.command == "up":
        _up(args, config)
        return
    configure_logging(config.log, service="cli", node=config.node_id)
    if args.command == "network":
        sys.exit(asyncio.run(networks.main(config, args)))
    if args.command == "namespaces":
        sys.exit(asyncio.run(namespaces.main(config, args)))
    if args.command in POD_COMMANDS:
        from shoal_cli import pods

        sys.exit(asyncio.run(pods.main(config, args)))
    from shoal_cli import client

    if args.command == "status":
        sys.exit(asyncio.run(client.status(config, args.wait)))
    if args.command == "ping":
        sys.exit(asyncio.run(client.ping(config, args.service, args.count)))
    if args.command == "events":
        sys.exit(asyncio.run(_events_command(config, args)))
    sys.exit(asyncio.run(_images_command(config, args)))


async def _images_command(config: Config, args: argparse.Namespace) -> int:
    from shoal_cli import client, images

    bus = await client.connect(config)
    try:
        if args.command == "pull":
            return await images.pull(config, bus, args.image, args.namespace, args.user)
        if args.command == "images":
            return await images.images(bus, args.namespace, args.quiet)
        if args.command == "image":
            from shoal_cli import transfer

            return await transfer.run(bus, args)
        if args.command == "push":
            from shoal_cli import push

            return await push.push(config, bus, args.image, args.target, args.namespace,
                                   args.user)
        return await images.rmi(bus, args.namespace, args.images)
    except ShoalError as exc:
        print(f"shoal {args.command}: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await bus.close()


async def _events_command(config: Config, args: argparse.Namespace) -> int:
    from shoal_cli import client, events

    bus = await client.connect(config)
    try:
        return await events.tail(config, bus, all_nodes=args.all_nodes,
                                 namespace=args.namespace, topics=args.topic,
                                 since=args.since, follow=args.follow or not args.since,
                                 as_json=args.json)
    except KeyboardInterrupt:
        return 0
    finally:
        await bus.close()
