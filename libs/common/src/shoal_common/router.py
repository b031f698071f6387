"""How a service declares the commands it serves: `@router.command("verb")`, and what a
handler is told about the command it is handling."""

from __future__ import annotations

import inspect
import time
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from shoal_common.messages import Message

if TYPE_CHECKING:
    from shoal_common.bus import Bus

AppT = TypeVar("AppT")


@dataclass
class RequestContext(Generic[AppT]):
    """What a handler knows about the command it is handling."""

    app: AppT
    bus: Bus
    subject: str
    trace_id: str
    namespace: str
    deadline: float

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.time())


Handler = Callable[[RequestContext[Any], Any], Awaitable[Message]]


@dataclass(frozen=True)
class Command:
    verb: str
    request_type: type[Message]
    handler: Handler
    queue: bool = True  # False: every replica answers (health)
    quiet: bool = False  # log at debug, not info (probes)


class Router(Generic[AppT]):
    """The commands one service serves, declared with `@router.command("verb")`.

    The request type is read from the handler's second parameter annotation:

        @router.command("pull")
        async def pull(ctx: RequestContext[Puller], req: PullRequest) -> PullReply: ...
    """

    def __init__(self) -> None:
        self.commands: dict[str, Command] = {}

    def command(self, verb: str, *, queue: bool = True,
                quiet: bool = False) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            if verb in self.commands:
                raise ValueError(f"command {verb!r} registered twice")
            params = list(inspect.signature(fn).parameters)
            request_type = typing.get_type_hints(fn)[params[1]]
            self.commands[verb] = Command(verb, request_type, fn, queue, quiet)
            return fn

        return register

    def include(self, other: Router[Any]) -> None:
        for verb, cmd in other.commands.items():
            if verb in self.commands:
                raise ValueError(f"command {verb!r} registered twice")
            self.commands[verb] = cmd
