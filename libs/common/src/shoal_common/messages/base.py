"""Base classes for every message on the bus; each concrete type is declared once."""

from __future__ import annotations

import msgspec


class Message(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A command request or reply body. Unknown fields are ignored (newer senders), while a
    wrong type or a missing required field is refused with an `invalid` reply.

    msgspec does not pass `kw_only` on to subclasses: declare required fields first."""


class Event(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The body of an event on `shoal.v1.<node>.events.<namespace>.<topic>`.

    `TOPIC` names the containerd topic; id, time, namespace and trace travel in headers."""

    TOPIC = ""
