"""`docker events`: Docker's events, kept by the events stream.

The gateway publishes one `docker.event` for each thing it does, as dockerd does (create,
start, stop, kill, destroy, pull, tag, volume and network changes...), after it is done; a
failure to publish is logged, never the user's error. `start` and `die` come from the
supervisor's `tasks.start` and `tasks.exit` (in the stream's order) through the gateway's
durable consumer: a run by the restart policy is reported, and so is an exit while the
gateway is down, when it is back. Where Docker's order puts an event of the gateway's after
one of those (`stop` and `destroy` after `die`, `restart` after `start`), the gateway waits
a moment for the consumer (`Seen`). `GET /events` reads them back with an ordered consumer, from
`since` (replayed from the stream) to `until`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
import structlog
from nats.js.api import ConsumerConfig, DeliverPolicy
from shoal_common import codec, subjects
from shoal_common.consumer import Delivery, EventConsumer
from shoal_common.errors import Invalid, ShoalError
from shoal_common.messages.docker import DockerEvent
from shoal_common.messages.monitor import TaskExited, TaskStarted

from shoal_docker_gateway.domain.events_filters import Filters
from shoal_docker_gateway.errors import BadParameter

if TYPE_CHECKING:
    from shoal_docker_gateway.domain.backend import Backend
    from shoal_docker_gateway.store.containers import ContainerRecord

log = structlog.get_logger("shoal.docker")

FILTERS = ("container", "event", "image", "label", "network", "type", "volume", "daemon",
           "scope", "plugin", "node", "service", "secret", "config")
GONE_KEPT = 120.0  # seconds a removed container's attributes are kept for its `die`
ORDER_WAIT = 3.0  # at most, for the consumer's event that comes before ours
CAUGHT_UP_IDLE = 0.3  # with `until` passed: no event for this long = the replay is over
MAX_VALUE = 4096


def container_attrs(rec: ContainerRecord, **extra: str) -> dict[str, str]:
    """Docker's attributes of a container event: its labels, image and name."""
    labels = rec.config.get("Labels")
    labels = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
    return {**labels, "image": rec.image, "name": rec.name, **extra}


async def emit(backend: Backend, kind: str, action: str, actor_id: str,
               attributes: dict[str, str] | None = None, *, event_id: str | None = None
               ) -> None:
    attrs = {k[:MAX_VALUE]: str(v)[:MAX_VALUE] for k, v in (attributes or {}).items()}
    try:
        event = msgspec.convert(dict(type=kind, action=action[:500], actor_id=actor_id,
                                     time_nano=time.time_ns(), attributes=attrs),
                                DockerEvent)
        await backend.bus.publish_event(event, namespace=backend.namespace,
                                        event_id=event_id)
    except (ShoalError, msgspec.ValidationError) as exc:
        log.warning("docker event not published", type=kind, action=action,
                    error=str(exc))


async def container(backend: Backend, rec: ContainerRecord, action: str,
                    **extra: str) -> None:
    await emit(backend, "container", action, rec.id, container_attrs(rec, **extra))


class Seen:
    """The consumer's `start`/`die` per container since an action asked to be told."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[str, str], asyncio.Event] = {}

    def expect(self, cid: str, action: str) -> None:
        self._waiting.setdefault((cid, action), asyncio.Event())

    def mark(self, cid: str, action: str) -> None:
        event = self._waiting.get((cid, action))
        if event is not None:
            event.set()

    async def wait(self, cid: str, action: str) -> None:
        event = self._waiting.get((cid, action))
        if event is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), ORDER_WAIT)
        self._waiting.pop((cid, action), None)


class Gone:
    """Containers removed a moment ago, by CRI container id: an `rm -f` of a running one
    removes its row before the supervisor's exit of it arrives."""

    def __init__(self) -> None:
        self._by_cri: dict[str, tuple[float, str, dict[str, str]]] = {}

    def add(self, rec: ContainerRecord) -> None:
        now = time.monotonic()
        self._by_cri = {k: v for k, v in self._by_cri.items() if now - v[0] < GONE_KEPT}
        if rec.cri_id:
            self._by_cri[rec.cri_id] = (now, rec.id, container_attrs(rec))

    def get(self, cri_id: str) -> tuple[str, dict[str, str]] | None:
        found = self._by_cri.get(cri_id)
        return (found[1], found[2]) if found else None


def task_consumer(backend: Backend) -> EventConsumer:
    """`start` and `die` for every run of a Docker container's task, none lost while we
    are away; one at a time, so in the stream's order."""
    from shoal_docker_gateway.store.containers import Containers

    async def on_task(delivery: Delivery) -> None:
        if delivery.namespace != backend.namespace:
            return
        event: TaskStarted | TaskExited
        try:
            if delivery.topic == TaskStarted.TOPIC:
                event = codec.decode(delivery.data, TaskStarted)
            else:
                event = codec.decode(delivery.data, TaskExited)
        except Invalid as exc:
            log.warning("malformed task event skipped", topic=delivery.topic,
                        error=exc.message)
            return
        rec = await Containers(backend.records).by_cri_id(event.id)
        found = (rec.id, container_attrs(rec)) if rec else backend.gone.get(event.id)
        if found is None:
            return  # a pause task, or not a Docker container
        action, attrs = "start", found[1]
        if isinstance(event, TaskExited):
            action, attrs = "die", {**attrs, "exitCode": str(event.exit_code)}
        await emit(backend, "container", action, found[0], attrs,
                   event_id=f"docker-{action}-{delivery.seq}")
        backend.seen.mark(found[0], action)

    return EventConsumer(backend.bus, durable=f"docker-gateway-{backend.node_id}",
                         topics=[TaskStarted.TOPIC, TaskExited.TOPIC], handler=on_task,
                         concurrency=1)


