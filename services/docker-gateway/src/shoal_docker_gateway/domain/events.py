"""`docker events`: Docker's events, kept by the events stream.

The gateway publishes one `docker.event` for each thing it does, as dockerd does (create,
stop, kill, destroy, pull, tag, volume and network changes...), after it is done; a failure
to publish is logged, never the user's error. `start` and `die` come from the supervisor's
`tasks.start` and `tasks.exit` (in the stream's order) through the gateway's durable
consumer: a run by the restart policy is reported, and so is an exit while the gateway is
down, when it is back (as dockerd reports the exits containerd saw while it was away).
Where Docker's order puts an event of the gateway's after one of those (`stop` and
`destroy` after `die`, `restart` after `start`), the gateway waits a moment for the
consumer (`Seen`). `GET /events` reads them back with an ordered consumer, from `since`
(replayed from the stream) to `until`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
import structlog
from nats.js.api import ConsumerConfig, DeliverPolicy
from shoal_common import codec, subjects
from shoal_common.consumer import Delivery, EventConsumer
from shoal_common.errors import Invalid
from shoal_common.messages.docker import MAX_ATTRIBUTES, DockerEvent
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
MAX_VALUE = 4096  # DockerEvent's Printable
MAX_ACTION_TEXT = 512  # after "exec_start: "
QUEUED = 256  # events read ahead of a slow client (then JetStream's flow control holds)
REPLAY_POLL = 2.0  # seconds between looks at where a replay is, once `until` has passed
STORED_LATE = 1.0  # an event stored this long after `until` ends the replay
MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _printable(text: str, limit: int = MAX_VALUE) -> str:
    """What a DockerEvent field may carry: a label's newline would drop the whole event."""
    return CONTROL.sub(" ", text)[:limit]


def container_attrs(rec: ContainerRecord, **extra: str) -> dict[str, str]:
    """Docker's attributes of a container event: its labels (the image's, then the
    client's, as its Config.Labels), the image as the client named it, and its name."""
    labels: dict[str, str] = {}
    for source in (rec.config.get("Shoal", {}).get("ImageLabels"), rec.config.get("Labels")):
        if isinstance(source, dict):
            labels.update({str(k): str(v) for k, v in source.items()})
    return {**labels, "image": rec.image, "name": rec.name, **extra}


def exec_action(verb: str, cmd: Sequence[str]) -> str:
    """`exec_create: sh -c echo hi`, as dockerd writes it (entrypoint, a space, the args
    joined by spaces: not shell quoting)."""
    text = f"{cmd[0] if cmd else ''} {' '.join(cmd[1:])}"
    return f"{verb}: {_printable(text, MAX_ACTION_TEXT)}"


def _event(kind: str, action: str, actor_id: str, attributes: dict[str, str] | None
           ) -> DockerEvent:
    verb, sep, text = action.partition(": ")
    action = verb + sep + _printable(text, MAX_ACTION_TEXT)
    items = list((attributes or {}).items())
    # The fields the type is known by (name, image, exitCode...) are last: kept first.
    kept = dict(items[-MAX_ATTRIBUTES:]) if len(items) > MAX_ATTRIBUTES else dict(items)
    attrs = {_printable(str(k)): _printable(str(v)) for k, v in kept.items()}
    return msgspec.convert(dict(type=kind, action=action, actor_id=_printable(actor_id),
                                time_nano=time.time_ns(), attributes=attrs), DockerEvent)


async def publish(backend: Backend, kind: str, action: str, actor_id: str,
                  attributes: dict[str, str] | None = None, *, event_id: str | None = None
                  ) -> None:
    """One event on the stream; raises when it could not be published."""
    await backend.bus.publish_event(_event(kind, action, actor_id, attributes),
                                    namespace=backend.namespace, event_id=event_id)


async def emit(backend: Backend, kind: str, action: str, actor_id: str,
               attributes: dict[str, str] | None = None) -> None:
    """Docker's event of what the gateway just did: a failure to publish it is logged,
    never the error of the user's operation, which is done."""
    try:
        await publish(backend, kind, action, actor_id, attributes)
    except Exception as exc:  # the bus away, an event that does not fit: logged only
        log.warning("docker event not published", type=kind, action=action[:64],
                    actor=actor_id[:80], error=str(exc) or type(exc).__name__)


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
        if found is None or time.monotonic() - found[0] >= GONE_KEPT:
            return None
        return found[1], found[2]


def _task_event(delivery: Delivery) -> TaskStarted | TaskExited:
    """The supervisor's event; a malformed one is a permanent failure (Invalid: the
    consumer terminates it, logged, rather than have it redelivered)."""
    try:
        if delivery.topic == TaskStarted.TOPIC:
            return codec.decode(delivery.data, TaskStarted)
        return codec.decode(delivery.data, TaskExited)
    except Invalid as exc:
        log.warning("malformed task event", topic=delivery.topic, seq=delivery.seq,
                    error=exc.message)
        raise


