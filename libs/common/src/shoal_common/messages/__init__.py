"""Every message type on the bus, declared once (see each module).

Domain messages are imported from their modules (`shoal_common.messages.images`); this
package re-exports the base classes and those every service uses."""

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
