"""The preloaded parent ("zygote") `shoal up` forks its services from.

Every service imports the same stack (nats-py and the aiohttp it pulls in, msgspec,
structlog, prometheus-client, asyncio, sqlite3, shoal_common): about 27 MiB of objects
per interpreter. The zygote imports it once, gc.freeze()s it (the collector never writes
to those objects, so their pages stay shared) and forks each service on request, and
again to restart one: the children share those pages copy-on-write.

The launcher makes the zygote with os.fork() from `shoal up` itself, after the preload and
before its own event loop, threads or logging exist (so the launcher shares the stack
too); a zygote that dies is replaced by `python -m shoal_cli.zygote` (an exec: the
launcher's loop and threads are running by then). Requests come over a SOCK_SEQPACKET
socketpair, one JSON message each: {"argv": [sys.executable, "-m", module, ...]} is
answered {"pid": N} or {"error": "..."}; a request may carry descriptors (SCM_RIGHTS)
with "fds": the numbers the child is to have them at (the docker gateway's listening
socket, which the launcher holds open); the first message a zygote sends is
{"ready": pid}. End of file (the launcher is gone) ends it, as does SIGTERM (it dies with
the launcher: PR_SET_PDEATHSIG).

Each service is made by forking.fork_sibling (the launcher's child, not the zygote's) and
before it runs `python -m <module>`'s code it sheds what it must not share: the zygote's
socket and every fd but stdio, its session (it gets its own, as exec'd children do),
signal dispositions and mask (back to an interpreter's defaults), random state (reseeded
by the at-fork hooks), the start times of the metrics it inherited; its command line is
set to the argv it was asked for before the zygote answers with its pid. Logging, the
asyncio loop, NATS and every service module are set up by the child itself: the zygote
has none of them. grpc is never imported here (it does not survive a fork): the gateway
imports it after its fork.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import random
import runpy
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any

from shoal_common.config import Config
from shoal_common.pages import mark_mergeable
from shoal_common.service import release_free_memory

from shoal_cli import forking
from shoal_cli.supervision import die_with_parent

MAX_MESSAGE = 64 * 1024

# What the services all import (measured: `python -X importtime -m shoal_<service>`), or
# two or more of them do; not grpc (the gateway imports it after its fork), nor any service's
# own modules: their metrics would appear on every service's /metrics, and preloading them
# saves nothing (measured: what each child saves, the zygote then holds).
PRELOAD = (
    "shoal_common.service", "shoal_common.sqlite", "shoal_common.faults", "shoal_common.oci",
    "shoal_common.probe", "shoal_common.locks", "shoal_common.consumer", "nats.js",
    "prometheus_client.core", "aiohttp", "sqlite3", "tarfile", "ctypes", "pwd", "grp",
    "queue", "concurrent.futures.thread", "encodings.idna", "runpy",
)


def preload() -> None:
    """Import (and warm) what every service uses. The caller gc.freeze()s after."""
    gc.disable()  # no collections mid-import: fewer holes in the pages children share
    for name in PRELOAD:
        importlib.import_module(name)
    from shoal_common import config

    # Every service loads its config: its entry points and msgspec's decoders of the
    # config types are built here once, not in each child.
    config.services_type()
    # The CRI messages the executor and the gateway both read; after services_type(),
    # which loaded shoal_executor: its __init__ keeps grpc out of this import.
    importlib.import_module("cri_api.v1.api_pb2")
    try:
        config.load_config(env={})
    except config.ConfigError:
        pass  # a bad /etc/shoal/config.toml: each service reports it itself


def _service_modules() -> set[str]:
    from shoal_common.catalog import SERVICES

    return {s.module for s in SERVICES}


MAX_FDS = 4


def _parse(data: bytes, received: list[int]) -> tuple[list[str], dict[int, int]]:
    """The argv of a request, checked: `python -m <a service module> args...`, and where
    each descriptor received with it goes in the child ({number there: ours})."""
    try:
        request = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    wanted = request.get("fds", []) if isinstance(request, dict) else None
    if (not isinstance(wanted, list) or len(wanted) != len(received)
            or not all(isinstance(n, int) and 2 < n < 1024 for n in wanted)
            or len(set(wanted)) != len(wanted)):
        raise ValueError(f"fds must number each of the {len(received)} descriptors sent, "
                         "each above stdio, none twice")
    argv = request.get("argv") if isinstance(request, dict) else None
    if not isinstance(argv, list) or not all(isinstance(a, str) and "\0" not in a
                                             for a in argv):
        raise ValueError("argv must be a list of strings without NUL")
    if len(argv) < 3 or argv[0] != sys.executable or argv[1] != "-m":
        raise ValueError(f"argv must start with {sys.executable} -m")
    if argv[2] not in _service_modules():
        raise ValueError(f"{argv[2]!r} is not a Shoal service module")
    return argv, dict(zip(wanted, received, strict=True))


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.send(json.dumps(message).encode())


@dataclass
class Job:
    """A service to run in the process a fork just made: `python -m <module> args`."""

    argv: list[str]

    def run(self) -> None:
        """As `python -m` would: the module's code as __main__, sys.argv[0] its file; a
        SystemExit or an exception propagates to the interpreter's exit as there. sys.path
        is the zygote's (every module it needs is imported already)."""
        module = self.argv[2]
        sys.argv = [self.argv[0], *self.argv[3:]]
        sys.orig_argv = list(self.argv)
        runpy.run_module(module, run_name="__main__", alter_sys=True)