# -- reading them back -----------------------------------------------------------------------


def parse_time(text: str, name: str) -> float | None:
    """`since`/`until` as the CLI sends them (unix seconds, with an optional fraction of up
    to nine digits) or RFC 3339; None when absent."""
    if not text:
        return None
    seconds, _, fraction = text.partition(".")
    if seconds.lstrip("-").isdigit() and (not fraction or fraction.isdigit()) and \
            len(seconds) <= 12 and len(fraction) <= 9:
        return int(seconds) + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise BadParameter(f"invalid value for {name}: {text[:64]!r}: expected unix seconds "
                           "or an RFC 3339 time") from None


def _fuzzy(filters: Filters, key: str, *values: str) -> bool:
    wanted = filters.get(key)
    if not wanted:
        return True
    return any(v and v.startswith(w) for w in wanted for v in values)


def _image_match(filters: Filters, ev: DockerEvent) -> bool:
    wanted = filters.get("image")
    if not wanted:
        return True
    names = {ev.attributes.get("image", "")} if ev.type == "container" else \
        {ev.actor_id, ev.attributes.get("name", "")}
    names |= {n.removesuffix(":latest") for n in names}
    return any(w in names or w.removesuffix(":latest") in names for w in wanted)


def _labels_match(filters: Filters, attrs: dict[str, str]) -> bool:
    for item in filters.get("label", []):
        key, sep, value = item.partition("=")
        if key not in attrs or (sep and attrs[key] != value):
            return False
    return True


def matches(filters: Filters, ev: DockerEvent) -> bool:
    """Docker's rules: each key's values OR-ed, the keys AND-ed; a key about one type of
    object (container, volume, network) lets no event of another type through."""
    name = ev.attributes.get("name", "")
    action = ev.action.split(":", 1)[0]
    checks = (
        not filters.get("event") or ev.action in filters["event"] or
        action in filters["event"],
        not filters.get("type") or ev.type in filters["type"],
        not filters.get("scope") or "local" in filters["scope"],
        not filters.get("daemon") or ev.type == "daemon",
        (ev.type == "container" and _fuzzy(filters, "container", ev.actor_id, name))
        if filters.get("container") else True,
        (ev.type == "volume" and _fuzzy(filters, "volume", ev.actor_id))
        if filters.get("volume") else True,
        (ev.type == "network" and _fuzzy(filters, "network", ev.actor_id, name))
        if filters.get("network") else True,
        _image_match(filters, ev),
        _labels_match(filters, ev.attributes),
        not any(filters.get(k) for k in ("plugin", "node", "service", "secret", "config")),
    )
    return all(checks)


def message(ev: DockerEvent) -> dict[str, Any]:
    """The JSON of one event, as the Engine API 1.41 gives it."""
    out: dict[str, Any] = {}
    if ev.type in ("container", "image"):
        out = {"status": ev.action, "id": ev.actor_id}
        if ev.type == "container" and "image" in ev.attributes:
            out["from"] = ev.attributes["image"]
    out.update({"Type": ev.type, "Action": ev.action,
                "Actor": {"ID": ev.actor_id, "Attributes": ev.attributes},
                "scope": "local", "time": ev.time_nano // 10**9, "timeNano": ev.time_nano})
    return out


async def stream(backend: Backend, since: float | None, until: float | None,
                 filters: Filters) -> AsyncIterator[dict[str, Any]]:
    """The matching events from `since` (or from now) until `until` (or forever)."""
    queue: asyncio.Queue[DockerEvent] = asyncio.Queue()

    async def on_event(msg: Any) -> None:
        with contextlib.suppress(Exception):  # a malformed event is one we skip
            queue.put_nowait(codec.decode(msg.data, DockerEvent))

    if since is not None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME,
                                opt_start_time=datetime.fromtimestamp(max(since, 0.0), UTC))
    else:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
    sub = await backend.bus.js.subscribe(
        subjects.event(backend.node_id, backend.namespace, DockerEvent.TOPIC), cb=on_event,
        ordered_consumer=True, config=config)
    try:
        while True:
            timeout = None
            if until is not None:
                timeout = max(until - time.time(), 0.0) + CAUGHT_UP_IDLE
            try:
                ev = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                return  # `until` has passed and the replay sent everything before it
            if until is not None and ev.time_nano / 1e9 > until:
                return
            if since is not None and ev.time_nano / 1e9 < since:
                continue
            if matches(filters, ev):
                yield message(ev)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
