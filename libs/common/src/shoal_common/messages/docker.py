"""Docker's own events (`docker events`), published by the Docker gateway on
`shoal.v1.<node>.events.<namespace>.docker.event`, so they are kept by the events stream
and replayed for `--since` like every other fact. No other service acts on them (the
gateway may publish nothing else), so a forged one misleads only `docker events`."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from shoal_common.messages.base import Event
from shoal_common.messages.fields import Printable

DockerEventType = Annotated[str, Meta(
    pattern=r"\A(container|image|volume|network|builder|daemon|plugin)\Z")]
DockerAction = Annotated[str, Meta(pattern=r"\A[a-z_]{1,32}(: .{0,512})?\Z")]
MAX_ATTRIBUTES = 256


class DockerEvent(Event):
    TOPIC = "docker.event"
    type: DockerEventType
    action: DockerAction  # Docker's names: create, start, die, pull, exec_start: sh, ...
    actor_id: Printable  # a container or network id, an image reference, a volume name
    time_nano: Annotated[int, Meta(ge=0)]
    attributes: Annotated[dict[Printable, Printable], Meta(max_length=MAX_ATTRIBUTES)] = {}
