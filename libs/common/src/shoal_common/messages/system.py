"""Messages every service answers: health, ping, and the error reply body."""

from __future__ import annotations

from typing import Annotated

import msgspec

from shoal_common.messages.base import Message


class ErrorBody(Message):
    code: str
    message: str
    details: dict[str, str] = {}


class Empty(Message):
    pass


class HealthRequest(Message):
    pass


class HealthReply(Message):
    service: str
    node: str
    replica: str
    version: str
    pid: int
    uptime_seconds: float
    started_at: float
    metrics_addr: str
    in_flight: int
    status: str = "serving"  # "serving" or "stopping"


class PingRequest(Message):
    """A bus round trip through one replica of a service, for latency probes (`shoal ping`)."""

    payload: bytes = b""
    # Lets an operator see how requests spread across replicas under load.
    delay_ms: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0


class PingReply(Message):
    payload: bytes
    replica: str