def task_consumer(backend: Backend) -> EventConsumer:
    """`start` and `die` for every run of a Docker container's task, none lost while we
    are away; one at a time, so in the stream's order."""
    from shoal_docker_gateway.store.containers import Containers

    async def on_task(delivery: Delivery) -> None:
        if delivery.namespace != backend.namespace:
            return
        event = _task_event(delivery)
        rec = await Containers(backend.records).by_cri_id(event.id)
        found = (rec.id, container_attrs(rec)) if rec else backend.gone.get(event.id)
        if found is None:
            return  # a pause task, a build step, an exec: not a Docker container
        action, attrs = "start", found[1]
        if isinstance(event, TaskExited):
            action, attrs = "die", {**attrs, "exitCode": str(event.exit_code)}
        # Raises when not published: redelivered, and de-duplicated by the event id.
        await publish(backend, "container", action, found[0], attrs,
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
    bad = BadParameter(f"invalid value for {name}: {text[:64]!r}: expected unix seconds "
                       "or an RFC 3339 time")
    seconds, _, fraction = text.partition(".")
    if seconds.lstrip("-").isdigit() and (not fraction or fraction.isdigit()) and \
            len(seconds) <= 12 and len(fraction) <= 9:
        value = int(seconds) + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)
    else:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise bad from None
        value = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    if value > MAX_TIME:
        raise bad  # a start time JetStream (and datetime) cannot take
    return value


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


@dataclass(frozen=True)
class _Delivered:
    event: DockerEvent | None  # None: a malformed one, skipped
    seq: int  # in the stream
    pending: int  # the stream's matching messages after this one when it was sent
    stored: float  # when the stream stored it


class _Replay:
    """Where the ordered consumer is in the stream: the replay of what is stored before
    `until` is over when nothing was pending after what we got."""

    def __init__(self, sub: Any) -> None:
        self.sub = sub
        self.last_seq = 0
        self.caught_up_at = 0.0  # when a message came with nothing pending after it

    def got(self, item: _Delivered) -> None:
        self.last_seq = item.seq
        if item.pending == 0:
            self.caught_up_at = time.time()

    async def done(self, until: float) -> bool:
        if self.caught_up_at >= until:
            return True  # nothing was left to send once `until` had passed
        try:
            info = await self.sub.consumer_info()
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("docker events: where the replay is is unknown; ending it",
                        error=str(exc) or type(exc).__name__)
            return True
        delivered = info.delivered
        sent_all = delivered is None or not delivered.consumer_seq or \
            (delivered.stream_seq or 0) <= self.last_seq
        return not info.num_pending and sent_all


async def _subscribe(backend: Backend, since: float | None,
                     queue: asyncio.Queue[_Delivered]) -> Any:
    async def on_event(msg: Any) -> None:
        meta = msg.metadata
        try:
            event: DockerEvent | None = codec.decode(msg.data, DockerEvent)
        except Invalid:
            event = None  # not the gateway's doing: skipped
        # Awaited: a slow client holds the consumer (flow control), not our memory.
        await queue.put(_Delivered(event, meta.sequence.stream, meta.num_pending,
                                   meta.timestamp.timestamp()))

    if since is not None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME,
                                opt_start_time=datetime.fromtimestamp(max(since, 0.0), UTC))
    else:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
    return await backend.bus.js.subscribe(
        subjects.event(backend.node_id, backend.namespace, DockerEvent.TOPIC), cb=on_event,
        ordered_consumer=True, config=config)


async def _next(queue: asyncio.Queue[_Delivered], replay: _Replay, until: float | None
                ) -> _Delivered | None:
    """The next stored event, or None once `until` has passed and what the stream held
    before it has been read."""
    while True:
        timeout = None
        if until is not None:
            timeout = until - time.time()
            if timeout <= 0:
                if queue.empty() and await replay.done(until):
                    return None
                timeout = REPLAY_POLL
        try:
            item = await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            continue
        replay.got(item)
        return item


async def stream(backend: Backend, since: float | None, until: float | None,
                 filters: Filters) -> AsyncIterator[dict[str, Any]]:
    """The matching events from `since` (or from now) until `until` (or forever)."""
    queue: asyncio.Queue[_Delivered] = asyncio.Queue(maxsize=QUEUED)
    sub = await _subscribe(backend, since, queue)
    replay = _Replay(sub)
    try:
        while (item := await _next(queue, replay, until)) is not None:
            if until is not None and item.stored > until + STORED_LATE:
                return  # the stream is in stored order: the rest is later still
            ev = item.event
            if ev is None or (since is not None and ev.time_nano / 1e9 < since) or \
                    (until is not None and ev.time_nano / 1e9 > until):
                continue
            if matches(filters, ev):
                yield message(ev)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
