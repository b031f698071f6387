"""The bus between real service processes and a real NATS server."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from collections import Counter

import msgspec
import nats
import pytest
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc
from prometheus_client.parser import text_string_to_metric_families
from shoal_common import headers, subjects
from shoal_common.bus import Bus
from shoal_common.catalog import SERVICES
from shoal_common.config import load_config
from shoal_common.errors import Invalid
from shoal_common.messages import (
    ErrorBody,
    HealthReply,
    HealthRequest,
    PingReply,
    PingRequest,
    RuntimeStatusReply,
    RuntimeStatusRequest,
)
from support.nats import nats_server
from support.ports import free_port
from support.processes import Node, ServiceSet

pytestmark = pytest.mark.e2e


async def start(services: ServiceSet, *names: str) -> None:
    started = [services.start(name) for name in names]
    for sp in started:
        await asyncio.to_thread(services.wait_serving, sp)


def scrape(addr: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


async def test_round_trip_to_each_service(services: ServiceSet, bus: Bus) -> None:
    await start(services, *(s.name for s in SERVICES))
    for svc in SERVICES:
        reply = await bus.request(svc.subject, "ping", PingRequest(payload=b"hello"), PingReply)
        assert reply.payload == b"hello"
        assert reply.replica == f"{svc.name}-0"
        health = await bus.request(svc.subject, "health", HealthRequest(), HealthReply)
        assert (health.service, health.node, health.status) == (
            svc.name, services.node.node_id, "serving")
    status = await bus.request("tasks", "status", RuntimeStatusRequest(), RuntimeStatusReply)
    assert status.ready and status.components[0].name == "runc"
    assert "runc" in status.components[0].version


async def test_malformed_body_gets_invalid_reply_and_service_keeps_serving(
        services: ServiceSet, bus: Bus) -> None:
    await start(services, "puller")
    subject = subjects.command(services.node.node_id, "images", "ping")
    for body, why in [(b"\xc1\xff", "not valid MessagePack"),
                      (msgspec.msgpack.encode({"delay_ms": "soon"}), "$.delay_ms"),
                      (msgspec.msgpack.encode(["not", "a", "map"]), "Expected `object`")]:
        msg = await bus.nc.request(subject, body, timeout=5)
        assert msg.headers[headers.STATUS] == "invalid"
        error = msgspec.msgpack.decode(msg.data, type=ErrorBody)
        assert error.code == "invalid" and why in error.message
    # Typed clients see the same refusal as an exception.
    with pytest.raises(Invalid, match="delay_ms"):
        await bus.request("images", "ping", PingRequest(delay_ms=50_000), PingReply)
    reply = await bus.request("images", "ping", PingRequest(payload=b"still here"), PingReply)
    assert reply.payload == b"still here"
    assert services.procs[0].proc.poll() is None


async def test_killing_a_replica_mid_load_loses_no_request(
        services: ServiceSet, bus: Bus) -> None:
    await start(services, "puller", "puller")
    victim = services.procs[0]

    async def one(i: int) -> PingReply:
        return await bus.request("images", "ping", PingRequest(payload=str(i).encode(),
                                 delay_ms=400), PingReply, attempt_timeout=1.5, retries=3)

    calls = [asyncio.create_task(one(i)) for i in range(60)]
    await asyncio.sleep(0.2)  # both replicas now hold requests in flight
    await asyncio.to_thread(victim.kill9)
    replies = await asyncio.gather(*calls)
    assert [r.payload for r in replies] == [str(i).encode() for i in range(60)]
    by_replica = Counter(r.replica for r in replies)
    # The survivor answered everything, including the retries of what the victim held.
    assert by_replica["puller-1"] >= 30, by_replica
    assert victim.replica not in by_replica or by_replica[victim.replica] < 60


async def test_metrics_count_the_requests_just_made(services: ServiceSet, bus: Bus) -> None:
    await start(services, *(s.name for s in SERVICES))
    for svc, sp in zip(SERVICES, services.procs, strict=True):
        before = scrape(sp.metrics_addr)
        key = ("shoal_bus_requests_handled_total",
               (("outcome", "ok"), ("subject", f"{svc.subject}.ping")))
        for _ in range(3):
            await bus.request(svc.subject, "ping", PingRequest(), PingReply)
        after = scrape(sp.metrics_addr)
        assert after[key] - before.get(key, 0.0) == 3
        hist = ("shoal_bus_request_handle_seconds_count",
                (("subject", f"{svc.subject}.ping"),))
        assert after[hist] >= 3
        assert any(name == "process_resident_memory_bytes" for name, _ in after)
        assert any(name == "shoal_bus_requests_in_flight" for name, _ in after)
        info = [labels for name, labels in after if name == "shoal_service_info"]
        assert dict(info[0])["service"] == svc.name


async def test_trace_id_crosses_services(services: ServiceSet) -> None:
    await start(services, "puller", "snapshotter", "executor", "supervisor")
    # Status is a polling RPC, logged at debug (as containerd does).
    sp = services.start("cri-gateway", extra=["--set", "log.level=debug"])
    await asyncio.to_thread(services.wait_serving, sp)
    gateway = next(sp for sp in services if sp.service == "cri-gateway")
    executor = next(sp for sp in services if sp.service == "executor")
    trace_id = "5eed" * 8
    import grpc

    async with grpc.aio.insecure_channel(f"unix://{services.node.cri_socket}") as channel:
        stub = cri_grpc.RuntimeServiceStub(channel)
        call = stub.Status(cri.StatusRequest(), metadata=(("shoal-trace-id", trace_id),))
        status = await call
        assert dict(await call.initial_metadata())["shoal-trace-id"] == trace_id
        version = await stub.Version(cri.VersionRequest())
    conditions = {c.type: c for c in status.status.conditions}
    assert conditions["RuntimeReady"].status, conditions["RuntimeReady"].message
    assert version.runtime_name == "shoal" and version.runtime_api_version == "v1"

    def lines_with_trace(text: str) -> list[dict[str, object]]:
        return [json.loads(line) for line in text.splitlines()
                if line.startswith("{") and trace_id in line]

    await asyncio.sleep(0.2)  # let the services flush their log lines
    executor_lines = lines_with_trace(executor.log_text())
    assert any(line.get("subject") == "tasks.status" for line in executor_lines)
    assert all(line["trace_id"] == trace_id and line["service"] == "executor"
               for line in executor_lines)
    gateway_lines = lines_with_trace(gateway.log_text())
    assert any(line.get("rpc") == "Status" and line["service"] == "cri-gateway"
               for line in gateway_lines)


async def test_graceful_stop_finishes_in_flight_work(services: ServiceSet, bus: Bus) -> None:
    await start(services, "puller")
    sp = services.procs[0]
    calls = [asyncio.create_task(bus.request("images", "ping", PingRequest(delay_ms=800),
                                             PingReply, retries=0)) for _ in range(5)]
    await asyncio.sleep(0.3)
    code = await asyncio.to_thread(sp.terminate)
    assert code == 0
    replies = await asyncio.gather(*calls)
    assert len(replies) == 5
    assert '"stopped"' in sp.log_text()


async def test_events_are_published_to_jetstream(services: ServiceSet, bus: Bus) -> None:
    from shoal_common.messages import Event

    class ProbeEvent(Event):
        TOPIC = "test.probe"
        value: int

    await bus.ensure_events_stream()
    await bus.publish_event(ProbeEvent(value=7), namespace="k8s.io", event_id="probe-1")
    await bus.publish_event(ProbeEvent(value=7), namespace="k8s.io", event_id="probe-1")
    js = bus.nc.jetstream()
    sub = await js.subscribe(subjects.event_filter(services.node.node_id, "k8s.io"),
                             ordered_consumer=True)
    msg = await sub.next_msg(timeout=5)
    assert msgspec.msgpack.decode(msg.data, type=ProbeEvent).value == 7
    assert msg.headers[headers.NAMESPACE] == "k8s.io"
    assert msg.headers[headers.TOPIC] == "test.probe"
    with pytest.raises(nats.errors.TimeoutError):
        await sub.next_msg(timeout=0.5)  # the duplicate publish was de-duplicated
    await sub.unsubscribe()


async def test_gateway_replicas_hand_the_cri_socket_over(services: ServiceSet) -> None:
    """A unix socket has one owner: the second gateway replica stands by, stopping it
    leaves the owner's socket alone, and killing the owner lets a standby take over."""
    import grpc

    owner = services.start("cri-gateway")
    await asyncio.to_thread(services.wait_serving, owner)
    standby = services.start("cri-gateway")
    await asyncio.to_thread(services.wait_serving, standby)
    third = services.start("cri-gateway")
    await asyncio.to_thread(services.wait_serving, third)
    assert "standing by" in standby.log_text() and "standing by" in third.log_text()

    async def version() -> str:
        async with grpc.aio.insecure_channel(f"unix://{services.node.cri_socket}") as ch:
            reply = await cri_grpc.RuntimeServiceStub(ch).Version(cri.VersionRequest(),
                                                                  timeout=5)
            return reply.runtime_name

    assert await version() == "shoal"
    assert await asyncio.to_thread(third.terminate) == 0  # a standby leaving...
    assert await version() == "shoal"  # ...leaves the owner's socket in place
    await asyncio.to_thread(owner.kill9)
    for _ in range(50):
        if "taking it over" in standby.log_text():
            break
        await asyncio.sleep(0.1)
    assert "taking it over" in standby.log_text()
    assert await version() == "shoal"


