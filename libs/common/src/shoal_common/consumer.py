"""Consuming events from JetStream: the one way a service reacts to other services' facts.

A durable *pull* consumer per (service, node) on the events stream: every replica fetching
from one durable consumer is exactly "replicas share the events" without deliver groups,
and a restarted replica resumes where the consumer is. Each message is acked only after its
handler finished; a failing handler's message is nak'ed with a growing delay, or terminated
when the error is permanent or the delivery budget (`max_deliver`) is spent, so a bad input
is not redelivered forever. While a handler runs, `in_progress` keeps the message from being
redelivered to another replica; if the process dies, the server redelivers it after
`ack_wait`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shoal_common import headers, metrics, subjects
from shoal_common.bus import Bus
from shoal_common.errors import FailedPrecondition, Invalid, NotFound
from shoal_common.messages.namespaces import valid_namespace
from shoal_common.tracing import bind_trace, new_trace_id

log = structlog.get_logger("shoal.events")
LAG_INTERVAL = 5.0  # seconds between consumer_info calls for the lag gauge


def permanent_by_default(exc: BaseException) -> bool:
    """Bad input, something gone, a conflicting state: retrying cannot help."""
    return isinstance(exc, (Invalid, NotFound, FailedPrecondition))


@dataclass(frozen=True)
class Delivery:
    """One event as a handler sees it."""

    topic: str
    namespace: str
    data: bytes
    seq: int  # stream sequence: orders events across redeliveries
    attempt: int  # 1 for the first delivery
    stored: float = 0.0  # when the stream stored it (Unix time, the server's clock)


Handler = Callable[[Delivery], Awaitable[None]]


class EventConsumer:
    def __init__(self, bus: Bus, *, durable: str, topics: Sequence[str], handler: Handler,
                 permanent: Callable[[BaseException], bool] = permanent_by_default,
                 concurrency: int = 4,
                 ack_wait: float = 30.0, max_deliver: int = 6,
                 backoff: Sequence[float] = (2.0, 5.0, 15.0, 30.0, 60.0)) -> None:
        self.bus = bus
        self.durable = durable
        self.filters = [subjects.event_filter(bus.node, topic=t) for t in topics]
        self.handler = handler
        self.permanent = permanent
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.backoff = backoff
        self._slots = asyncio.Semaphore(concurrency)
        self._stopping = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        stream = self.bus.config.events.stream
        config = ConsumerConfig(
            name=self.durable, durable_name=self.durable, filter_subjects=self.filters,
            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait, max_deliver=self.max_deliver, max_ack_pending=1024)

        async def create_or_update() -> None:
            # Replicas race here harmlessly, and a changed ack_wait applies.
            try:
                await self.bus.js.add_consumer(stream, config)
            except nats.js.errors.BadRequestError as exc:
                # e.g. a setting the server cannot change on an existing consumer: use it.
                log.warning("could not create or update the events consumer; binding to it",
                            consumer=self.durable, error=exc.description)

        await self.bus.until_jetstream_ready("the events consumer setup", create_or_update)
        sub = await self.bus.js.pull_subscribe_bind(durable=self.durable, stream=stream)
        self._loop_task = asyncio.create_task(self._fetch_loop(sub))
        log.info("consuming events", consumer=self.durable, subjects=self.filters)

    async def stop(self, timeout: float) -> None:
        """Stop fetching; give handlers `timeout` to finish, then cancel them (their messages
        are nak'ed so another replica takes them at once)."""
        self._stopping.set()
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5.0)

    async def _report_lag(self) -> None:
        stream = self.bus.config.events.stream
        try:
            info = await self.bus.js.consumer_info(stream, self.durable, timeout=2)
        except (nats.errors.Error, TimeoutError):
            return
        metrics.EVENTS_PENDING.labels(self.durable).set(
            (info.num_pending or 0) + (info.num_ack_pending or 0))

    async def _fetch_loop(self, sub: nats.js.JetStreamContext.PullSubscription) -> None:
        lag_checked = 0.0
        try:
            while not self._stopping.is_set():
                if time.monotonic() - lag_checked > LAG_INTERVAL:
                    lag_checked = time.monotonic()
                    await self._report_lag()
                await self._slots.acquire()
                try:
                    msgs = await sub.fetch(1, timeout=1.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    self._slots.release()
                    continue
                except Exception as exc:  # reconnecting, consumer gone...: keep trying
                    self._slots.release()
                    if not self._stopping.is_set():
                        log.warning("fetching events failed", error=str(exc) or repr(exc))
                        await asyncio.sleep(1.0)
                    continue
                if not msgs:
                    self._slots.release()
                for msg in msgs[:1]:  # one slot was taken for the one message asked for
                    task = asyncio.create_task(self._handle(msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._finished)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _handle(self, msg: Msg) -> None:
        hdrs = msg.headers or {}
        try:
            _, ns_token, topic = subjects.parse_event(msg.subject)
        except ValueError:
            await msg.term()
            return
        meta = msg.metadata
        delivery = Delivery(topic=hdrs.get(headers.TOPIC, topic),
                            namespace=hdrs.get(headers.NAMESPACE, ns_token), data=msg.data,
                            seq=meta.sequence.stream, attempt=meta.num_delivered,
                            stored=meta.timestamp.timestamp())
        if not valid_namespace(delivery.namespace):  # handlers key names by it
            log.error("event with an invalid namespace; dropped", topic=delivery.topic,
                      seq=delivery.seq)
            await self._settle(msg.term, delivery, "term")
            return
        bind_trace(hdrs.get(headers.TRACE_ID) or new_trace_id(), None, subject=delivery.topic,
                   namespace=delivery.namespace)
        beat = asyncio.create_task(self._keep_alive(msg))
        try:
            await self.handler(delivery)
        except asyncio.CancelledError:
            with contextlib.suppress(nats.errors.Error):
                await msg.nak()
            metrics.EVENTS_CONSUMED.labels(delivery.topic, "nak").inc()
            raise
        except Exception as exc:
            await self._failed(msg, delivery, exc)
        else:
            await self._settle(msg.ack, delivery, "ack")
        finally:
            beat.cancel()

    async def _failed(self, msg: Msg, d: Delivery, exc: Exception) -> None:
        error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        if self.permanent(exc) or d.attempt >= self.max_deliver:
            log.error("event handling failed; giving up", topic=d.topic, seq=d.seq,
                      attempt=d.attempt, error=error)
            await self._settle(msg.term, d, "term")
            return
        delay = self.backoff[min(d.attempt, len(self.backoff)) - 1]
        log.warning("event handling failed; will retry", topic=d.topic, seq=d.seq,
                    attempt=d.attempt, retry_in=delay, error=error,
                    **({"exc_info": exc} if not hasattr(exc, "message") else {}))
        await self._settle(lambda: msg.nak(delay=delay), d, "nak")

    async def _settle(self, fn: Callable[[], Awaitable[None]], d: Delivery, outcome: str) -> None:
        try:
            await fn()
        except nats.errors.Error as exc:  # the server redelivers after ack_wait
            log.warning("could not settle event", outcome=outcome, seq=d.seq, error=str(exc))
        metrics.EVENTS_CONSUMED.labels(d.topic, outcome).inc()

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            with contextlib.suppress(nats.errors.Error):
                await msg.in_progress()
