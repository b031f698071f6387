"""Client commands over the bus: `shoal status`, `shoal ping`."""

from __future__ import annotations

import statistics
import time

from shoal_common.bus import Bus
from shoal_common.catalog import SERVICES, lookup
from shoal_common.clients import CLIENTS
from shoal_common.config import Config
from shoal_common.errors import ShoalError
from shoal_common.messages import HealthReply, PingRequest


async def connect(config: Config) -> Bus:
    bus = Bus(config, service="cli", replica="cli")
    await bus.connect(wait=config.nats.connect_timeout)
    return bus


async def status(config: Config, wait: float) -> int:
    """Every replica's health; exit 1 if a service has no replica answering."""
    bus = await connect(config)
    try:
        rows: list[tuple[str, HealthReply | None]] = []
        for svc in SERVICES:
            replies = await CLIENTS[svc.subject](bus).health_of_all(wait=wait)
            rows += [(svc.name, r) for r in sorted(replies, key=lambda r: r.replica)] or [
                (svc.name, None)]
    finally:
        await bus.close()
    print(f"node {config.node_id}  nats {config.nats.url}")
    print(f"{'SERVICE':<13}{'REPLICA':<18}{'STATUS':<10}{'PID':>8}{'UPTIME':>10}"
          f"{'IN-FLIGHT':>11}  {'VERSION':<9}METRICS")
    down = 0
    for name, h in rows:
        if h is None:
            down += 1
            print(f"{name:<13}{'-':<18}{'DOWN':<10}")
            continue
        print(f"{name:<13}{h.replica:<18}{h.status:<10}{h.pid:>8}{h.uptime_seconds:>9.0f}s"
              f"{h.in_flight:>11}  {h.version:<9}http://{h.metrics_addr}/metrics")
    return 1 if down else 0


async def ping(config: Config, service: str, count: int) -> int:
    svc = lookup(service)
    bus = await connect(config)
    times: list[float] = []
    try:
        for i in range(count):
            start = time.perf_counter()
            try:
                reply = await CLIENTS[svc.subject](bus).ping(PingRequest(payload=b"x" * 16))
            except ShoalError as exc:
                print(f"ping {svc.name}: {exc}")
                return 1
            ms = (time.perf_counter() - start) * 1000
            times.append(ms)
            print(f"reply from {reply.replica}: seq={i} time={ms:.2f} ms")
    finally:
        await bus.close()
    if len(times) > 1:
        print(f"min/median/max = {min(times):.2f}/{statistics.median(times):.2f}/"
              f"{max(times):.2f} ms")
    return 0
