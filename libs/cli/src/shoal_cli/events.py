"""`shoal events`: tail the events stream live, filter by topic and namespace, replay from a
time, on this node or on every node sharing the NATS cluster."""

from __future__ import annotations

import asyncio
import importlib
import json
import pkgutil
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import nats.errors
from nats.js.api import ConsumerConfig, DeliverPolicy
from shoal_common import headers, subjects
from shoal_common.bus import Bus
from shoal_common.config import Config
from shoal_common.messages import Event


def event_types() -> dict[str, type[Event]]:
    """Every event type declared in shoal_common.messages, by topic."""
    import shoal_common.messages as pkg

    out: dict[str, type[Event]] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"shoal_common.messages.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Event) and value.TOPIC:
                out[value.TOPIC] = value
    return out


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`10m`, `2h`, `30s`, `1d` ago, or an ISO 8601 time."""
    now = now or datetime.now(UTC)
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return now - timedelta(**{unit: int(match.group(1))})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"shoal events: --since {text!r}: want e.g. 10m, 2h or an ISO "
                         "time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _filters(config: Config, all_nodes: bool, namespace: str | None,
             topics: list[str]) -> list[str]:
    node = "*" if all_nodes else config.node_id
    return [subjects.event_filter(node, namespace, t) for t in (topics or [None])]  # type: ignore[list-item]


def render(subject: str, hdrs: dict[str, str], data: bytes, types: dict[str, type[Event]],
           as_json: bool) -> str:
    node, namespace, topic = subjects.parse_event(subject)
    stamp = hdrs.get(headers.TIMESTAMP, "")
    when = (datetime.fromtimestamp(float(stamp), UTC).isoformat(timespec="milliseconds")
            if stamp else "")
    body: Any
    typ = types.get(topic)
    try:
        body = msgspec.to_builtins(msgspec.msgpack.decode(data, type=typ)) if typ else \
            msgspec.msgpack.decode(data)
    except msgspec.DecodeError:
        body = {"undecodable": len(data)}
    if as_json:
        return json.dumps({"time": when, "node": node, "namespace": namespace, "topic": topic,
                           "source": hdrs.get(headers.SOURCE, ""), "event": body},
                          default=str)
    summary = " ".join(f"{k}={v}" for k, v in (body or {}).items()
                       if not isinstance(v, (list, dict, bytes)))
    return f"{when} {node} {namespace} {topic} {summary}"


async def tail(config: Config, bus: Bus, *, all_nodes: bool, namespace: str | None,
               topics: list[str], since: str | None, follow: bool, as_json: bool) -> int:
    types = event_types()
    filters = _filters(config, all_nodes, namespace, topics)
    policy: dict[str, Any]
    if since:
        policy = {"deliver_policy": DeliverPolicy.BY_START_TIME,
                  "opt_start_time": parse_since(since).isoformat().replace("+00:00", "Z")}
    else:
        policy = {"deliver_policy": DeliverPolicy.NEW}
    # An ordered push consumer is ephemeral: nothing is left on the server afterwards.
    sub = await bus.js.subscribe(
        filters[0], ordered_consumer=True,
        config=ConsumerConfig(filter_subjects=filters if len(filters) > 1 else None,
                              **policy))
    shown = 0
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0 if not follow else 3600)
            except (TimeoutError, nats.errors.TimeoutError):
                if follow:
                    continue
                break  # replayed everything there was
            print(render(msg.subject, msg.headers or {}, msg.data, types, as_json),
                  flush=True)
            shown += 1
    except asyncio.CancelledError:
        pass
    finally:
        await sub.unsubscribe()
    if not shown and not follow:
        print("no events", file=sys.stderr)
    return 0