def _close_fds(keep: dict[int, int]) -> None:
    """Every fd but stdio and `keep`'s, which are moved to their numbers ({there: here});
    the zygote's socket object is closed by its owner first."""
    # Out of the way first: a kept descriptor may sit where another is to go.
    moved = {there: os.dup(here) for there, here in keep.items()}
    for there, spare in moved.items():
        os.dup2(spare, there)
        os.close(spare)
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own fd, already closed


def _fresh_metrics() -> None:
    """Counters inherited unobserved would report the zygote's start as their creation."""
    from prometheus_client import Counter
    from shoal_common import metrics

    for value in vars(metrics).values():
        if isinstance(value, Counter):
            try:
                value.reset()
            except AttributeError:
                pass  # a labelled parent: its children are made in this process


def _fork() -> tuple[int, int]:
    """fork_sibling, with a pipe through which the child tells the zygote that it has taken
    its command line: (0, the end to write) in the child, (pid, the end to read) here."""
    r, w = os.pipe()
    try:
        pid = forking.fork_sibling()
    except OSError:
        os.close(r)
        os.close(w)
        raise
    os.close(w if pid else r)
    return pid, r if pid else w


def _become(sock: socket.socket, argv: list[str], keep: dict[int, int], launcher: int,
            dispositions: dict[signal.Signals, Any], named: int) -> Job:
    """In a child fork_sibling just made: shed the zygote, take on the service's identity."""
    sock.close()
    if not forking.set_cmdline(argv):  # it worked when the zygote started: unlikely
        print(f"{argv[2]}: could not set /proc/{os.getpid()}/cmdline; it reads as the "
              "zygote's", file=sys.stderr)
    os.write(named, b"x")  # the launcher learns our pid only now: we look like ourselves
    os.close(named)
    os.setsid()
    die_with_parent(launcher)
    for sig, handler in dispositions.items():
        if signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    _close_fds(keep)
    random.seed()
    _fresh_metrics()
    gc.enable()
    return Job(argv)


def _dispositions() -> dict[signal.Signals, Any]:
    out: dict[signal.Signals, Any] = {}
    for sig in signal.valid_signals():
        if isinstance(sig, signal.Signals) and sig not in (signal.SIGKILL, signal.SIGSTOP):
            handler = signal.getsignal(sig)
            if handler is not None:  # None: set outside Python, left as it is
                out[sig] = handler
    return out


