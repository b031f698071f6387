"""`shoal run/ps/pods/logs/exec/stop/rm/inspect`: a CRI client of Shoal's socket, like
crictl. Containers and pods may be named by a unique prefix of their id."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import BinaryIO

import grpc
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from shoal_common.config import Config

CONNECT_TIMEOUT = 5.0
POLL = 0.1  # seconds between ContainerStatus polls and log reads
SHORT = 13  # characters of an id shown in tables
POD_NAMESPACE = "default"
# Pods made by `shoal run` say where their log directory is, so `shoal rm` removes it.
LOG_DIR_ANNOTATION = "shoal.io/cli-log-directory"
CLI_LABEL = "shoal.io/cli"
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
CONTAINER_STATES = {cri.CONTAINER_CREATED: "Created", cri.CONTAINER_RUNNING: "Running",
                    cri.CONTAINER_EXITED: "Exited", cri.CONTAINER_UNKNOWN: "Unknown"}
POD_STATES = {cri.SANDBOX_READY: "Ready", cri.SANDBOX_NOTREADY: "NotReady"}


class CliError(Exception):
    """A failure explained to the user as `shoal <command>: <message>`."""


class Cri:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.runtime = cri_grpc.RuntimeServiceStub(channel)
        self.images = cri_grpc.ImageServiceStub(channel)


@asynccontextmanager
async def connect(socket_path: str) -> AsyncIterator[Cri]:
    hint = "start it with `shoal up`, or point --run-root/--config at its socket"
    try:
        _, writer = await asyncio.open_unix_connection(socket_path)
        writer.close()
    except (FileNotFoundError, NotADirectoryError):
        raise CliError(f"Shoal is not running: no CRI socket at {socket_path} "
                       f"({hint})") from None
    except ConnectionRefusedError:
        raise CliError(f"Shoal is not running: nothing listens on {socket_path} "
                       f"({hint})") from None
    except PermissionError:
        raise CliError(f"no permission to use {socket_path} (it is root's)") from None
    async with grpc.aio.insecure_channel(f"unix://{socket_path}") as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT)
        except TimeoutError:
            raise CliError(f"Shoal is not answering on {socket_path} (is `shoal up` "
                           "running?)") from None
        yield Cri(channel)


async def main(config: Config, args: argparse.Namespace) -> int:
    try:
        async with connect(config.cri_socket) as api:
            return await HANDLERS[args.command](api, config, args)
    except grpc.aio.AioRpcError as exc:
        print(f"shoal {args.command}: {exc.details()}", file=sys.stderr)
    except CliError as exc:
        print(f"shoal {args.command}: {exc}", file=sys.stderr)
    return 1


# -- output helpers --------------------------------------------------------------------


def ago(ns: int, now: float | None = None) -> str:
    """Docker's "x ago" wording for a timestamp in nanoseconds."""
    seconds = max((now if now is not None else time.time()) - ns / 1e9, 0)
    if seconds < 1:
        return "Less than a second ago"
    if seconds < 60:
        n = int(seconds)
        return f"{n} second{'s' if n != 1 else ''} ago"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute ago"
    if minutes < 60:
        return f"{minutes} minutes ago"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour ago"
    if hours < 48:
        return f"{hours} hours ago"
    days = hours // 24
    if days < 14:
        return f"{days} days ago"
    if days < 60:
        return f"{days // 7} weeks ago"
    if days < 730:
        return f"{days // 30} months ago"
    return f"{days // 365} years ago"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("   ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True))
              .rstrip())


def _write(stream: str, data: bytes) -> None:
    out = sys.stderr if stream == "stderr" else sys.stdout
    out.buffer.write(data)
    out.buffer.flush()


# -- CRI log files ---------------------------------------------------------------------


