"""The built-in pause image (shoal.local/pause:1): made by the puller at start from Debian's
catatonit, the same digests every start and on every replica, unpacked by the snapshotter
like a pulled image, and a pull of its host never touches the network."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import subprocess
import tarfile
import textwrap
import uuid
from pathlib import Path

import pytest
import structlog
from shoal_common import subjects
from shoal_common.bus import Bus
from shoal_common.config import ConfigError, load_config
from shoal_common.errors import NotFound
from shoal_common.messages import Empty, Event
from shoal_common.messages.images import ImageGetRequest, ImageInfo, PullReply, PullRequest
from shoal_common.messages.snapshots import (
    MountsReply,
    SnapshotKeyRequest,
    UnpackReply,
    UnpackRequest,
    ViewRequest,
)
from shoal_puller.domain.builtin import (
    BUILTIN_PAUSE,
    CATATONIT,
    BuiltinImages,
    NotStatic,
    build_pause,
    check_static,
)
from shoal_puller.registry import Platform
from shoal_puller.store.content import ContentStore
from shoal_puller.store.images import ImageStore
from support.processes import Node, ServiceProcess, ServiceSet

NS = "k8s.io"


def expected() -> tuple[str, str, str]:
    """(manifest, config, layer) digests for this host's catatonit (the recipe itself is
    checked by the first test)."""
    built = build_pause(CATATONIT.read_bytes(), Platform.host())
    return built.manifest_digest, built.config_digest, built.layer_digest


async def get(bus: Bus, ref: str) -> ImageInfo:
    return await bus.request("images", "get", ImageGetRequest(ref=ref, with_config=True),
                             ImageInfo, namespace=NS, timeout=10, attempt_timeout=10)


async def pull(bus: Bus, ref: str) -> PullReply:
    return await bus.request("images", "pull", PullRequest(ref=ref, pull_id=uuid.uuid4().hex),
                             PullReply, namespace=NS, timeout=30, attempt_timeout=30, retries=0)


async def start(services: ServiceSet, service: str = "puller", *sets: str,
                env: dict[str, str] | None = None) -> ServiceProcess:
    sets = (f'cri.sandbox_image="{BUILTIN_PAUSE}"', *sets)  # the default outside tests
    sp = services.start(service, extra=[a for s in sets for a in ("--set", s)], env=env)
    await asyncio.to_thread(services.wait_serving, sp)
    return sp


def blob_files(node: Node) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns) of every committed blob: a rewrite would change them."""
    blobs = node.state_root / "puller" / "content" / "blobs" / "sha256"
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in blobs.iterdir()}


# -- the image itself, without processes -----------------------------------------------------

def test_the_image_is_a_pure_function_of_the_binary_and_platform() -> None:
    binary = CATATONIT.read_bytes()
    a, b = build_pause(binary, Platform.host()), build_pause(binary, Platform.host())
    assert a == b
    with tarfile.open(fileobj=io.BytesIO(a.layer)) as tar:
        [member] = tar.getmembers()
        assert (member.name, member.mode, member.uid, member.gid, member.mtime) == (
            "catatonit", 0o755, 0, 0, 0)
        assert tar.extractfile(member).read() == binary  # type: ignore[union-attr]
    config = json.loads(a.config)
    host = Platform.host()
    assert (config["os"], config["architecture"]) == (host.os, host.architecture)
    assert config["config"]["Entrypoint"] == ["/catatonit", "-P"]
    assert config["config"]["User"] == "65535:65535"
    assert config["rootfs"]["diff_ids"] == [a.layer_digest]
    manifest = json.loads(a.manifest)
    assert manifest["config"]["digest"] == a.config_digest
    assert manifest["layers"] == [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                   "digest": a.layer_digest, "size": len(a.layer)}]
    other = build_pause(binary, Platform("linux", "arm64", "v8"))
    assert other.layer_digest == a.layer_digest and other.config_digest != a.config_digest


def test_only_a_static_elf_binary_is_used() -> None:
    check_static(CATATONIT.read_bytes(), "catatonit")  # Debian's is static
    with pytest.raises(NotStatic, match="dynamically linked"):
        check_static(Path("/bin/ls").read_bytes(), "ls")
    with pytest.raises(NotStatic, match="not an ELF"):
        check_static(b"#!/bin/sh\n", "script")


async def test_without_catatonit_start_warns_and_skips(tmp_path: Path) -> None:
    content = ContentStore(tmp_path / "content")
    images = ImageStore(tmp_path / "metadata.db")
    await images.open()
    published: list[Event] = []

    async def publish(event: Event, namespace: str, wait_ack: bool) -> None:
        published.append(event)

    builtins = BuiltinImages(content, images, publish, catatonit=tmp_path / "absent")
    try:
        with structlog.testing.capture_logs() as logs:
            assert await builtins.ensure() is None
        assert [entry["log_level"] for entry in logs] == ["warning"]
        assert "apt-get install catatonit" in logs[0]["event"]
        assert content.list_digests() == [] and published == []
        assert await images.list_images(NS) == []
    finally:
        await images.close()


def test_the_reserved_host_cannot_be_configured_as_a_registry() -> None:
    for host in ("shoal.local", "shoal.local:5000"):
        with pytest.raises(ConfigError, match="built-in image host"):
            load_config(env={}, overrides=[
                f'services.puller.registries."{host}".mirrors=["http://127.0.0.1:1"]'])


# -- a real puller ---------------------------------------------------------------------------

