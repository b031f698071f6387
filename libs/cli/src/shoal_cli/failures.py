"""How a CLI command reports what went wrong; apart from the CRI client so that commands
without grpc (and `shoal up`, whose preloaded zygote must not have it) can use it."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable


class CliError(Exception):
    """A failure explained to the user as `shoal <command>: <message>`."""


async def each(command: str, items: list[str], act: Callable[[str], Awaitable[None]]) -> int:
    """`act` on every item in turn, each printed once done; a CliError is reported and the
    other items still get done. 1 if any failed."""
    code = 0
    for item in items:
        try:
            await act(item)
        except CliError as exc:
            print(f"shoal {command}: {exc}", file=sys.stderr)
            code = 1
        else:
            print(item)
    return code
