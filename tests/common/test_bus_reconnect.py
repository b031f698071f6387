"""A command in flight when nats-server dies: its reply is lost for good, so the request is
over at once. An idempotent one is sent again as soon as the bus is back (not after its
attempt timeout); one that is not idempotent answers UNAVAILABLE, never twice done."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from shoal_common.bus import Bus, RequestContext, Router
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


def bus(url: str, service: str) -> Bus:
    config = load_config(env={}, flags={"node_id": "reconnect", "nats.url": url})
    return Bus(config, service=service, replica=f"{service}-0")


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
        fresh = bus(url, "echo")
        await fresh.connect(wait=10)
        await fresh.serve(router, seen)
        reply = await asyncio.wait_for(request, 20)
        took = time.monotonic() - started
        await client.close()
        await fresh.close()
    assert reply.payload == b"y" and seen.seen == 2
    assert took < 10
