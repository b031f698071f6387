"""How `shoal up` starts and restarts its children (the services and the embedded NATS).

A child that served for a while (it answered health, NATS: listened, HEALTHY_AFTER seconds
before it died) was healthy: its death came from outside (kill, OOM killer, a bug hit
once) and waiting only keeps the node unreachable, so it is restarted at once. Only a child
that keeps dying before it serves or right after (a crash loop: bad config, a port taken)
is restarted with exponential backoff. Time since spawn would not tell the two apart: on a
loaded node a service's imports alone can take seconds. A child that died of SIGKILL was
killed from outside (an operator, the OOM killer; no process dies of it by itself): it is
restarted at once however soon after its start, as the systemd units do (Restart=always), so a
node whose processes are killed again and again is never left waiting out a backoff.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import signal
from dataclasses import dataclass

# Serving this long before dying counts as a healthy run, not as part of a crash loop.
HEALTHY_AFTER = 3.0
PR_SET_PDEATHSIG = 1


@dataclass
class RestartPolicy:
    """The delay before each restart of one child."""

    initial: float  # launcher.restart_backoff_initial
    maximum: float  # launcher.restart_backoff_max
    quick_deaths: int = 0  # consecutive deaths before serving HEALTHY_AFTER seconds

    def delay(self, served_for: float | None, *, killed: bool = False) -> float:
        """Seconds to wait before restarting a child that died after serving `served_for`
        seconds (None: it never answered); `killed`: it died of SIGKILL.

        After a healthy run, or a SIGKILL (which counts for no crash loop): 0. The first
        quick death is restarted at once too (one kill right after a restart is not a
        loop); from the second on the wait doubles from `initial` up to `maximum`."""
        if killed:
            return 0.0
        if served_for is not None and served_for >= HEALTHY_AFTER:
            self.quick_deaths = 0
            return 0.0
        self.quick_deaths += 1
        if self.quick_deaths == 1:
            return 0.0
        return float(min(self.initial * 2 ** (self.quick_deaths - 2), self.maximum))

    @property
    def crash_looping(self) -> bool:
        return self.quick_deaths > 2


def die_with_parent(parent: int) -> None:
    """Runs in a new child of the launcher (between fork and exec, or right after the
    zygote forked it): SIGTERM when the launcher dies. If it died before prctl took effect,
    the signal will never come: leave at once instead."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


async def spawn(argv: list[str], *, env: dict[str, str] | None = None,
                pass_fds: tuple[int, ...] = ()) -> asyncio.subprocess.Process:
    """Start a child in its own session (Ctrl-C reaches only the launcher) that gets SIGTERM
    if the launcher dies. Forked by the event loop's (main) thread: PDEATHSIG follows the
    thread that forked, and that one lives as long as the launcher."""
    return await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, start_new_session=True, env=env,
        pass_fds=pass_fds, preexec_fn=functools.partial(die_with_parent, os.getpid()))