class LogDecoder:
    """CRI log lines (`<RFC3339Nano> <stdout|stderr> <P|F>[:tags] <text>`) → output, a P
    (partial) fragment joined with what follows on its stream up to the F line."""

    def __init__(self) -> None:
        self.rest = b""
        self.partial: dict[str, bytes] = {}

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        self.rest += data
        *lines, self.rest = self.rest.split(b"\n")
        out = []
        for line in lines:
            fields = line.split(b" ", 3)
            if len(fields) < 3 or fields[1] not in (b"stdout", b"stderr"):
                continue  # not a CRI log line
            stream = fields[1].decode()
            text = fields[3] if len(fields) == 4 else b""
            if fields[2].split(b":")[0] == b"P":
                self.partial[stream] = self.partial.get(stream, b"") + text
            else:
                out.append((stream, self.partial.pop(stream, b"") + text + b"\n"))
        return out

    def flush(self) -> list[tuple[str, bytes]]:
        """Partial fragments never completed (the container ended mid-line)."""
        out = [(stream, text) for stream, text in self.partial.items() if text]
        self.partial.clear()
        return out


class LogFile:
    """Reads what is appended to a log file, reopening it when it is rotated
    (ReopenContainerLog) or truncated."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file: BinaryIO | None = None
        self.inode = 0

    def read_new(self) -> bytes:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        data = b""
        if self.file is not None and (st is None or st.st_ino != self.inode):
            data = self.file.read()  # the rest of the rotated-away file
            self.close()
        if self.file is None:
            if st is None:
                return data
            self.file = open(self.path, "rb")  # kept open while following
            self.inode = os.fstat(self.file.fileno()).st_ino
        elif st is not None and st.st_size < self.file.tell():
            self.file.seek(0)  # truncated in place
        return data + self.file.read()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


async def follow(log: LogFile, finished: Callable[[], Awaitable[bool]],
                 decoder: LogDecoder) -> None:
    """Print the log as it grows until `finished()`, then what is left."""
    while True:
        done = await finished()  # checked before reading: the last read gets it all
        data = log.read_new()
        for stream, text in decoder.feed(data):
            _write(stream, text)
        if done:
            await asyncio.sleep(0.05)  # conmon's last write may trail the exit by a hair
            for stream, text in decoder.feed(log.read_new()) + decoder.flush():
                _write(stream, text)
            return
        if not data:
            await asyncio.sleep(POLL)


# -- ids -------------------------------------------------------------------------------


async def resolve(api: Cri, ident: str) -> cri.Container | cri.PodSandbox:
    """The one container or pod whose id is `ident` or starts with it."""
    if not ident:
        raise CliError("empty id")
    ctrs = (await api.runtime.ListContainers(cri.ListContainersRequest(
        filter=cri.ContainerFilter(id=ident)))).containers
    pods = (await api.runtime.ListPodSandbox(cri.ListPodSandboxRequest(
        filter=cri.PodSandboxFilter(id=ident)))).items
    found: list[cri.Container | cri.PodSandbox] = [*ctrs, *pods]
    exact = [x for x in found if x.id == ident]
    if exact:
        return exact[0]
    if len(found) == 1:
        return found[0]
    if not found:
        raise CliError(f"no container or pod sandbox with id {ident!r}")
    raise CliError(f"id prefix {ident!r} is ambiguous ({len(found)} containers and pods "
                   "match): give more of it")


async def container_status(api: Cri, ident: str, verbose: bool = False
                           ) -> cri.ContainerStatusResponse:
    return await api.runtime.ContainerStatus(cri.ContainerStatusRequest(
        container_id=ident, verbose=verbose))


def exited(state: int) -> bool:
    return state == cri.CONTAINER_EXITED


# -- shoal run -------------------------------------------------------------------------


def _memory(text: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)[bB]?", text.strip())
    if not m:
        raise CliError(f"--memory {text!r}: expected BYTES, optionally with k, m or g")
    return int(m[1]) * 1024 ** " kmg".index((m[2] or " ").lower())


def _port(text: str) -> cri.PortMapping:
    """[IP:]HOSTPORT:CONTAINERPORT[/tcp|udp|sctp]"""
    spec, _, proto = text.partition("/")
    parts = spec.rsplit(":", 2)
    protocols = {"tcp": cri.TCP, "udp": cri.UDP, "sctp": cri.SCTP}
    if len(parts) < 2 or not all(p.isdigit() for p in parts[-2:]) or \
            (proto or "tcp").lower() not in protocols:
        raise CliError(f"--publish {text!r}: expected [IP:]HOSTPORT:CONTAINERPORT[/PROTO]")
    return cri.PortMapping(protocol=protocols[(proto or "tcp").lower()],
                           host_port=int(parts[-2]), container_port=int(parts[-1]),
                           host_ip=parts[0] if len(parts) == 3 else "")


def _security(user: str) -> cri.LinuxContainerSecurityContext:
    """USER[:GROUP]: a uid or a user name in the image, and a numeric gid."""
    sec = cri.LinuxContainerSecurityContext()
    name, _, group = user.partition(":")
    if name.isdigit():
        sec.run_as_user.value = int(name)
    elif name:
        sec.run_as_username = name
    if group:
        if not group.isdigit():
            raise CliError(f"--user {user!r}: the group must be a numeric gid")
        sec.run_as_group.value = int(group)
    return sec


def _container_config(args: argparse.Namespace, name: str) -> cri.ContainerConfig:
    envs = []
    for item in args.env:
        key, sep, value = item.partition("=")
        if not key:
            raise CliError(f"-e {item!r}: expected KEY=VALUE")
        envs.append(cri.KeyValue(key=key, value=value if sep else os.environ.get(key, "")))
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=args.image),
        args=args.cmd, envs=envs, working_dir=args.workdir or "", log_path=f"{name}.log",
        labels={CLI_LABEL: "run"})
    if args.memory:
        config.linux.resources.memory_limit_in_bytes = _memory(args.memory)
    if args.user:
        config.linux.security_context.CopyFrom(_security(args.user))
    return config


class Run:
    """One `shoal run`: pull if needed, pod, container, logs until it exits, cleanup."""

    def __init__(self, api: Cri, config: Config, args: argparse.Namespace) -> None:
        self.api = api
        self.config = config
        self.args = args
        self.pod_id = ""
        self.container_id = ""
        self.log_dir = ""
        self.interrupts = 0
        self.stopping: asyncio.Task[None] | None = None

    def on_signal(self) -> None:
        """Ctrl-C: stop the container (again: kill it); before it starts, give up."""
        self.interrupts += 1
        if not self.container_id:
            return  # seen after the step in flight
        timeout = 10 if self.interrupts == 1 else 0
        print(f"\nshoal run: stopping {self.container_id[:SHORT]}"
              + (" (Ctrl-C again to kill it)" if timeout else ""), file=sys.stderr)
        self.stopping = asyncio.ensure_future(self._stop(timeout))

    async def _stop(self, timeout: int) -> None:
        with suppress(grpc.aio.AioRpcError):
            await self.api.runtime.StopContainer(cri.StopContainerRequest(
                container_id=self.container_id, timeout=timeout))

    async def run(self) -> int:
        args = self.args
        name = args.name or f"run-{uuid.uuid4().hex[:8]}"
        if not NAME_RE.match(name):
            raise CliError(f"--name {name!r}: use letters, digits, '_', '.' and '-' "
                           "(at most 63, starting with a letter or digit)")
        ctr_config = _container_config(args, name)
        ports = [_port(p) for p in args.publish]
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.on_signal)
        try:
            # Ctrl-C is looked at between steps until the container exists.
            await self._pull(args.image, args.pull)
            if not self.interrupts:
                pod_config = await self._run_pod(name, ports)
                if not self.interrupts:
                    self.container_id = (await self.api.runtime.CreateContainer(
                        cri.CreateContainerRequest(pod_sandbox_id=self.pod_id,
                                                   config=ctr_config,
                                                   sandbox_config=pod_config))).container_id
            if self.interrupts:
                # Ctrl-C before the container ran: nothing of this run is worth keeping.
                await self._cleanup(always=True)
                return 130
            await self.api.runtime.StartContainer(cri.StartContainerRequest(
                container_id=self.container_id))
            return await self._wait(f"{self.log_dir}/{ctr_config.log_path}")
        except BaseException:
            # A pod without its container is of no use: removed even without --rm.
            await self._cleanup(always=not self.container_id)
            raise
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _pull(self, image: str, always: bool) -> None:
        spec = cri.ImageSpec(image=image)
        if not always:
            status = await self.api.images.ImageStatus(cri.ImageStatusRequest(image=spec))
            if status.image.id:
                return
        print(f"Pulling {image} ...", file=sys.stderr)
        await self.api.images.PullImage(cri.PullImageRequest(image=spec))

    async def _run_pod(self, name: str, ports: list[cri.PortMapping]) -> cri.PodSandboxConfig:
        uid = str(uuid.uuid4())
        log_dir = Path(self.config.run_root) / "cli-logs" / uid
        log_dir.mkdir(parents=True, mode=0o700)
        self.log_dir = str(log_dir)
        hostname = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-") or "shoal"
        config = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace=POD_NAMESPACE),
            hostname=hostname, log_directory=self.log_dir, port_mappings=ports,
            labels={CLI_LABEL: "run"}, annotations={LOG_DIR_ANNOTATION: self.log_dir})
        try:
            self.pod_id = (await self.api.runtime.RunPodSandbox(cri.RunPodSandboxRequest(
                config=config))).pod_sandbox_id
        except BaseException:
            shutil.rmtree(log_dir, ignore_errors=True)
            raise
        return config

    async def _wait(self, log_path: str) -> int:
        status = cri.ContainerStatus()

        async def finished() -> bool:
            nonlocal status
            try:
                status = (await container_status(self.api, self.container_id)).status
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                raise CliError(f"container {self.container_id[:SHORT]} was removed "
                               "(its exit code went with it)") from None
            return exited(status.state)

        log = LogFile(log_path)
        try:
            await follow(log, finished, LogDecoder())
        finally:
            log.close()
        if self.stopping is not None:
            await self.stopping
        if status.reason == "OOMKilled":
            print("shoal run: the container was killed for exceeding its memory limit",
                  file=sys.stderr)
        if self.args.rm:
            await remove_pod(self.api, self.config, self.pod_id, self.log_dir)
        return min(max(status.exit_code, 0), 255)

    async def _cleanup(self, always: bool) -> None:
        """After a failure: remove the pod (with --rm, or when `always`); errors here
        would only hide the one being reported."""
        if self.pod_id and (always or self.args.rm):
            with suppress(grpc.aio.AioRpcError):
                await remove_pod(self.api, self.config, self.pod_id, self.log_dir)
        elif not self.pod_id and self.log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)


async def remove_pod(api: Cri, config: Config, pod_id: str, log_dir: str) -> None:
    """Stop and remove a pod, and the log directory `shoal run` made for it."""
    await api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    await api.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    if log_dir and Path(log_dir).parent == Path(config.run_root) / "cli-logs":
        shutil.rmtree(log_dir, ignore_errors=True)


async def run(api: Cri, config: Config, args: argparse.Namespace) -> int:
    return await Run(api, config, args).run()


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
    ctrs = sorted(ctrs, key=lambda c: c.created_at, reverse=True)
    if args.quiet:
        for c in ctrs:
            print(c.id)
        return 0
    now = time.time()
    print_table(["CONTAINER", "IMAGE", "CREATED", "STATE", "NAME", "ATTEMPT", "POD ID"],
                [[c.id[:SHORT], c.image.image, ago(c.created_at, now),
                  CONTAINER_STATES.get(c.state, "Unknown"), c.metadata.name,
                  str(c.metadata.attempt), c.pod_sandbox_id[:SHORT]] for c in ctrs])
    return 0


async def pods(api: Cri, config: Config, args: argparse.Namespace) -> int:
    items = (await api.runtime.ListPodSandbox(cri.ListPodSandboxRequest())).items
    items = sorted(items, key=lambda p: p.created_at, reverse=True)
    if args.quiet:
        for p in items:
            print(p.id)
        return 0
    now = time.time()
    print_table(["POD ID", "CREATED", "STATE", "NAME", "NAMESPACE", "ATTEMPT", "RUNTIME"],
                [[p.id[:SHORT], ago(p.created_at, now), POD_STATES.get(p.state, "Unknown"),
                  p.metadata.name, p.metadata.namespace, str(p.metadata.attempt),
                  p.runtime_handler or "runc"] for p in items])
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
            for stream, text in lines[len(lines) - args.tail:] if args.tail else []:
                _write(stream, text)
        await follow(log, finished, decoder)
    finally:
        log.close()
    return 0


async def exec_(api: Cri, config: Config, args: argparse.Namespace) -> int:
    if not args.cmd:
        raise CliError("no command given: shoal exec CONTAINER CMD [ARG...]")
    reply = await api.runtime.ExecSync(cri.ExecSyncRequest(
        container_id=args.container, cmd=args.cmd, timeout=args.timeout))
    _write("stdout", reply.stdout)
    _write("stderr", reply.stderr)
    return min(max(reply.exit_code, 0), 255)


# -- containers or pods ----------------------------------------------------------------


async def _each(command: str, ids: list[str], act: Callable[[str], Awaitable[None]]) -> int:
    """Act on every id; a failure is reported and the others still get done."""
    code = 0
    for ident in ids:
        try:
            await act(ident)
        except grpc.aio.AioRpcError as exc:
            print(f"shoal {command}: {ident}: {exc.details()}", file=sys.stderr)
            code = 1
        except CliError as exc:
            print(f"shoal {command}: {exc}", file=sys.stderr)
            code = 1
        else:
            print(ident)
    return code


async def stop(api: Cri, config: Config, args: argparse.Namespace) -> int:
    async def act(ident: str) -> None:
        target = await resolve(api, ident)
        if isinstance(target, cri.Container):
            await api.runtime.StopContainer(cri.StopContainerRequest(
                container_id=target.id, timeout=args.timeout))
        else:
            await api.runtime.StopPodSandbox(cri.StopPodSandboxRequest(
                pod_sandbox_id=target.id))

    return await _each("stop", args.ids, act)


async def rm(api: Cri, config: Config, args: argparse.Namespace) -> int:
    async def act(ident: str) -> None:
        target = await resolve(api, ident)
        if isinstance(target, cri.PodSandbox):
            await remove_pod(api, config, target.id,
                             target.annotations.get(LOG_DIR_ANNOTATION, ""))
            return
        if target.state == cri.CONTAINER_RUNNING:
            if not args.force:
                raise CliError(f"container {ident} is running: stop it first, or use "
                               "rm -f")
            await api.runtime.StopContainer(cri.StopContainerRequest(
                container_id=target.id, timeout=0))
        await api.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=target.id))

    return await _each("rm", args.ids, act)


def _with_info(response: Message, info: dict[str, str]) -> dict[str, object]:
    """crictl's shape: {"status": ..., "info": ...}, each info value parsed as JSON."""
    parsed: dict[str, object] = {}
    for key, value in info.items():
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    # Zero values too (state SANDBOX_READY, exitCode 0 are the proto defaults).
    return {"status": MessageToDict(response, always_print_fields_with_no_presence=True),
            "info": parsed}


async def inspect(api: Cri, config: Config, args: argparse.Namespace) -> int:
    out = []
    for ident in args.ids:
        target = await resolve(api, ident)
        if isinstance(target, cri.Container):
            c = await container_status(api, target.id, verbose=True)
            out.append(_with_info(c.status, dict(c.info)))
        else:
            p = await api.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(
                pod_sandbox_id=target.id, verbose=True))
            out.append(_with_info(p.status, dict(p.info)))
    print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    return 0


Handler = Callable[[Cri, Config, argparse.Namespace], Awaitable[int]]
HANDLERS: dict[str, Handler] = {"run": run, "ps": ps, "pods": pods, "logs": logs,
                                "exec": exec_, "stop": stop, "rm": rm, "inspect": inspect}
COMMANDS = frozenset(HANDLERS)
