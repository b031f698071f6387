"""What `shoal up` keeps in its run root so that it can be killed and started again.

- `shoal-up.lock`: flock'ed for the launcher's life (the kernel drops it when the launcher
  dies, so it is never stale): two launchers on one run root would fight over the NATS
  port, the CRI socket and every service's state.
- `shoal-up.pids`: the pids (with their start times, against pid reuse) of the children
  now running. A launcher killed with SIGKILL leaves children that got SIGTERM
  (PR_SET_PDEATHSIG) and are still finishing; the next launcher waits for them before it
  starts NATS and the services on the same ports, sockets and files.
- `shoal-up.on-demand`: the services that start at their first connection and have not
  yet (a JSON list; `shoal status` shows them as such, not as down).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import structlog

log = structlog.get_logger("shoal.launcher")

LOCK_FILE = "shoal-up.lock"
PIDS_FILE = "shoal-up.pids"
ON_DEMAND_FILE = "shoal-up.on-demand"


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None if it is gone (a zombie
    is gone: it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)", which may hold spaces
    if fields[0] in {"Z", "X"}:
        return None
    return int(fields[19])


class RunState:
    def __init__(self, run_root: str) -> None:
        self.root = Path(run_root)
        self.lock_path = self.root / LOCK_FILE
        self.pids_path = self.root / PIDS_FILE
        self.on_demand_path = self.root / ON_DEMAND_FILE
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Hold the run root for this launcher, or exit naming the one that holds it."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SystemExit(f"shoal up: another shoal up (pid {holder}) is running with "
                             f"run root {self.root}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def record(self, pids: Iterable[int]) -> None:
        """The children running now (rewritten whenever one starts)."""
        entries = [[pid, start] for pid in pids if (start := _start_time(pid)) is not None]
        tmp = self.pids_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries))
        tmp.replace(self.pids_path)

    def mark_on_demand(self, services: list[str]) -> None:
        """The services waiting for their first connection (none: the file goes)."""
        if not services:
            self.on_demand_path.unlink(missing_ok=True)
            return
        tmp = self.on_demand_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(services))
        tmp.replace(self.on_demand_path)

    def clear(self) -> None:
        self.pids_path.unlink(missing_ok=True)
        self.on_demand_path.unlink(missing_ok=True)

    def _leftovers(self) -> list[int]:
        try:
            entries = json.loads(self.pids_path.read_text())
        except (OSError, ValueError):
            return []
        return [pid for pid, start in entries if _start_time(pid) == start]

    async def wait_for_leftovers(self, grace: float) -> None:
        """Let the children of a launcher that was killed finish stopping (they got SIGTERM
        when it died; they get it again here in case it died before they could be told),
        then SIGKILL whatever is left after `grace` seconds."""
        pids = self._leftovers()
        if not pids:
            return
        log.warning("waiting for the processes a previous shoal up left", pids=pids)
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for pid in await self._wait_gone(deadline):
            log.warning("killing a process a previous shoal up left", pid=pid)
            _signal(pid, signal.SIGKILL)
        await self._wait_gone(deadline + 5)
        self.clear()

    async def _wait_gone(self, until: float) -> list[int]:
        """Leftovers still running at `until` (polled: they are not our children, so no
        exit status or signal tells us when they are gone)."""
        while True:
            pids = self._leftovers()
            if not pids or time.monotonic() >= until:
                return pids
            await asyncio.sleep(0.05)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
