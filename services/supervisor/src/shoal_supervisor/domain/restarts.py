"""Docker's restart policies, kept here so they hold while the edge that asked is away.

After an exit the task is run again from its bundle (`TaskManager.rerun`: a new conmon,
the same id and rootfs), after Docker's delay: 100 ms, doubled for each restart in a row,
at most a minute, and back to 100 ms once a run lasted ten seconds. A stop or kill through
the supervisor sets `manual_stop`, which ends the policy. The delay lives in memory only:
after a supervisor restart every exit waiting for its rerun is rerun at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from shoal_supervisor.store.tasks import TaskRecord

log = structlog.get_logger("shoal.supervisor")

FIRST_DELAY = 0.1
MAX_DELAY = 60.0
RESET_AFTER = 10.0  # seconds of running that make the next restart quick again

Rerun = Callable[[str, str], Awaitable[None]]  # (task id, uid of the run that exited)


def wants_restart(task: TaskRecord) -> bool:
    """Whether the policy asks for another run of a stopped task."""
    if task.manual_stop or task.restart_name in ("", "no"):
        return False
    if task.restart_name == "on-failure":
        return task.exit_code != 0 and (task.restart_max == 0
                                        or task.restart_count < task.restart_max)
    return True  # always, unless-stopped


class Restarts:
    """The reruns waiting for their delay, one per task."""

    def __init__(self, rerun: Rerun) -> None:
        self._rerun = rerun
        self._delays: dict[str, float] = {}
        self._waiting: dict[str, asyncio.Task[None]] = {}

    def exited(self, task: TaskRecord, *, at_once: bool = False) -> None:
        """A task was recorded stopped: schedule its rerun if the policy wants one."""
        if not wants_restart(task) or task.id in self._waiting:
            return
        ran = task.finished_at - task.started_at if task.started_at else 0.0
        previous = self._delays.get(task.id, 0.0)
        delay = FIRST_DELAY if ran >= RESET_AFTER or not previous else min(previous * 2,
                                                                           MAX_DELAY)
        self._delays[task.id] = delay
        log.info("restart scheduled", task=task.id, policy=task.restart_name,
                 delay=0.0 if at_once else delay, restarts=task.restart_count)
        waiting = asyncio.create_task(self._later(task.id, task.uid,
                                                  0.0 if at_once else delay))
        self._waiting[task.id] = waiting

    def waiting(self, task_id: str) -> bool:
        return task_id in self._waiting

    def forget(self, task_id: str) -> None:
        """The task is gone: nothing to rerun, no delay to remember."""
        self._delays.pop(task_id, None)
        waiting = self._waiting.pop(task_id, None)
        if waiting is not None and waiting is not asyncio.current_task():
            waiting.cancel()

    async def _later(self, task_id: str, uid: str, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
            # No longer waiting: an exit of the new run schedules the next one.
            self._waiting.pop(task_id, None)
            await self._rerun(task_id, uid)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the rerun logs what failed; the task stays stopped
            log.warning("restart failed", task=task_id, error=str(exc) or repr(exc))

    async def close(self) -> None:
        waiting = list(self._waiting.values())
        self._waiting.clear()
        for task in waiting:
            task.cancel()
        for task in waiting:
            with contextlib.suppress(asyncio.CancelledError):
                await task
