"""A command in flight when nats-server dies: its reply is lost for good, so the request is
over at once. An idempotent one is sent again as soon as the bus is back (not after its
attempt timeout); one that is not idempotent answers UNAVAILABLE, never twice done."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from shoal_common.bus import RESEND_BEFORE_START, Bus, RequestContext, Router
from shoal_common.config import load_config
from shoal_common.errors import Unavailable
from shoal_common.messages import PingReply, PingRequest
from support.nats import nats_server
from support.ports import free_port


@dataclass
class Echo:
    seen: int = 0
    first: asyncio.Event = field(default_factory=asyncio.Event)  # the first delivery came


router: Router[Echo] = Router()


@router.command("ping")
async def ping(ctx: RequestContext[Echo], req: PingRequest) -> PingReply:
    """The first delivery is never answered (as if the server died before the reply)."""
    ctx.app.seen += 1
    if ctx.app.seen == 1:
        ctx.app.first.set()
        await asyncio.sleep(3600)
    return PingReply(payload=req.payload, replica="r0")


def bus(url: str, service: str, **options: int) -> Bus:
    """`options`: Bus's own keywords (max_concurrency)."""
    config = load_config(env={}, flags={"node_id": "reconnect", "nats.url": url})
    return Bus(config, service=service, replica=f"{service}-0", **options)


async def held(server: Bus, client: Bus, seen: Echo, payload: bytes,
               retries: int) -> asyncio.Task[PingReply]:
    """Both connected, `server` serving: a request in flight that the server received and
    holds unanswered."""
    await server.connect(wait=10)
    await client.connect(wait=10)
    await server.serve(router, seen)
    # Until the server's start announcement reached the client: a request sent before
    # would be resent once at its arrival (harmless, but the tests count deliveries).
    await server.nc.flush()
    await client.nc.flush()
    await asyncio.sleep(0.05)
    request = asyncio.create_task(client.request(
        "echo", "ping", PingRequest(payload=payload), PingReply, attempt_timeout=30,
        timeout=60, retries=retries))
    await asyncio.wait_for(seen.first.wait(), 10)
    return request


async def in_flight_when_nats_restarts(tmp_path: Path, retries: int) -> tuple[object, float,
                                                                              int]:
    port = free_port()
    seen = Echo()
    server, client = bus(f"nats://127.0.0.1:{port}", "echo"), bus(
        f"nats://127.0.0.1:{port}", "test")
    with nats_server(tmp_path / "a", port=port, jetstream=False):
        request = await held(server, client, seen, b"x", retries)
    started = time.monotonic()
    with nats_server(tmp_path / "b", port=port, jetstream=False):
        try:
            outcome: object = await asyncio.wait_for(request, 20)
        except Unavailable as err:
            outcome = err
        took = time.monotonic() - started
        await client.close()
        await server.close()
    return outcome, took, seen.seen


async def test_an_idempotent_command_is_resent_once_nats_is_back(tmp_path: Path) -> None:
    reply, took, seen = await in_flight_when_nats_restarts(tmp_path, retries=3)
    assert isinstance(reply, PingReply) and reply.payload == b"x"
    assert seen == 2
    assert took < 10, "waited out the 30 s attempt instead of resending"


async def test_a_command_that_is_not_idempotent_is_not_sent_twice(tmp_path: Path) -> None:
    err, took, seen = await in_flight_when_nats_restarts(tmp_path, retries=0)
    assert isinstance(err, Unavailable), err
    assert "connection dropped" in str(err)
    assert seen == 1
    assert took < 10


