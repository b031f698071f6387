"""Runtime readiness, asked by the gateway for CRI Status (tasks.status, monitor.status)."""

from __future__ import annotations

from shoal_common.messages.base import Message


class ComponentStatus(Message):
    """One external binary a service depends on (runc, conmon, ...)."""

    name: str
    path: str
    ok: bool
    version: str = ""
    error: str = ""


class RuntimeStatusRequest(Message):
    pass


class RuntimeStatusReply(Message):
    ready: bool
    components: list[ComponentStatus] = []
    handlers: list[str] = []  # CRI runtime handlers this service can run
