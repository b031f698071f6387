"""`shoal run/ps/pods/logs/exec/stop/rm/inspect`: a CRI client of Shoal's socket, like
crictl. Containers and pods may be named by a unique prefix of their id.

This module is the commands' table and the commands but `run` (`run.py`); the connection
and id lookup are `cri_client.py`, printing is `output.py`, log files `cri_logs.py`."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable

import grpc
from cri_api.v1 import api_pb2 as cri
from shoal_common.config import Config

from shoal_cli.cri_client import (
    CliError,
    Cri,
    connect,
    container_status,
    each,
    exit_status,
    exited,
    resolve,
    stop_container,
)
from shoal_cli.cri_logs import LogDecoder, LogFile, follow, write_lines
from shoal_cli.output import (
    CONTAINER_STATES,
    POD_STATES,
    SHORT,
    ago,
    print_listing,
    with_info,
    write,
)
from shoal_cli.run import LOG_DIR_ANNOTATION, remove_pod, run


async def main(config: Config, args: argparse.Namespace) -> int:
    try:
        async with connect(config.cri_socket, args.namespace) as api:
            return await HANDLERS[args.command](api, config, args)
    except grpc.aio.AioRpcError as exc:
        print(f"shoal {args.command}: {exc.details()}", file=sys.stderr)
    except CliError as exc:
        print(f"shoal {args.command}: {exc}", file=sys.stderr)
    return 1


# -- listing ---------------------------------------------------------------------------


async def ps(api: Cri, config: Config, args: argparse.Namespace) -> int:
    f = cri.ContainerFilter(pod_sandbox_id=args.pod or "")
    if not args.all:
        f.state.state = cri.CONTAINER_RUNNING
    ctrs = (await api.runtime.ListContainers(cri.ListContainersRequest(filter=f))).containers
    if args.name:
        try:
            pattern = re.compile(args.name)
        except re.error as exc:
            raise CliError(f"--name {args.name!r}: {exc}") from None
        ctrs = [c for c in ctrs if pattern.search(c.metadata.name)]
    print_listing(ctrs, args.quiet,
                  ["CONTAINER", "IMAGE", "CREATED", "STATE", "NAME", "ATTEMPT", "POD ID"],
                  lambda c, now: [c.id[:SHORT], c.image.image, ago(c.created_at, now),
                                  CONTAINER_STATES.get(c.state, "Unknown"), c.metadata.name,
                                  str(c.metadata.attempt), c.pod_sandbox_id[:SHORT]])
    return 0


async def pods(api: Cri, config: Config, args: argparse.Namespace) -> int:
    items = (await api.runtime.ListPodSandbox(cri.ListPodSandboxRequest())).items
    print_listing(items, args.quiet,
                  ["POD ID", "CREATED", "STATE", "NAME", "NAMESPACE", "ATTEMPT", "RUNTIME"],
                  lambda p, now: [p.id[:SHORT], ago(p.created_at, now),
                                  POD_STATES.get(p.state, "Unknown"), p.metadata.name,
                                  p.metadata.namespace, str(p.metadata.attempt),
                                  p.runtime_handler or "runc"])
    return 0


# -- one container ---------------------------------------------------------------------


async def logs(api: Cri, config: Config, args: argparse.Namespace) -> int:
    status = (await container_status(api, args.container)).status
    if not status.log_path:
        raise CliError(f"container {status.id[:SHORT]} has no log file (it was created "
                       "without a log path)")
    if not args.follow and not os.path.exists(status.log_path):
        raise CliError(f"log file {status.log_path} of container {status.id[:SHORT]} "
                       "does not exist")

    async def finished() -> bool:
        # -f follows until the container exits (like crictl logs -f); else one read.
        return not args.follow or exited((await container_status(api, status.id)).status.state)

    decoder = LogDecoder()
    log = LogFile(status.log_path)
    try:
        if args.tail is not None and args.tail >= 0:  # (negative: all, like crictl)
            lines = decoder.feed(log.read_new()) + ([] if args.follow else decoder.flush())
            write_lines(lines[len(lines) - args.tail:] if args.tail else [])
        await follow(log, finished, decoder)
    finally:
        log.close()
    return 0


async def exec_(api: Cri, config: Config, args: argparse.Namespace) -> int:
    if not args.cmd:
        raise CliError("no command given: shoal exec CONTAINER CMD [ARG...]")
    reply = await api.runtime.ExecSync(cri.ExecSyncRequest(
        container_id=args.container, cmd=args.cmd, timeout=args.timeout))
    write("stdout", reply.stdout)
    write("stderr", reply.stderr)
    return exit_status(reply.exit_code)


# -- containers or pods ----------------------------------------------------------------

Target = cri.Container | cri.PodSandbox


async def _each(command: str, api: Cri, ids: list[str],
                act: Callable[[str, Target], Awaitable[None]]) -> int:
    """Resolve every id and act on what it names; a failure is reported and the others
    still get done."""
    async def on(ident: str) -> None:
        try:
            await act(ident, await resolve(api, ident))
        except grpc.aio.AioRpcError as exc:
            raise CliError(f"{ident}: {exc.details()}") from None

    return await each(command, ids, on)


async def stop(api: Cri, config: Config, args: argparse.Namespace) -> int:
    async def act(ident: str, target: Target) -> None:
        if isinstance(target, cri.Container):
            await stop_container(api, target.id, args.timeout)
        else:
            await api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(
                pod_sandbox_id=target.id))

    return await _each("stop", api, args.ids, act)


async def rm(api: Cri, config: Config, args: argparse.Namespace) -> int:
    async def act(ident: str, target: Target) -> None:
        if isinstance(target, cri.PodSandbox):
            await remove_pod(api, config, target.id,
                             target.annotations.get(LOG_DIR_ANNOTATION, ""))
            return
        if target.state == cri.CONTAINER_RUNNING:
            if not args.force:
                raise CliError(f"container {ident} is running: stop it first, or use "
                               "rm -f")
            await stop_container(api, target.id, 0)
        await api.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=target.id))

    return await _each("rm", api, args.ids, act)


async def inspect(api: Cri, config: Config, args: argparse.Namespace) -> int:
    out = []
    for ident in args.ids:
        target = await resolve(api, ident)
        if isinstance(target, cri.Container):
            c = await container_status(api, target.id, verbose=True)
            out.append(with_info(c.status, dict(c.info)))
        else:
            p = await api.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(
                pod_sandbox_id=target.id, verbose=True))
            out.append(with_info(p.status, dict(p.info)))
    print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    return 0


Handler = Callable[[Cri, Config, argparse.Namespace], Awaitable[int]]
HANDLERS: dict[str, Handler] = {"run": run, "ps": ps, "pods": pods, "logs": logs,
                                "exec": exec_, "stop": stop, "rm": rm, "inspect": inspect}
COMMANDS = frozenset(HANDLERS)
