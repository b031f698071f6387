"""Supervisor metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

# runc calls take milliseconds; a create under load or an exec can take seconds.
RUNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STATES = ("creating", "created", "running", "stopped")

TASKS = Gauge("shoal_supervisor_tasks", "Tasks this node's supervisor knows, by state.",
              ["state"])
EXITS = Counter("shoal_supervisor_exits_total", "Container exits recorded, by reason "
                "(Completed, Error, OOMKilled).", ["reason"])
OOMS = Counter("shoal_supervisor_oom_total", "OOM kills seen in containers' cgroups.")
RUNTIME_SECONDS = Histogram(
    "shoal_supervisor_runtime_seconds", "Time of conmon and OCI runtime invocations, by "
    "operation (create, start, kill, delete, state, update, exec).", ["op"],
    buckets=RUNTIME_BUCKETS)


@contextmanager
def timed(op: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        RUNTIME_SECONDS.labels(op).observe(time.perf_counter() - started)


def set_task_counts(counts: dict[str, int]) -> None:
    for state in STATES:
        TASKS.labels(state).set(counts.get(state, 0))

for _reason in ("Completed", "Error", "OOMKilled"):
    EXITS.labels(_reason)  # present at 0, so rate() sees the first exit of each reason