def serve(sock: socket.socket, launcher: int) -> Job:
    """Answer fork requests until the launcher goes away (then exit). Returns only in a
    child it forked: the service that child is to run."""
    dispositions = _dispositions()
    release_free_memory()
    _send(sock, {"ready": os.getpid()})
    while True:
        try:
            data, received, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
        except OSError:
            data, received = b"", []
        if not data:
            os._exit(0)
        try:
            argv, keep = _parse(data, received)
            pid, named = _fork()
        except (ValueError, OSError) as exc:
            for fd in received:
                os.close(fd)
            _send(sock, {"error": str(exc)})
            continue
        if pid == 0:
            return _become(sock, argv, keep, launcher, dispositions, named)
        for fd in received:  # the child has them now
            os.close(fd)
        os.read(named, 1)  # nothing (end of file) if it died first
        os.close(named)
        try:
            _send(sock, {"pid": pid})
        except OSError:
            os._exit(0)


def _settle(sock: socket.socket, ident: list[str], launcher: int, arenas: int) -> None:
    """A new zygote: its own session, dies with the launcher, stdin from /dev/null, only
    stdio and its socket open, named `python -m shoal_cli.zygote` whichever way it began."""
    os.setsid()
    die_with_parent(launcher)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd > 2 and fd != sock.fileno():
            try:
                os.close(fd)
            except OSError:
                pass
    forking.set_cmdline(zygote_argv(ident))
    if arenas:
        forking.limit_malloc_arenas(arenas)


def zygote_ident(config: Config) -> list[str]:
    """The zygote's arguments: the node and run root it serves (for operators, and for the
    tests' leftover checks), glibc's arena limit for what it forks, and whether its pages
    are marked for KSM."""
    return ["--node-id", config.node_id, "--run-root", config.run_root,
            "--malloc-arenas", str(config.launcher.malloc_arena_max),
            *(["--merge-pages"] if config.launcher.merge_pages else [])]


def zygote_argv(ident: list[str], fd: int | None = None) -> list[str]:
    """Its command line: `ident` names the node and run root (for operators and for the
    tests' leftover checks) and the malloc arenas; `fd`: its socket, when exec'd."""
    return [sys.executable, "-m", "shoal_cli.zygote", *ident,
            *(["--fd", str(fd)] if fd is not None else [])]


def fork_zygote(ident: list[str], arenas: int,
                merge: bool) -> tuple[int, socket.socket] | Job | str:
    """From `shoal up` before its event loop starts: preload, then fork the zygote. In the
    launcher: (zygote pid, launcher's socket end), or why preloading is impossible here
    (a string). In a service forked later from that zygote: the Job it is to run. `merge`:
    the preloaded pages are marked for KSM first (the launcher's and the zygote's alike)."""
    why = forking.supported()
    if why is not None:
        return why
    try:
        preload()
    except Exception as exc:  # an import that fails here fails in the service too: exec it
        gc.enable()
        return f"preload failed: {exc!r}"
    if "grpc" in sys.modules:  # it would not survive the fork
        gc.enable()
        return "grpc was imported before the fork"
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()  # the launcher's start-up objects too: it keeps them all its life
    if merge:
        mark_mergeable()
    launcher = os.getpid()
    pid = os.fork()
    if pid == 0:
        ours.close()
        _settle(theirs, ident, launcher, arenas)
        return serve(theirs, launcher)
    theirs.close()
    gc.enable()
    return pid, ours


def main() -> None:
    """`python -m shoal_cli.zygote --fd N ...`: a zygote exec'd by a running launcher."""
    parser = argparse.ArgumentParser(prog="shoal_cli.zygote")
    parser.add_argument("--fd", type=int, required=True, help="its end of the socketpair")
    parser.add_argument("--node-id", default="")
    parser.add_argument("--run-root", default="")
    parser.add_argument("--malloc-arenas", type=int, default=0, help="0: glibc's default")
    parser.add_argument("--merge-pages", action="store_true", help="mark its pages for KSM")
    args = parser.parse_args()
    sock = socket.socket(fileno=args.fd)
    launcher = os.getppid()
    why = forking.supported()
    if why is not None:
        sys.exit(f"shoal_cli.zygote: {why}")
    if args.malloc_arenas:
        forking.limit_malloc_arenas(args.malloc_arenas)
    preload()
    if "grpc" in sys.modules:
        sys.exit("shoal_cli.zygote: grpc was imported by the preload")
    gc.freeze()
    if args.merge_pages:
        mark_mergeable()
    serve(sock, launcher).run()


if __name__ == "__main__":
    main()
