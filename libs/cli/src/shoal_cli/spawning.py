"""The launcher's side of the zygote (shoal_cli.zygote): keep one running, ask it to fork
services, and supervise what it forked.

A forked service is the launcher's own child (forking.fork_sibling), so the launcher waits
for it as for any other: here through a pidfd in the event loop (asyncio only waits for
the children it spawned itself), reaped by pid, its exit status exactly as the kernel
reports it. A zygote that dies is replaced by an exec'd one (restarted like a child, with
backoff only in a crash loop); while there is none, or when it does not answer, services
are exec'd as without preloading: a start never waits for the zygote.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Protocol

import structlog

from shoal_cli.supervision import RestartPolicy, spawn
from shoal_cli.zygote import MAX_MESSAGE, zygote_argv

log = structlog.get_logger("shoal.launcher")

READY_TIMEOUT = 60.0  # an exec'd zygote's imports, on a loaded node
REPLY_TIMEOUT = 10.0  # a fork takes milliseconds; no answer means the zygote is stuck


class ChildProcess(Protocol):
    """What the launcher needs of a child: asyncio's Process, or a ForkedProcess."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    async def wait(self) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


class ZygoteError(Exception):
    """The zygote could not fork this time (the caller execs instead)."""


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


class ForkedProcess:
    """A child of this process that asyncio did not spawn, waited for through a pidfd.
    Its returncode follows asyncio's convention: -N when a signal N ended it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._fd = os.pidfd_open(pid)
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        self._loop.add_reader(self._fd, self._reap)

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else: its status is lost
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self.returncode = os.waitstatus_to_exitcode(status)
        self._exited.set_result(self.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # unreaped, so the pidfd still names our child
            try:
                signal.pidfd_send_signal(self._fd, sig)
            except ProcessLookupError:
                pass  # exited; _reap will see it

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The zygote the launcher forks services from, kept running."""

    def __init__(self, ident: list[str], forked: tuple[int, socket.socket] | None,
                 policy: RestartPolicy, env: dict[str, str]) -> None:
        self.ident = ident  # its arguments (zygote_ident): node, run root, malloc arenas
        self._forked = forked  # the one `shoal up` forked before its loop started
        self.policy = policy
        self.env = env
        self.proc: ChildProcess | None = None
        self._sock: socket.socket | None = None
        self._ready_since: float | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.stopping = False
        self.started = asyncio.Event()  # set once the first zygote answered, or gave up

    @property
    def ready(self) -> bool:
        return self._ready_since is not None and not self.stopping

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep())

    async def _begin(self) -> None:
        """Adopt the forked zygote, or exec a new one; wait until it is ready."""
        if self._forked is not None:
            pid, ours = self._forked
            self._forked = None
            self.proc = ForkedProcess(pid)
        else:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                self.proc = await spawn(zygote_argv(self.ident, theirs.fileno()),
                                        env=self.env, pass_fds=(theirs.fileno(),))
            finally:
                theirs.close()
        ours.setblocking(False)
        self._sock = ours
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(ours, MAX_MESSAGE),
                                      READY_TIMEOUT)
        hello = json.loads(data) if data else None
        if not isinstance(hello, dict) or hello.get("ready") != self.proc.pid:
            raise ZygoteError(f"zygote did not start: {data!r}")
        self._ready_since = time.monotonic()
        log.info("zygote ready", pid=self.proc.pid)

    async def _keep(self) -> None:
        """Keep a zygote running until stop(): replace it whenever it exits."""
        while not self.stopping:
            try:
                await self._begin()
            except (OSError, ValueError, ZygoteError, TimeoutError) as exc:
                log.warning("zygote did not start; services are exec'd meanwhile",
                            error=str(exc) or type(exc).__name__)
                if self.proc is not None and self.proc.returncode is None:
                    self.proc.kill()
            self.started.set()
            code = await self.proc.wait() if self.proc is not None else None
            served = (None if self._ready_since is None
                      else round(time.monotonic() - self._ready_since, 1))
            self._down()
            if self.stopping:
                return
            backoff = self.policy.delay(served, killed=code == -signal.SIGKILL)
            if self.policy.crash_looping:
                log.error("zygote keeps exiting; services are exec'd from now on", code=code)
                return
            log.warning("zygote exited; restarting", code=code, served_s=served,
                        backoff_s=backoff)
            await asyncio.sleep(backoff)

    def _down(self) -> None:
        self._ready_since = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _exchange(self, argv: list[str], fds: tuple[int, ...]) -> int:
        """One request and its reply, never interrupted half-way (a reply left unread
        would answer the next request). `fds` go along (SCM_RIGHTS), at the same numbers
        in the child."""
        async with self._lock:
            sock = self._sock
            if sock is None or not self.ready:
                raise ZygoteError("no zygote running")
            loop = asyncio.get_running_loop()
            request = json.dumps({"argv": argv, "fds": list(fds)}).encode()
            try:
                # One small datagram on an idle socketpair: it never waits for room.
                socket.send_fds(sock, [request], list(fds))
            except BlockingIOError:
                raise ZygoteError("the zygote's socket is full") from None
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, MAX_MESSAGE), REPLY_TIMEOUT)
            except TimeoutError:
                self._broken()
                raise ZygoteError(f"no answer within {REPLY_TIMEOUT:.0f} s") from None
        if not data:
            self._broken()
            raise ZygoteError("the zygote closed its socket")
        reply = json.loads(data)
        pid = reply.get("pid") if isinstance(reply, dict) else None
        if not isinstance(pid, int) or pid <= 0:
            raise ZygoteError(str(reply.get("error") if isinstance(reply, dict) else reply))
        if _parent_of(pid) != os.getpid():
            raise ZygoteError(f"pid {pid} from the zygote is not a child of the launcher")
        return pid

    def _broken(self) -> None:
        """Stuck or gone: kill it, so that _keep starts another."""
        self._down()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    async def fork(self, argv: list[str], fds: tuple[int, ...] = ()) -> ForkedProcess:
        """A new child of the launcher running `argv` (sys.executable -m <service> ...),
        with the launcher's descriptors `fds` open at the same numbers."""
        exchange = asyncio.create_task(self._exchange(argv, fds))
        try:
            pid = await asyncio.shield(exchange)
        except asyncio.CancelledError:
            # Stopping while the zygote forks: the child it makes must not live on unseen.
            exchange.add_done_callback(_kill_orphan)
            raise
        except (OSError, ValueError) as exc:
            raise ZygoteError(str(exc)) from exc
        return ForkedProcess(pid)

    async def stop(self) -> None:
        """End the zygote (before the services stop: nothing is forked meanwhile)."""
        self.stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._down()  # end of file: the zygote exits
        if self._forked is not None:  # stopped before it was adopted
            pid, sock = self._forked
            self._forked = None
            sock.close()
            self.proc = ForkedProcess(pid)
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _kill_orphan(exchange: asyncio.Task[int]) -> None:
    if not exchange.cancelled() and exchange.exception() is None:
        ForkedProcess(exchange.result()).kill()  # reaped once it exits