async def test_service_waits_for_jetstream_instead_of_exiting(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A service started while JetStream cannot answer (a cluster electing its meta leader,
    here a server without JetStream) waits for it, then serves once it answers."""
    port = free_port()
    root = tmp_path_factory.mktemp("late-js")
    node = Node(f"latejs-{uuid.uuid4().hex[:6]}", f"nats://127.0.0.1:{port}", root)
    services = ServiceSet(node)
    try:
        with nats_server(root / "nats-plain", port=port, jetstream=False):
            sp = services.start("puller")
            end = time.monotonic() + 30
            while "JetStream not ready" not in sp.log_text():
                assert sp.proc.poll() is None, sp.log_text()
                assert time.monotonic() < end, sp.log_text()
                await asyncio.sleep(0.2)
        with nats_server(root / "nats-js", port=port):
            await asyncio.to_thread(services.wait_serving, sp, 60)
            client = Bus(load_config(env={}, flags={"node_id": node.node_id,
                                                    "nats.url": node.nats_url}),
                         service="test", replica="test")
            await client.connect(wait=10)
            try:
                reply = await client.request("images", "ping", PingRequest(), PingReply)
                assert reply.replica == sp.replica
            finally:
                await client.close()
            services.stop_all()
    finally:
        services.stop_all()
