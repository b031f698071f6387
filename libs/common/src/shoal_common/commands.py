"""Short-lived helper commands (iptables, runc, ...) run from a service's event loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass
class Finished:
    returncode: int
    stdout: bytes
    stderr: bytes


async def run_command(argv: list[str], *, stdin: bytes | None = None,
                      timeout: float = 60.0) -> Finished:
    """Run `argv` without a shell and collect its output. A command that outlives `timeout`
    (TimeoutError) or whose caller is cancelled is killed first: none is left behind.
    OSError if it cannot be started."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else
        asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    return Finished(proc.returncode or 0, out, err)