async def test_a_command_held_by_a_dead_replica_is_resent_when_another_starts(
        tmp_path: Path) -> None:
    """The replica that took it dies without answering; a new one announces its start and
    the request goes to it at once, not after the 30 s attempt."""
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    seen = Echo()
    dying, client = bus(url, "echo"), bus(url, "test")
    with nats_server(tmp_path / "n", port=port, jetstream=False):
        request = await held(dying, client, seen, b"y", 3)
        await dying.nc.close()  # as a SIGKILL: its subscriptions go, no reply is sent
        started = time.monotonic()
        # A real restart (the death noticed, a fork) takes longer than this; what went out
        # less than RESEND_BEFORE_START before a start may be the new replica's own.
        await asyncio.sleep(2 * RESEND_BEFORE_START)
        fresh = bus(url, "echo")
        await fresh.connect(wait=10)
        await fresh.serve(router, seen)
        reply = await asyncio.wait_for(request, 20)
        took = time.monotonic() - started
        await client.close()
        await fresh.close()
    assert reply.payload == b"y" and seen.seen == 2
    assert took < 10


counting: Router[dict[bytes, int]] = Router()


@counting.command("ping")
async def count(ctx: RequestContext[dict[bytes, int]], req: PingRequest) -> PingReply:
    ctx.app[req.payload] = ctx.app.get(req.payload, 0) + 1
    return PingReply(payload=req.payload, replica="r0")


async def test_a_replica_starting_does_not_get_what_it_took_resent(tmp_path: Path) -> None:
    """Requests sent all the while a replica starts: each is handled once. (Its start
    announcement resends what is in flight; one sent out before it subscribed would be a
    request this very replica took.)"""
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    handled: dict[bytes, int] = {}
    server, client = bus(url, "echo"), bus(url, "test")
    with nats_server(tmp_path / "n", port=port, jetstream=False):
        await server.connect(wait=10)
        await client.connect(wait=10)
        requests: list[asyncio.Task[PingReply]] = []
        for round_ in range(20):
            enough = asyncio.Event()

            async def send(round_: int, enough: asyncio.Event) -> None:
                i = 0
                while not enough.is_set():
                    requests.append(asyncio.create_task(client.request(
                        "echo", "ping", PingRequest(payload=f"{round_}-{i}".encode()),
                        # (Short: one sent within a millisecond of the last round's stop
                        # can be lost to it, as nats-py's flush is no barrier.)
                        PingReply, attempt_timeout=2, timeout=20, retries=3)))
                    i += 1
                    await asyncio.sleep(0.0005)

            sender = asyncio.create_task(send(round_, enough))
            await asyncio.sleep(0.01)
            await server.serve(counting, handled)
            await asyncio.sleep(0.01)
            enough.set()
            await sender
            await asyncio.gather(*requests)
            await server.stop_serving(1)
        await client.close()
        await server.close()
    assert len(handled) == len(requests)
    assert [p for p, n in handled.items() if n > 1] == []


@dataclass
class Taken:
    payloads: list[bytes] = field(default_factory=list)
    first: asyncio.Event = field(default_factory=asyncio.Event)


slow: Router[Taken] = Router()


@slow.command("ping")
async def slow_ping(ctx: RequestContext[Taken], req: PingRequest) -> PingReply:
    ctx.app.payloads.append(req.payload)
    ctx.app.first.set()
    await asyncio.sleep(0.2)
    return PingReply(payload=req.payload, replica="r0")


async def test_a_stopping_replica_answers_what_had_reached_it(tmp_path: Path) -> None:
    """One handler at a time: requests that reached the replica while its only slot was
    busy are answered when it stops serving, not dropped (their callers would wait out
    their attempts)."""
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    handled = Taken()
    server, client = bus(url, "echo", max_concurrency=1), bus(url, "test")
    with nats_server(tmp_path / "n", port=port, jetstream=False):
        await server.connect(wait=10)
        await client.connect(wait=10)
        await server.serve(slow, handled)
        await asyncio.sleep(0.05)  # its start announcement is in
        requests = [asyncio.create_task(client.request(
            "echo", "ping", PingRequest(payload=str(i).encode()), PingReply,
            attempt_timeout=30, timeout=30, retries=3)) for i in range(4)]
        await asyncio.wait_for(handled.first.wait(), 10)
        await server.stop_serving(5)
        done, _ = await asyncio.wait(requests, timeout=3)
        await client.close()
        await server.close()
    assert len(done) == 4, "a request that had reached the replica was dropped"
    assert sorted(handled.payloads) == [b"0", b"1", b"2", b"3"]
