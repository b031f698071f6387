"""The secured bus `shoal up` runs by default: every service its own NATS user and subjects.
Real flows (pull → unpack, a pod with a container) work; a client without credentials, or
with the puller's, cannot create a container or read the events stream."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import nats
import nats.errors
import pytest
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc as cri_grpc
from nats.aio.client import Client
from support.images import busybox_image, pause_image, push
from support.ports import free_port
from support.processes import SHOAL, metrics_sets, pids_mentioning, shoal_up_argv
from support.registry import Registry

pytestmark = pytest.mark.e2e
NODE = "secnode"


class SecuredShoal:
    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.url = f"nats://127.0.0.1:{port}"
        self.auth = root / "state" / "nats" / "auth"
        self.socket = root / "run" / "cri.sock"

    def password(self, user: str) -> str:
        return (self.auth / f"{user}.password").read_text().strip()

    async def connect_as(self, user: str) -> tuple[Client, list[str]]:
        """A connection with `user`'s credentials and no reconnects, and the list the
        errors the server sends it (permission violations) go to."""
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await nats.connect(self.url, user=user, password=self.password(user),
                                inbox_prefix=f"_INBOX_{user}", error_cb=on_error,
                                allow_reconnect=False)
        return nc, errors


@pytest.fixture(scope="module")
def secured(registry: Registry, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[SecuredShoal, dict[str, str]]]:
    push(registry.url, "sec/pause", "1", pause_image())
    push(registry.url, "sec/busybox", "1", busybox_image())
    images = {"pause": f"{registry.host}/sec/pause:1", "busybox": f"{registry.host}/sec/busybox:1"}
    root = tmp_path_factory.mktemp("secured")
    port = free_port()
    sets = [f"nats.embedded.listen=127.0.0.1:{port}", f'cri.sandbox_image="{images["pause"]}"',
            'services.executor.pod_subnet="10.170.0.0/24"',
            'services.executor.cni_bridge="shoalsec0"', *metrics_sets()]
    argv = shoal_up_argv(root, NODE, sets)
    out = root / "up.out"
    with open(out, "wb") as fh, open(root / "up.err", "wb") as err:
        up = subprocess.Popen(argv, stdout=fh, stderr=err, stdin=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 60
        while "Press Ctrl-C" not in out.read_text():
            assert up.poll() is None and time.monotonic() < end, (root / "up.err").read_text()
            time.sleep(0.2)
        yield SecuredShoal(root, port), images
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)
        subprocess.run(["ip", "link", "delete", "shoalsec0"], capture_output=True)
    assert pids_mentioning(str(root)) == []


async def test_real_flows_work_under_per_service_permissions(
        secured: tuple[SecuredShoal, dict[str, str]], tmp_path: Path) -> None:
    shoal, images = secured
    async with grpc.aio.insecure_channel(f"unix://{shoal.socket}") as channel:
        runtime = cri_grpc.RuntimeServiceStub(channel)
        image_api = cri_grpc.ImageServiceStub(channel)
        await image_api.PullImage(cri.PullImageRequest(
            image=cri.ImageSpec(image=images["busybox"])))
        config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(
            name="sec", uid=uuid.uuid4().hex, namespace="default"), log_directory=str(tmp_path))
        pod = (await runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
               ).pod_sandbox_id
        try:
            cid = (await runtime.CreateContainer(cri.CreateContainerRequest(
                pod_sandbox_id=pod, sandbox_config=config, config=cri.ContainerConfig(
                    metadata=cri.ContainerMetadata(name="c"),
                    image=cri.ImageSpec(image=images["busybox"]), command=["sleep", "3600"])))
            ).container_id
            events = runtime.GetContainerEvents(cri.GetEventsRequest())  # its own JS consumer
            await asyncio.sleep(0.5)
            await runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
            status = await runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid))
            assert status.status.state == cri.CONTAINER_RUNNING
            async with asyncio.timeout(10):
                event = await events.read()
            assert (event.container_id, event.container_event_type) == (
                cid, cri.CONTAINER_STARTED_EVENT)
            events.cancel()
            await runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
        finally:  # a failed check must not leave the pod running on the host
            await runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))


async def test_no_credentials_cannot_connect(
        secured: tuple[SecuredShoal, dict[str, str]]) -> None:
    shoal, _ = secured
    with pytest.raises(Exception, match=r"(?i)authorization|no servers"):
        await nats.connect(shoal.url, max_reconnect_attempts=0, connect_timeout=2,
                           allow_reconnect=False)


async def test_puller_credentials_cannot_create_containers_or_read_events(
        secured: tuple[SecuredShoal, dict[str, str]]) -> None:
    shoal, _ = secured
    nc, errors = await shoal.connect_as("puller")
    try:
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await nc.request(f"shoal.v1.{NODE}.tasks.container.create", b"\x80", timeout=1)
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await nc.request(f"shoal.v1.{NODE}.monitor.create", b"\x80", timeout=1)
        sub = await nc.subscribe(f"shoal.v1.{NODE}.events.>")
        js = nc.jetstream()
        with pytest.raises(Exception):  # noqa: B017 (any refusal will do; none must succeed)
            await js.add_consumer("SHOAL_EVENTS", durable_name="spy", timeout=2)
        await asyncio.sleep(0.5)
        await sub.unsubscribe()
    finally:
        await nc.close()
    text = " ".join(errors).lower()
    assert 'permissions violation for publish to "shoal.v1.secnode.tasks.container.create"' in text
    assert 'permissions violation for publish to "shoal.v1.secnode.monitor.create"' in text
    assert 'permissions violation for subscription to "shoal.v1.secnode.events.>"' in text
    assert "permissions violation for publish to \"$js.api.consumer" in text


async def test_admin_is_what_the_cli_uses(secured: tuple[SecuredShoal, dict[str, str]]) -> None:
    shoal, _ = secured
    result = await asyncio.to_thread(subprocess.run, [
        SHOAL, "status", "--node-id", NODE, "--nats-url", shoal.url,
        "--state-root", str(shoal.root / "state"), "--run-root", str(shoal.root / "run")],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (shoal.auth / "admin.password").stat().st_mode & 0o777 == 0o600
    assert (shoal.root / "run" / "nats" / "nats-server.conf").stat().st_mode & 0o777 == 0o600


async def test_the_gateway_publishes_no_event(
        secured: tuple[SecuredShoal, dict[str, str]]) -> None:
    """A gateway that could publish events could forge images.delete for the snapshotter."""
    shoal, _ = secured
    nc, errors = await shoal.connect_as("cri-gateway")
    try:
        await nc.publish(f"shoal.v1.{NODE}.events.k8s%2Eio.images.delete", b"\x80")
        await nc.flush()
        await asyncio.sleep(0.5)
    finally:
        await nc.close()
    assert (f'permissions violation for publish to "shoal.v1.{NODE.lower()}.events.'
            in " ".join(errors).lower())


async def test_the_docker_gateway_publishes_only_docker_events(
        secured: tuple[SecuredShoal, dict[str, str]]) -> None:
    """Its `docker.event`s go to the stream (for `docker events --since`); an images.delete
    from it is refused like any other gateway's."""
    shoal, _ = secured
    nc, errors = await shoal.connect_as("docker-gateway")
    try:
        js = nc.jetstream()
        ack = await js.publish(f"shoal.v1.{NODE}.events.moby.docker.event", b"\x80")
        assert ack.seq > 0
        await nc.publish(f"shoal.v1.{NODE}.events.moby.images.delete", b"\x80")
        await nc.flush()
        await asyncio.sleep(0.5)
    finally:
        await nc.close()
    assert (f'permissions violation for publish to "shoal.v1.{NODE.lower()}.events.moby.images'
            in " ".join(errors).lower())
