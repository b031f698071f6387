"""Every message type on the bus, declared once (see each module)."""

from shoal_common.messages.base import Event, Message
from shoal_common.messages.runtime import (
    ComponentStatus,
    RuntimeStatusReply,
    RuntimeStatusRequest,
)
from shoal_common.messages.system import (
    Empty,
    ErrorBody,
    HealthReply,
    HealthRequest,
    PingReply,
    PingRequest,
)

__all__ = [
    "ComponentStatus",
    "Empty",
    "ErrorBody",
    "Event",
    "HealthReply",
    "HealthRequest",
    "Message",
    "PingReply",
    "PingRequest",
    "RuntimeStatusReply",
    "RuntimeStatusRequest",
]
