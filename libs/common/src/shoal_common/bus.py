"""The bus: NATS request/reply commands served in queue groups, and JetStream events.

One way to define a command handler (`Router.command`), one way to send a command
(`Bus.request`), one way to publish an event (`Bus.publish_event`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from shoal_common import codec, headers, metrics, nats_auth, subjects
from shoal_common.config import Config
from shoal_common.errors import (
    RETRYABLE,
    DeadlineExceeded,
    ErrorCode,
    Internal,
    Invalid,
    ShoalError,
    Unavailable,
)
from shoal_common.messages import ErrorBody, Event, Message
from shoal_common.messages.namespaces import check_namespace, valid_namespace
from shoal_common.router import Command, RequestContext, Router
from shoal_common.tracing import bind_trace, current_trace_id, deadline_var, new_trace_id

AppT = TypeVar("AppT")
ReqT = TypeVar("ReqT", bound=Message)
RepT = TypeVar("RepT", bound=Message)
T = TypeVar("T")

DEFAULT_NAMESPACE = "default"
DRAIN_TIMEOUT = 2.0
# A request in flight is resent at a replica's start announcement only if it went out at
# least this long before it: a restart (a death noticed, a fork, a connect) takes longer.
RESEND_BEFORE_START = 0.05
log = structlog.get_logger("shoal.bus")

# Services import what they declare handlers with from here, beside the Bus itself.
__all__ = ["DEFAULT_NAMESPACE", "Bus", "RequestContext", "Router"]


class ConnectionDropped(Exception):
    """The reply to an attempt in flight is lost: the NATS connection dropped, or a replica
    of the service announced its start (it may be the one that died holding the request)."""


class Bus:
    """A service's (or a client's) connection to NATS."""

    def __init__(self, config: Config, *, service: str, replica: str,
                 max_concurrency: int = 64) -> None:
        self.config = config
        self.node = config.node_id
        self.service = service  # subject token, e.g. "images"
        self.replica = replica
        self.nc: NatsClient = NatsClient()
        self._js: JetStreamContext | None = None
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_concurrency)
        self.serving = False
        self._closing = False
        # Set (and replaced) when the connection drops: a reply due to an attempt in flight
        # then is lost for good (NATS does not keep it), so the attempt is over at once.
        self._dropped = asyncio.Event()
        self._up = asyncio.Event()  # connected (not reconnecting)
        self._restarted: dict[str, asyncio.Event] = {}  # service token -> set at a start
        self._started_at: dict[str, float] = {}  # service token -> its last start's time

    # -- connection ------------------------------------------------------------------------

    async def connect(self, *, wait: float = 60.0) -> None:
        """Connect, retrying for up to `wait` seconds (NATS may still be starting); once
        connected, nats-py reconnects forever and buffers publishes meanwhile."""

        async def on_disconnect() -> None:
            self._up.clear()
            self._dropped.set()
            self._dropped = asyncio.Event()
            if not self._closing:
                log.warning("nats disconnected")

        async def on_reconnect() -> None:
            metrics.BUS_RECONNECTS.inc()
            self._up.set()
            log.info("nats reconnected", url=str(self.nc.connected_url))

        async def on_error(exc: Exception) -> None:
            log.warning("nats error", error=str(exc))

        cfg = self.config.nats
        auth = nats_auth.connect_options(cfg)
        give_up = time.monotonic() + wait
        delay = 0.1
        while True:
            try:
                await self.nc.connect(
                    servers=cfg.url.split(","),
                    name=f"shoal-{self.service}-{self.replica}", **auth,
                    # nats-py annotates both as int but uses them as float seconds.
                    connect_timeout=self.config.nats.connect_timeout,  # type: ignore[arg-type]
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]
                    allow_reconnect=True,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    error_cb=on_error,
                )
                await self.nc.subscribe(subjects.started(self.node, "*"), cb=self._on_started)
                self._up.set()
                return
            except (TimeoutError, OSError, nats.errors.NoServersError) as exc:
                if time.monotonic() + delay > give_up:
                    raise Unavailable(f"cannot connect to NATS at {self.config.nats.url}: "
                                      f"{exc or type(exc).__name__}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _on_started(self, msg: Msg) -> None:
        service = msg.subject.rpartition(".")[2]
        try:  # the replica's clock when it announced (before it subscribed)
            announced = float(msg.data[:32])
        except ValueError:
            announced = math.nan
        now = time.time()
        # Not in the future (which would resend nothing), however the peer's clock is.
        self._started_at[service] = now if not math.isfinite(announced) else min(announced, now)
        event = self._restarted.pop(service, None)
        if event is not None:
            event.set()

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            self._js = self.nc.jetstream()
        return self._js

    async def close(self) -> None:
        self._closing = True
        if self.nc.is_connected:
            try:
                # Bounded: with the server going away at the same moment (shoal up killed),
                # nats-py's own drain would wait its 30 s flush timeout.
                async with asyncio.timeout(DRAIN_TIMEOUT):
                    await self.nc.drain()
            except (TimeoutError, OSError, nats.errors.Error):  # OSError: the link just broke
                await self.nc.close()
        elif not self.nc.is_closed:
            await self.nc.close()

    # -- serving commands --------------------------------------------------------------------

    async def serve(self, router: Router[AppT], app: AppT) -> None:
        # Callers waiting on a replica that died resend their idempotent commands when a
        # replica announces its start, rather than after their attempt timeout. Announced
        # before subscribing (nats-py writes its buffer in order), with this replica's time:
        # a caller resends only what it sent well before that, never a command this very
        # replica may have taken.
        await self.nc.publish(subjects.started(self.node, self.service),
                              repr(time.time()).encode())
        for cmd in router.commands.values():
            subject = subjects.command(self.node, self.service, cmd.verb)
            queue = f"shoal.{self.service}" if cmd.queue else ""

            async def on_msg(msg: Msg, cmd: Command = cmd) -> None:
                # nats-py awaits this callback before delivering the next message, so hand
                # each off to its own task; the semaphore turns overload into backpressure.
                await self._slots.acquire()
                task = asyncio.create_task(self._handle(cmd, msg, app))
                self._tasks.add(task)
                task.add_done_callback(self._finished)

            self._subs.append(await self.nc.subscribe(subject, queue=queue, cb=on_msg))
        self.serving = True

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def _handle(self, cmd: Command, msg: Msg, app: Any) -> None:
        label = f"{self.service}.{cmd.verb}"
        hdrs = msg.headers or {}
        trace_id = hdrs.get(headers.TRACE_ID) or new_trace_id()
        namespace = hdrs.get(headers.NAMESPACE) or DEFAULT_NAMESPACE
        try:
            deadline = float(hdrs[headers.DEADLINE])
        except (KeyError, ValueError):
            deadline = time.time() + self.config.nats.request_timeout
        bind_trace(trace_id, deadline, subject=label,
                   namespace=namespace if valid_namespace(namespace) else "(invalid)")
        started = time.perf_counter()
        metrics.IN_FLIGHT.labels(label).inc()
        status, body = "ok", b""
        try:
            if time.time() >= deadline:
                raise DeadlineExceeded(f"{label}: deadline passed before the command was handled")
            # Handlers key stored names by it (the puller's images): any sender is untrusted.
            check_namespace(namespace, f"{label}: header {headers.NAMESPACE}")
            request = codec.decode(msg.data, cmd.request_type)
            ctx = RequestContext(app, self, label, trace_id, namespace, deadline)
            try:
                async with asyncio.timeout_at(
                        asyncio.get_running_loop().time() + (deadline - time.time())):
                    reply = await cmd.handler(ctx, request)
            except TimeoutError:
                raise DeadlineExceeded(f"{label}: deadline exceeded while handling") from None
            body = codec.encode(reply)
        except ShoalError as exc:
            status, body = exc.code.value, codec.encode(
                ErrorBody(code=exc.code.value, message=exc.message, details=exc.details))
        except asyncio.CancelledError:
            # Only on shutdown past its bound: tell the caller to retry on another replica.
            status = ErrorCode.UNAVAILABLE.value
            body = codec.encode(ErrorBody(code=status, message=f"{self.service} replica "
                                          f"{self.replica} stopped before finishing"))
            await self._reply(msg, status, body, trace_id)
            raise
        except Exception as exc:
            log.exception("command failed", error=str(exc))
            status = ErrorCode.INTERNAL.value
            body = codec.encode(ErrorBody(code=status, message=f"{type(exc).__name__}: {exc}"))
        finally:
            elapsed = time.perf_counter() - started
            metrics.IN_FLIGHT.labels(label).dec()
            metrics.HANDLE_SECONDS.labels(label).observe(elapsed)
            metrics.REQUESTS_HANDLED.labels(label, status).inc()
        (log.debug if cmd.quiet else log.info)(
            "handled", outcome=status, ms=round(elapsed * 1000, 2),
            **({"error": codec.decode(body, ErrorBody).message} if status != "ok" else {}))
        await self._reply(msg, status, body, trace_id)

    async def _reply(self, msg: Msg, status: str, body: bytes, trace_id: str) -> None:
        if not msg.reply:
            return
        try:
            await self.nc.publish(msg.reply, body,
                                  headers={headers.STATUS: status, headers.TRACE_ID: trace_id})
        except nats.errors.Error as exc:
            log.warning("could not send reply", error=str(exc))

    async def stop_serving(self, timeout: float) -> None:
        """Stop taking work (queue-group peers get it instead), let in-flight commands finish
        within `timeout`, then cancel the rest (their callers get `unavailable` and retry)."""
        self.serving = False
        subs, self._subs = self._subs, []
        end = asyncio.get_running_loop().time() + timeout
        # Drained, not unsubscribed: nats-py forgets an unsubscribed sid at once, dropping
        # what the server had already sent to it (each a caller left to wait out its
        # attempt); a drain hands those to handlers too, which are waited for below.
        try:
            async with asyncio.timeout_at(end):
                await asyncio.gather(*(sub.drain() for sub in subs), return_exceptions=True)
        except TimeoutError:  # every slot held by a handler that does not finish
            for sub in subs:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
        if self._tasks:
            _, pending = await asyncio.wait(
                set(self._tasks), timeout=max(0.0, end - asyncio.get_running_loop().time()))
            for task in pending:
                task.cancel()
            if pending:
                log.warning("cancelled in-flight commands at shutdown", count=len(pending))
                await asyncio.wait(pending, timeout=2.0)

    # -- sending commands --------------------------------------------------------------------

    def _headers(self, namespace: str | None, deadline: float) -> dict[str, str]:
        return {
            headers.TRACE_ID: current_trace_id() or new_trace_id(),
            headers.NAMESPACE: namespace or DEFAULT_NAMESPACE,
            headers.DEADLINE: f"{deadline:.6f}",
        }

    async def request(self, service: str, verb: str, message: Message, reply_type: type[RepT],
                      *, node: str | None = None, namespace: str | None = None,
                      timeout: float | None = None, attempt_timeout: float | None = None,
                      retries: int | None = None, wait_for_service: bool = True) -> RepT:
        """The typed reply, or raise the ShoalError answered. Each attempt waits
        `attempt_timeout`; a timeout (a replica died) or `unavailable` is retried up to
        `retries` times within the deadline (`timeout`, capped by the handled command's).
        No responders (a restart) is retried until the deadline, then `unavailable`,
        unless `wait_for_service` is off (probes fail fast)."""
        label = f"{service}.{verb}"
        subject = subjects.command(node or self.node, service, verb)
        attempt_timeout = attempt_timeout or self.config.nats.request_timeout
        retries = self.config.nats.request_retries if retries is None else retries
        total = timeout if timeout is not None else attempt_timeout * (retries + 1)
        deadline = time.time() + total
        inherited = deadline_var.get()
        if inherited is not None:
            deadline = min(deadline, inherited)
        hdrs = self._headers(namespace, deadline)
        body = codec.encode(message)
        started = time.perf_counter()
        attempt = idle = 0
        error: ShoalError | None = None
        try:
            while True:
                remaining = deadline - time.time()
                if remaining <= 0:
                    if isinstance(error, Unavailable):
                        raise error  # the service is down or restarting: worth retrying
                    raise DeadlineExceeded(f"{label}: no reply within {total:.1f}s "
                                           f"({attempt} attempt(s))")
                try:
                    msg = await self._attempt(service, subject, body, hdrs,
                                              min(attempt_timeout, remaining), retries > 0)
                except ConnectionDropped:
                    # Resent once the bus is back, without using up a retry.
                    error = await self._after_drop(label, retries, deadline)
                    continue
                except nats.errors.MaxPayloadError:
                    raise Invalid(f"{label}: the request is {len(body)} bytes, more than the "
                                  f"bus carries ({self.nc.max_payload})") from None
                except nats.errors.NoRespondersError:
                    metrics.REQUESTS_SENT.labels(label, "no_responders").inc()
                    error = Unavailable(f"no replica of '{service}' is serving {subject}")
                    if wait_for_service:
                        # Nobody received it, so sending again is safe for any verb: keep
                        # trying within the deadline (a restart takes a second or two),
                        # whatever `retries` says.
                        idle += 1
                        await _sleep_within(min(0.02 * 2 ** min(idle, 5), 0.5), deadline)
                        continue
                    pause = min(0.05 * 2 ** attempt, 1.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    metrics.REQUESTS_SENT.labels(label, "timeout").inc()
                    error = DeadlineExceeded(f"{label}: no reply within "
                                             f"{min(attempt_timeout, remaining):.1f}s")
                    pause = 0.0
                else:
                    reply = _reply(msg, label, reply_type)
                    if not isinstance(reply, ShoalError):
                        return reply
                    error = reply
                    if error.code not in RETRYABLE:
                        raise error
                    pause = min(0.05 * 2 ** attempt, 1.0)
                attempt += 1
                if attempt > retries:
                    raise error
                log.debug("retrying command", subject=label, attempt=attempt, error=str(error))
                if pause:
                    await _sleep_within(pause, deadline)
        finally:
            metrics.REQUEST_SECONDS.labels(label).observe(time.perf_counter() - started)

    async def _after_drop(self, label: str, retries: int, deadline: float) -> Unavailable:
        """NATS or a replica was restarted while an attempt waited: raise if the verb is
        not idempotent (it may have been done), else wait until the connection is back (sent
        while still reconnecting, a second drop would send it twice more)."""
        metrics.REQUESTS_SENT.labels(label, "dropped").inc()
        error = Unavailable(f"{label}: the bus connection dropped before the reply")
        if retries == 0:
            raise error
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - time.time())):
                await self._up.wait()
        return error

    async def _attempt(self, service: str, subject: str, body: bytes, hdrs: dict[str, str],
                       timeout: float, resendable: bool) -> Msg:
        """One request, cut short by `ConnectionDropped` if the connection drops first or
        (`resendable`) a replica of `service` announces its start at least RESEND_BEFORE_START
        after the request went out: a request sent later than that may be one the new
        replica itself took (its announcement comes just before it subscribes), and a
        replica that died holding a request took it well before its successor started."""
        dropped = self._dropped
        sent_at = time.time()
        sent = asyncio.ensure_future(self.nc.request(subject, body, headers=hdrs,
                                                     timeout=timeout))
        try:
            while True:
                events = [dropped]
                if resendable:
                    events.append(self._restarted.setdefault(service, asyncio.Event()))
                lost = [asyncio.ensure_future(e.wait()) for e in events]
                try:
                    await asyncio.wait((sent, *lost), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in lost:
                        waiter.cancel()
                if sent.done() or dropped.is_set():
                    break
                if self._started_at.get(service, 0.0) - sent_at >= RESEND_BEFORE_START:
                    break
        finally:
            if not sent.done():
                sent.cancel()  # its reply future leaves nats-py's map as it is cancelled
        if not sent.done() or sent.cancelled():
            raise ConnectionDropped
        return sent.result()

    async def gather(self, service: str, verb: str, message: Message, reply_type: type[RepT],
                     *, node: str | None = None, wait: float = 1.0) -> list[RepT]:
        """Ask every replica (a non-queue subject such as health) and collect all replies
        that arrive within `wait` seconds."""
        subject = subjects.command(node or self.node, service, verb)
        inbox = self.nc.new_inbox()
        replies: list[RepT] = []
        sub = await self.nc.subscribe(inbox)
        try:
            await self.nc.publish(subject, codec.encode(message), reply=inbox,
                                  headers=self._headers(None, time.time() + wait))
            end = time.monotonic() + wait
            while (left := end - time.monotonic()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except (TimeoutError, nats.errors.TimeoutError):
                    break
                # No replica yet: NATS answers with an empty 503 status message; skip it.
                if not msg.data or (msg.headers or {}).get(headers.STATUS, "ok") != "ok":
                    continue
                try:
                    replies.append(codec.decode(msg.data, reply_type))
                except Invalid as exc:
                    log.warning("malformed reply", subject=subject, error=exc.message)
        finally:
            await sub.unsubscribe()
        return replies

    # -- events ------------------------------------------------------------------------------

    async def until_jetstream_ready(self, what: str, op: Callable[[], Awaitable[T]], *,
                                    wait: float = 60.0) -> T:
        """Run a JetStream setup call, retrying while JetStream cannot answer yet: a NATS
        cluster that just started has no meta leader for a few seconds, and a service
        starting then should wait for it rather than exit."""
        give_up = time.monotonic() + wait
        delay = 0.2
        while True:
            try:
                return await op()
            except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError,
                    nats.js.errors.ServiceUnavailableError) as exc:
                if time.monotonic() + delay > give_up:
                    raise Unavailable(f"JetStream did not answer {what} within {wait:.0f}s: "
                                      f"{exc or type(exc).__name__}") from exc
                log.warning("JetStream not ready; retrying", what=what,
                            error=str(exc) or type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def ensure_events_stream(self) -> None:
        """Create the events stream if missing (any service may be first to start)."""
        await self.until_jetstream_ready("the events stream setup", self._ensure_events_stream)

    async def _ensure_events_stream(self) -> None:
        ev = self.config.events
        try:
            await self.js.stream_info(ev.stream)
            return
        except nats.js.errors.NotFoundError:
            pass
        try:
            await self.js.add_stream(StreamConfig(
                name=ev.stream, subjects=subjects.EVENTS_STREAM_SUBJECTS,
                max_age=ev.max_age_seconds, max_bytes=ev.max_bytes,
                storage=StorageType.FILE, num_replicas=ev.replicas, duplicate_window=120.0))
            log.info("created events stream", stream=ev.stream)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10058:  # "stream name already in use": another service won
                raise

    async def publish_event(self, event: Event, *, namespace: str | None = None,
                            event_id: str | None = None, wait_ack: bool = True) -> None:
        """Publish a fact after the change it reports is durable. `event_id` (default random)
        lets a retried publish be de-duplicated by JetStream. `wait_ack=False` is for
        frequent, losable events (progress): the stream still stores them, nobody waits."""
        topic = type(event).TOPIC
        ns = namespace or DEFAULT_NAMESPACE
        subject = subjects.event(self.node, ns, topic)
        hdrs = {
            headers.EVENT_ID: event_id or uuid.uuid4().hex,
            headers.TOPIC: topic,
            headers.NAMESPACE: ns,
            headers.TRACE_ID: current_trace_id() or new_trace_id(),
            headers.TIMESTAMP: f"{time.time():.6f}",
            headers.SOURCE: f"{self.service}/{self.replica}",
        }
        try:
            if wait_ack:
                await self.js.publish(subject, codec.encode(event), headers=hdrs,
                                      timeout=self.config.nats.request_timeout)
            else:
                await self.nc.publish(subject, codec.encode(event), headers=hdrs)
        except (TimeoutError, nats.errors.Error) as exc:
            metrics.EVENTS_PUBLISHED.labels(topic, "error").inc()
            raise Unavailable(f"publishing {topic}: {exc or type(exc).__name__}") from exc
        metrics.EVENTS_PUBLISHED.labels(topic, "ok").inc()


async def _sleep_within(seconds: float, deadline: float) -> None:
    await asyncio.sleep(min(seconds, max(0.0, deadline - time.time())))


def _reply(msg: Msg, label: str, reply_type: type[RepT]) -> RepT | ShoalError:
    """The typed reply, or the error a peer answered. A reply that does not fit its type is
    the replier's fault: `internal`, raised at once."""
    status = (msg.headers or {}).get(headers.STATUS, "ok")
    metrics.REQUESTS_SENT.labels(label, status).inc()
    if status == "ok":
        try:
            return codec.decode(msg.data, reply_type)
        except Invalid as exc:
            raise Internal(f"{label}: malformed reply: {exc.message}") from None
    try:
        err = codec.decode(msg.data, ErrorBody)
        return ShoalError.from_code(err.code, err.message, err.details)
    except Invalid:
        return ShoalError.from_code(status, f"{label} failed")