@pytest.mark.e2e
async def test_exists_after_start_with_stable_digests_across_restarts_and_replicas(
        node: Node, services: ServiceSet, bus: Bus) -> None:
    manifest, config, layer = expected()
    events: list[str] = []

    async def on_event(msg: object) -> None:
        events.append(msg.subject)  # type: ignore[attr-defined]

    await bus.nc.subscribe(subjects.event_filter(node.node_id, NS, "images.*"), cb=on_event)
    first = await start(services)
    info = await get(bus, BUILTIN_PAUSE)
    assert (info.target_digest, info.id) == (manifest, config)
    assert [layer_info.digest for layer_info in info.layers] == [layer]
    assert sorted(info.names) == sorted([BUILTIN_PAUSE, f"shoal.local/pause@{manifest}"])
    assert json.loads(info.config)["config"]["Entrypoint"] == ["/catatonit", "-P"]
    files = blob_files(node)
    assert sorted(files) == sorted(d.removeprefix("sha256:") for d in (manifest, config, layer))
    blobs = node.state_root / "puller" / "content" / "blobs" / "sha256"
    for name in files:  # committed through the store: each file hashes to its name
        assert hashlib.sha256((blobs / name).read_bytes()).hexdigest() == name
    await bus.nc.flush()
    await asyncio.sleep(0.2)
    assert sorted(events) == [subjects.event(node.node_id, NS, "images.create")] * 2

    assert first.terminate() == 0
    await start(services)  # a restart...
    await start(services)  # ...and a second replica beside it
    for _ in range(3):  # whichever replica answers
        again = await get(bus, BUILTIN_PAUSE)
        assert (again.target_digest, again.id, again.created) == (manifest, config, info.created)
    assert blob_files(node) == files  # not one blob rewritten
    await bus.nc.flush()
    await asyncio.sleep(0.2)
    assert len(events) == 2  # no create or update from either start


@pytest.mark.e2e
@pytest.mark.usefixtures("root")  # mounts
async def test_the_snapshotter_unpacks_it_to_a_rootfs_that_runs_catatonit(
        node: Node, services: ServiceSet, bus: Bus) -> None:
    await start(services)
    snapshotter = await start(services, "snapshotter")
    info = await get(bus, BUILTIN_PAUSE)
    for _ in range(200):  # from the images.create event, like any pulled image
        if '"image unpacked"' in snapshotter.log_text():
            break
        await asyncio.sleep(0.05)
    unpacked = await bus.request("snapshots", "unpack", UnpackRequest(
        image=BUILTIN_PAUSE, layers=info.layers), UnpackReply, namespace=NS, timeout=30,
        attempt_timeout=30)
    assert unpacked == UnpackReply(chain_id=info.layers[0].chain_id, unpacked=0)
    view = await bus.request("snapshots", "view", ViewRequest(
        key="builtin-view", parent=unpacked.chain_id), MountsReply, namespace=NS, timeout=30)
    target = node.root / "rootfs"
    target.mkdir()
    [mount] = view.mounts
    subprocess.run(["mount", "-o", ",".join(mount.options), mount.source, str(target)],
                   check=True)
    try:
        assert sorted(p.name for p in target.iterdir()) == ["catatonit"]
        assert (target / "catatonit").stat().st_mode & 0o777 == 0o755
        assert (target / "catatonit").read_bytes() == CATATONIT.read_bytes()
        # Alone in its rootfs, it runs: nothing else is needed.
        ran = subprocess.run(["chroot", str(target), "/catatonit", "--version"],
                             capture_output=True, text=True, timeout=10)
        assert ran.returncode == 0 and "catatonit" in ran.stdout + ran.stderr, ran
    finally:
        subprocess.run(["umount", str(target)], check=False)
        await bus.request("snapshots", "remove", SnapshotKeyRequest(key="builtin-view"),
                          Empty, namespace=NS, timeout=30)


# Installed into the puller through PYTHONPATH: every name lookup and connect the process
# makes (asyncio's and aiohttp's end in these socket calls) is appended to a file.
AUDIT_HOOK = textwrap.dedent("""
    import os, sys
    _out = os.environ["NET_AUDIT_LOG"]
    def _hook(event, args):
        if event in ("socket.getaddrinfo", "socket.connect"):
            with open(_out, "a") as fh:
                fh.write(f"{event} {args[0] if event == 'socket.getaddrinfo' else args[1]}\\n")
    sys.addaudithook(_hook)
""")


@pytest.mark.e2e
async def test_a_pull_of_the_reserved_host_never_opens_a_connection(
        services: ServiceSet, bus: Bus, tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(AUDIT_HOOK)
    net_log = tmp_path / "net.log"
    env = {"PYTHONPATH": str(tmp_path), "NET_AUDIT_LOG": str(net_log)}
    await start(services, "puller", "services.puller.max_attempts=1", env=env)
    assert "socket.connect" in net_log.read_text()  # the hook works: NATS was dialled
    net_log.write_text("")

    manifest, config, _ = expected()
    assert (await pull(bus, BUILTIN_PAUSE)).image.id == config
    assert (await pull(bus, f"shoal.local/pause@{manifest}")).image.id == config
    for ref in ("shoal.local/pause:2", "shoal.local/other:1", "shoal.local:5000/pause:1",
                "shoal.local/pause@sha256:" + "0" * 64):
        with pytest.raises(NotFound, match="built-in"):
            await pull(bus, ref)
    assert net_log.read_text() == ""

    # The control: a name under any other host is looked up.
    with pytest.raises(Exception):  # noqa: B017 (whatever the resolver says)
        await pull(bus, "absent.invalid/pause:1")
    assert "socket.getaddrinfo absent.invalid" in net_log.read_text()
