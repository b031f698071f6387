"""Trace id and deadline of the request being handled, as contextvars.

Each handled command runs in its own task (its own context copy), so a downstream request
made while handling it inherits the trace id and never outlives the caller's deadline."""

from __future__ import annotations

import uuid
from contextvars import ContextVar

import structlog

trace_id_var: ContextVar[str | None] = ContextVar("shoal_trace_id", default=None)
deadline_var: ContextVar[float | None] = ContextVar("shoal_deadline", default=None)


def new_trace_id() -> str:
    return uuid.uuid4().hex


def current_trace_id() -> str | None:
    return trace_id_var.get()


def bind_trace(trace_id: str, deadline: float | None = None, **fields: str) -> None:
    """Make `trace_id` the current trace (and the log field) for this task."""
    trace_id_var.set(trace_id)
    deadline_var.set(deadline)
    structlog.contextvars.bind_contextvars(trace_id=trace_id, **fields)
