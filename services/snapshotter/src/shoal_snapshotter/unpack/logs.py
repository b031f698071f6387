"""The unpack code's warnings, with structlog imported only when one is logged.

Importing structlog (and asyncio, which it imports) costs about 0.1 CPU s, more than a
small layer's whole unpack in a worker process (unpack.worker), which in the common case
logs nothing. In the snapshotter itself structlog is imported already: this costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable

LOGGER = "shoal.snapshotter.unpack"

# Run once, before the first warning: the worker process's logging setup.
_before_first: list[Callable[[], None]] = []


def before_first_warning(setup: Callable[[], None]) -> None:
    _before_first.append(setup)


def warning(event: str, **fields: object) -> None:
    import structlog

    while _before_first:
        _before_first.pop(0)()
    structlog.get_logger(LOGGER).warning(event, **fields)
