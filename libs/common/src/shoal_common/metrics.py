"""Prometheus metrics every service has, and the /metrics server.

The default registry is used on purpose: it already carries the process and platform
collectors (CPU, memory, fds, GC) that operators expect next to ours.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

from shoal_common.config import parse_addr

# Bus latencies span sub-millisecond pings to multi-second pulls.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0, 300.0)

SERVICE_INFO = Info("shoal_service", "Which Shoal service this process is.")
SERVICE_START = Gauge("shoal_service_start_time_seconds", "When the service started (Unix time).")

# `subject` is the subject without its shoal.v1.<node>. prefix (e.g. images.pull), so the
# label's values are bounded by the verbs we define, not by nodes.
REQUESTS_HANDLED = Counter(
    "shoal_bus_requests_handled_total", "Bus commands handled, by subject and outcome "
    "(ok or the error code).", ["subject", "outcome"])
HANDLE_SECONDS = Histogram(
    "shoal_bus_request_handle_seconds", "Time to handle a bus command, by subject.",
    ["subject"], buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge(
    "shoal_bus_requests_in_flight", "Bus commands being handled now, by subject.", ["subject"])
REQUESTS_SENT = Counter(
    "shoal_bus_requests_sent_total", "Bus commands sent, by subject and outcome (ok, an error "
    "code, timeout or no_responders; one count per attempt).", ["subject", "outcome"])
REQUEST_SECONDS = Histogram(
    "shoal_bus_request_seconds", "Round-trip time of bus commands sent, by subject, "
    "including retries.", ["subject"], buckets=LATENCY_BUCKETS)
EVENTS_PUBLISHED = Counter(
    "shoal_bus_events_published_total", "Events published to JetStream, by topic and outcome.",
    ["topic", "outcome"])
EVENTS_CONSUMED = Counter(
    "shoal_bus_events_consumed_total", "Events handled from JetStream, by topic and outcome "
    "(ack, nak: retried later, term: given up).", ["topic", "outcome"])
EVENTS_PENDING = Gauge(
    "shoal_bus_events_consumer_pending", "JetStream consumer lag: events in the stream not yet "
    "delivered to this durable consumer, plus those delivered but not acknowledged.",
    ["consumer"])
BUS_RECONNECTS = Counter("shoal_bus_reconnects_total", "Reconnections to NATS.")


class MetricsServer:
    """Serves /metrics on its own address in a background thread (prometheus-client's server)."""

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        host, port = parse_addr(self.addr)
        self._server, self._thread = start_http_server(port, addr=host)
        bound_port = self._server.server_address[1]
        self.addr = f"{host}:{bound_port}"
        return self.addr

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
