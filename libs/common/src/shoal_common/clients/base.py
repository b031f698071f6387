"""The one way a service calls another: each verb declared once, with its policy.

A `Verb` names the request and reply types, the deadline, the retry policy, and whether a
repeat is safe (idempotent by a caller-chosen id, or read-only). A client class lists a
service's verbs as attributes; `client.verb(message)` sends through `Bus.request`, which
only these clients call. Servers check their handlers against the same declarations
(`check_router`), so the two sides cannot drift apart.
"""

from __future__ import annotations

import typing
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar, overload

from shoal_common.bus import Bus, Router
from shoal_common.messages import HealthReply, HealthRequest, Message, PingReply, PingRequest

PROBE_TIMEOUT = 2.0  # health and readiness probes: a live replica answers at once

ReqT = TypeVar("ReqT", bound=Message)
RepT = TypeVar("RepT", bound=Message)


ReqC = TypeVar("ReqC", bound=Message, contravariant=True)
RepC = TypeVar("RepC", bound=Message, covariant=True)


class Call(Protocol[ReqC, RepC]):
    """A verb bound to a client: `await client.verb(message, timeout=...)`."""

    def __call__(self, message: ReqC, *, timeout: float | None = None
                 ) -> Coroutine[Any, Any, RepC]: ...


@dataclass(frozen=True)
class Verb(Generic[ReqT, RepT]):
    name: str
    request: type[ReqT]
    reply: type[RepT]
    # Each attempt waits this long (None: nats.request_timeout); the whole call is bounded by
    # `timeout` (None: attempt_timeout x (retries + 1)) and by the caller's own deadline.
    attempt_timeout: float | None = None
    timeout: float | None = None
    retries: int | None = None  # None: nats.request_retries
    # A repeat has the effect of one call: read-only, or made idempotent by an id the caller
    # chose. Only such verbs may be retried after a lost reply.
    idempotent: bool = True
    # While no replica serves the verb (a restart), keep trying until the deadline; probes
    # (health, readiness) answer at once instead.
    wait_for_service: bool = True

    def __post_init__(self) -> None:
        if not self.idempotent and self.retries != 0:
            raise ValueError(f"verb {self.name}: a verb that is not idempotent must not be "
                             "retried (retries=0)")

    @overload
    def __get__(self, client: None, owner: type[ServiceClient]) -> Verb[ReqT, RepT]: ...

    @overload
    def __get__(self, client: ServiceClient, owner: type[ServiceClient]
                ) -> Call[ReqT, RepT]: ...

    def __get__(self, client: ServiceClient | None, owner: type[ServiceClient]
                ) -> Verb[ReqT, RepT] | Call[ReqT, RepT]:
        if client is None:
            return self

        async def call(message: ReqT, *, timeout: float | None = None) -> RepT:
            return await client.call(self, message, timeout=timeout)


        return call


class ServiceClient:
    """A typed client of one service (`service`: its subject token) on one node. Every
    service serves `health` (each replica answers: `health_of_all`) and `ping`."""

    service: ClassVar[str]
    health = Verb("health", HealthRequest, HealthReply, attempt_timeout=PROBE_TIMEOUT,
                  retries=1, wait_for_service=False)
    ping = Verb("ping", PingRequest, PingReply, attempt_timeout=PROBE_TIMEOUT,
                wait_for_service=False)

    def __init__(self, bus: Bus, *, namespace: str | None = None,
                 node: str | None = None) -> None:
        self.bus = bus
        self.namespace = namespace
        self.node = node

    async def call(self, verb: Verb[ReqT, RepT], message: ReqT, *,
                   timeout: float | None = None, attempt_timeout: float | None = None
                   ) -> RepT:
        """Send `message` as `verb`; `timeout`/`attempt_timeout` override the declared ones
        for a call whose budget depends on its request (a stop's grace period)."""
        if not isinstance(message, verb.request):
            raise TypeError(f"{self.service}.{verb.name} takes {verb.request.__name__}, "
                            f"not {type(message).__name__}")
        total = timeout if timeout is not None else verb.timeout
        attempt = attempt_timeout or verb.attempt_timeout
        if verb.retries == 0 and timeout is not None and attempt_timeout is None:
            attempt = timeout  # a verb sent once waits for its whole budget
        return await self.bus.request(
            self.service, verb.name, message, verb.reply, node=self.node,
            namespace=self.namespace, timeout=total, attempt_timeout=attempt,
            retries=verb.retries, wait_for_service=verb.wait_for_service)

    async def health_of_all(self, wait: float = 1.0) -> list[HealthReply]:
        """Every replica's health answer that arrives within `wait` seconds."""
        return await self.bus.gather(self.service, "health", HealthRequest(), HealthReply,
                                     node=self.node, wait=wait)

    @classmethod
    def verbs(cls) -> dict[str, Verb[Any, Any]]:
        return {v.name: v for k in reversed(cls.__mro__) for v in vars(k).values()
                if isinstance(v, Verb)}


def check_router(client: type[ServiceClient], router: Router[Any]) -> None:
    """Every command a service serves is a declared verb of its client with the same
    request type, and the handler returns the declared reply: raise at start otherwise."""
    declared = client.verbs()
    for verb, cmd in router.commands.items():
        decl = declared.get(verb)
        if decl is None:
            raise TypeError(f"{client.service}.{verb} is served but not declared in "
                            f"{client.__name__}")
        reply = typing.get_type_hints(cmd.handler).get("return")
        if cmd.request_type is not decl.request or reply is not decl.reply:
            raise TypeError(f"{client.service}.{verb}: handler takes "
                            f"{cmd.request_type.__name__} -> {getattr(reply, '__name__', reply)}"
                            f", declared {decl.request.__name__} -> {decl.reply.__name__}")
