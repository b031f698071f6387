"""Client commands over the bus: `shoal status`, `shoal ping`."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from shoal_common.bus import Bus
from shoal_common.catalog import SERVICES, ServiceInfo, lookup
from shoal_common.clients import CLIENTS
from shoal_common.config import Config
from shoal_common.errors import ShoalError
from shoal_common.messages import HealthReply, PingRequest

from shoal_cli.runstate import ON_DEMAND_FILE, PIDS_FILE, _start_time

# `shoal status` asks in rounds until every expected replica has answered: the first is
# short (a healthy replica answers on loopback in about a millisecond) and each next one
# twice as long, so a slow replica still gets its answer in, within `wait` in all.
FIRST_ROUND = 0.05


async def connect(config: Config) -> Bus:
    bus = Bus(config, service="cli", replica="cli")
    await bus.connect(wait=config.nats.connect_timeout)
    return bus


@dataclass(frozen=True)
class Expected:
    """A replica `shoal up` runs now (from its pid list): who should answer health."""

    service: str
    replica: str
    pid: int


def _argv_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else ""


def expected_replicas(config: Config) -> list[Expected] | None:
    """The service replicas of this node that `shoal up` has running, from
    `<run_root>/shoal-up.pids` (each child's command line names its service, node and
    replica); None without that file (no `shoal up` on this run root: nobody to expect)."""
    try:
        entries = json.loads((Path(config.run_root) / PIDS_FILE).read_text())
    except (OSError, ValueError):
        return None
    by_module = {svc.module: svc.name for svc in SERVICES}
    found = []
    for pid, started in entries:
        if _start_time(pid) != started:  # gone, or the pid now names another process
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except (OSError, UnicodeDecodeError):
            continue
        service = by_module.get(_argv_value(argv, "-m"))
        replica = _argv_value(argv, "--replica-id")
        if service and replica and _argv_value(argv, "--node-id") == config.node_id:
            found.append(Expected(service, replica, pid))
    return found


async def _health(bus: Bus, svc: ServiceInfo, expect: set[str] | None,
                  wait: float) -> list[HealthReply]:
    """Every replica's answer: within `wait` when nobody is expected, else as soon as each
    replica in `expect` has answered (and at the latest after `wait`)."""
    client = CLIENTS[svc.subject](bus)
    if expect is None:
        return await client.health_of_all(wait=wait)
    seen: dict[str, HealthReply] = {}
    end = time.monotonic() + wait
    round_wait = FIRST_ROUND
    while (left := end - time.monotonic()) > 0:
        for reply in await client.health_of_all(wait=min(round_wait, left)):
            seen[reply.replica] = reply
        if expect <= seen.keys():
            break
        round_wait *= 2
    return list(seen.values())


async def status(config: Config, wait: float) -> int:
    """Every replica's health; exit 1 if a service has no replica answering."""
    expected = expected_replicas(config)
    bus = await connect(config)
    try:
        # All services at once: each waits only for its own replicas.
        answers = await asyncio.gather(*(_health(bus, svc, None if expected is None else {
            e.replica for e in expected if e.service == svc.name}, wait) for svc in SERVICES))
    finally:
        await bus.close()
    return _print_status(config, answers, expected or [], on_demand(config))


def on_demand(config: Config) -> set[str]:
    """The services `shoal up` starts at their first connection and has not started yet."""
    try:
        names = json.loads((Path(config.run_root) / ON_DEMAND_FILE).read_text())
    except (OSError, ValueError):
        return set()
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def _print_status(config: Config, answers: list[list[HealthReply]],
                  expected: list[Expected], waiting: set[str]) -> int:
    print(f"node {config.node_id}  nats {config.nats.url}")
    print(f"{'SERVICE':<16}{'REPLICA':<20}{'STATUS':<10}{'PID':>8}{'UPTIME':>10}"
          f"{'IN-FLIGHT':>11}  {'VERSION':<9}METRICS")
    down = 0
    for svc, replies in zip(SERVICES, answers, strict=True):
        heard = {r.replica for r in replies}
        silent = [e for e in expected if e.service == svc.name and e.replica not in heard]
        for h in sorted(replies, key=lambda r: r.replica):
            print(f"{svc.name:<16}{h.replica:<20}{h.status:<10}{h.pid:>8}"
                  f"{h.uptime_seconds:>9.0f}s{h.in_flight:>11}  {h.version:<9}"
                  f"http://{h.metrics_addr}/metrics")
        for e in sorted(silent, key=lambda e: e.replica):  # running, but not answering
            print(f"{svc.name:<16}{e.replica:<20}{'DOWN':<10}{e.pid:>8}")
        if not replies and svc.name in waiting and not silent:
            print(f"{svc.name:<16}{'-':<20}{'ON-DEMAND':<10}")  # starts at its 1st client
        elif not replies:
            down += 1
            if not silent:
                print(f"{svc.name:<16}{'-':<20}{'DOWN':<10}")
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
