"""The typed clients: each verb declared once, and the servers checked against them."""

from __future__ import annotations

import importlib

import pytest
from shoal_common.bus import RequestContext, Router
from shoal_common.clients import CLIENTS, ServiceClient, TasksClient, Verb, check_router
from shoal_common.messages import Empty, HealthReply, HealthRequest, PingReply, PingRequest
from shoal_common.messages.tasks import SandboxIdRequest, SandboxInfo

HANDLERS = {"images": "shoal_puller.handlers", "snapshots": "shoal_snapshotter.handlers",
            "tasks": "shoal_executor.handlers", "monitor": "shoal_supervisor.handlers",
            "cri": "shoal_cri_gateway.handlers"}


@pytest.mark.parametrize("token", sorted(HANDLERS))
def test_every_served_command_is_declared_with_its_types(token: str) -> None:
    router = importlib.import_module(HANDLERS[token]).router
    check_router(CLIENTS[token], router)
    served = set(router.commands) | {"health", "ping"}
    assert served == set(CLIENTS[token].verbs()), "declared verbs nobody serves"


def test_a_handler_that_drifts_from_its_declaration_is_refused() -> None:
    router: Router[object] = Router()

    @router.command("sandbox.stop")
    async def stop(ctx: RequestContext[object], req: SandboxIdRequest) -> Empty:
        return Empty()

    with pytest.raises(TypeError, match="declared SandboxIdRequest -> SandboxInfo"):
        check_router(TasksClient, router)

    other: Router[object] = Router()

    @other.command("sandbox.explode")
    async def explode(ctx: RequestContext[object], req: SandboxIdRequest) -> SandboxInfo:
        raise AssertionError

    with pytest.raises(TypeError, match="not declared"):
        check_router(TasksClient, other)


def test_a_verb_that_is_not_idempotent_cannot_be_retried() -> None:
    with pytest.raises(ValueError, match="must not be retried"):
        Verb("exec", PingRequest, PingReply, idempotent=False)
    assert Verb("exec", PingRequest, PingReply, retries=0, idempotent=False).retries == 0


async def test_a_client_refuses_the_wrong_message_type() -> None:
    class Fake(ServiceClient):
        service = "tasks"

    client = Fake(bus=None)  # type: ignore[arg-type]  # refused before the bus is used
    with pytest.raises(TypeError, match="takes PingRequest, not HealthRequest"):
        await client.ping(HealthRequest())  # type: ignore[arg-type]
    assert Fake.health.reply is HealthReply
