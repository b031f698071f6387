"""Fault points: named steps where a test makes a service fail or die, to prove that a
failure or a kill -9 at that moment loses and leaks nothing.

Armed only through the environment, read once at start:
    SHOAL_FAULTS="executor.sandbox.netns=fail,cri.sandbox.created=kill,x=delay:2.5"
`fail` raises an internal error at the point (every time); `kill` SIGKILLs the process
there, once per marker directory SHOAL_FAULTS_DIR (so the restarted process goes on);
`delay:S` waits S seconds there (a slow step). Unarmed, a point costs one dict lookup."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from shoal_common.errors import Internal

ENV = "SHOAL_FAULTS"
ENV_DIR = "SHOAL_FAULTS_DIR"
ACTIONS = ("fail", "kill", "delay")


def _parse(text: str) -> dict[str, str]:
    armed: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, action = item.partition("=")
        if action.partition(":")[0] not in ACTIONS:
            raise ValueError(f"{ENV}: {item!r}: the action must be one of {', '.join(ACTIONS)}")
        armed[name] = action
    return armed


ARMED = _parse(os.environ.get(ENV, ""))


async def point(name: str) -> None:
    action = ARMED.get(name)
    if action is None:
        return
    if action.startswith("delay:"):
        await asyncio.sleep(float(action.partition(":")[2]))
        return
    if action == "kill":
        marker = Path(os.environ.get(ENV_DIR, "/tmp")) / f"fault-{name}"
        if marker.exists():
            return
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    raise Internal(f"fault injected at {name}")
