"""The puller service with `services.puller.config_path`: pulls through mirrors and TLS
registries declared only in a containerd certs.d tree (real registries), the tree read
again when it changes, and a malformed one refused at start and on reload."""

from __future__ import annotations

import asyncio
import shutil
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from shoal_common.bus import Bus
from shoal_common.errors import FailedPrecondition, NotFound
from shoal_common.messages.images import PullReply, PullRequest
from support.images import (
    Image,
    LayerBuilder,
    RegistryHTTPError,
    build_image,
    fetch_manifest,
    push,
)
from support.pki import Pki, make_pki
from support.processes import ServiceProcess, ServiceSet
from support.registry import Registry

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Registries:
    upstream: Registry  # what image references name; it does not hold hosts/app
    mirror: Registry  # holds hosts/app:1
    tls: Registry  # HTTPS (the test CA) over the mirror's storage
    image: Image
    pki: Pki


@pytest.fixture(scope="module")
def regs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registries]:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    image = build_image([LayerBuilder().file("hello.txt", "through the mirror\n").build()],
                        cmd=["true"])
    mirror_storage = tmp_path_factory.mktemp("mirror")
    with (Registry(tmp_path_factory.mktemp("upstream")) as upstream,
          Registry(mirror_storage) as mirror,
          Registry(mirror_storage, tls=(pki.server_cert, pki.server_key)) as tls):
        push(mirror.url, "hosts/app", "1", image)
        yield Registries(upstream, mirror, tls, image, pki)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())


async def start_puller(services: ServiceSet, config_path: Path) -> ServiceProcess:
    sp = services.start("puller", extra=["--set",
                                         f'services.puller.config_path="{config_path}"'])
    await asyncio.to_thread(services.wait_serving, sp)
    return sp


async def pull(bus: Bus, ref: str) -> PullReply:
    return await bus.request("images", "pull", PullRequest(ref=ref, pull_id=uuid.uuid4().hex),
                             PullReply, namespace="k8s.io", timeout=60, attempt_timeout=60,
                             retries=0)


def upstream_lacks(regs: Registries) -> None:
    with pytest.raises(RegistryHTTPError) as info:
        fetch_manifest(regs.upstream.url, "hosts/app", "1")
    assert info.value.status == 404


async def test_pull_through_a_mirror_declared_only_in_the_tree(
        services: ServiceSet, bus: Bus, regs: Registries, tmp_path: Path) -> None:
    upstream_lacks(regs)
    certs = tmp_path / "certs.d"
    write(certs / regs.upstream.host / "hosts.toml", f'''
        server = "{regs.upstream.url}"

        [host."{regs.mirror.url}"]
          capabilities = ["pull", "resolve"]
        ''')
    await start_puller(services, certs)
    reply = await pull(bus, f"{regs.upstream.host}/hosts/app:1")
    assert reply.image.id == regs.image.config_digest
    assert reply.image.manifest_digest == regs.image.digest


async def test_a_containerd_tree_used_unchanged(
        services: ServiceSet, bus: Bus, regs: Registries, tmp_path: Path) -> None:
    """A tree laid out and written as containerd's docs/hosts.md shows: the port form of a
    directory, a relative `ca`, Docker's certificate files, a _default, comments. The pull
    goes to the TLS mirror, trusted through the CA the tree holds."""
    upstream_lacks(regs)
    certs = tmp_path / "etc" / "containerd" / "certs.d"
    write(certs / "docker.io" / "hosts.toml", '''
        server = "https://docker.io"

        [host."https://registry-1.docker.io"]
          capabilities = ["pull", "resolve"]
        ''')
    write(certs / "_default" / "hosts.toml", '''
        [host."https://registry.example.com"]
          capabilities = ["pull", "resolve"]
        ''')
    host, port = regs.upstream.host.split(":")
    write(certs / f"{host}_{port}_" / "hosts.toml", f'''
        server = "{regs.upstream.url}"    # Exclude this to not use upstream

        [host."https://{regs.tls.host}"]
          capabilities = ["pull", "resolve"]
          ca = "mirror-ca.crt"                 # Or absolute path
        ''')
    shutil.copy(regs.pki.ca, certs / f"{host}_{port}_" / "mirror-ca.crt")
    # The TLS registry's own directory: Docker's pattern, no hosts.toml.
    (certs / regs.tls.host).mkdir()
    shutil.copy(regs.pki.ca, certs / regs.tls.host / "ca.crt")

    await start_puller(services, certs)
    reply = await pull(bus, f"{regs.upstream.host}/hosts/app:1")
    assert reply.image.manifest_digest == regs.image.digest
    reply = await pull(bus, f"{regs.tls.host}/hosts/app:1")  # https, by ca.crt
    assert reply.image.manifest_digest == regs.image.digest


async def test_a_malformed_tree_is_refused_at_start(services: ServiceSet,
                                                    regs: Registries, tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    toml = certs / regs.upstream.host / "hosts.toml"
    write(toml, f'''
        [host."{regs.mirror.url}"]
          capabilities = ["pull", "resolve", "mirror"]
        ''')
    sp = services.start("puller", extra=["--set", f'services.puller.config_path="{certs}"'])
    assert await asyncio.to_thread(sp.proc.wait, 30) == 1
    # The JSON log line escapes the quotes.
    assert (f"config key services.puller.config_path: {toml}: "
            f'host.\\"{regs.mirror.url}\\".capabilities[2]: \'mirror\' is not one of pull, '
            "resolve, push") in sp.log_text()

    # A CA file that is not PEM: refused when the start loads it.
    write(toml, f'''
        [host."{regs.mirror.url}"]
          ca = "ca.pem"
        ''')
    (toml.parent / "ca.pem").write_text("not a certificate\n")
    sp = services.start("puller", extra=["--set", f'services.puller.config_path="{certs}"'])
    assert await asyncio.to_thread(sp.proc.wait, 30) == 1
    assert f'{toml}: host.\\"{regs.mirror.url}\\".ca[0]: cannot load' in sp.log_text()


async def test_changes_apply_without_a_restart_and_a_broken_file_fails_pulls(
        services: ServiceSet, bus: Bus, regs: Registries, tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    (certs / "_default").mkdir(parents=True)
    await start_puller(services, certs)
    ref = f"{regs.upstream.host}/hosts/app:1"
    with pytest.raises(NotFound):
        await pull(bus, ref)  # no mirror yet

    toml = certs / regs.upstream.host / "hosts.toml"
    write(toml, f'[host."{regs.mirror.url}"]\ncapabilities = ["pull", "resolve"]\n')
    await asyncio.sleep(1.1)  # each directory is looked at again after a second
    assert (await pull(bus, ref)).image.manifest_digest == regs.image.digest

    write(toml, f'[host."{regs.mirror.url}"]\ncapabilities = "pull"\n')
    await asyncio.sleep(1.1)
    started = time.monotonic()
    with pytest.raises(FailedPrecondition) as info:
        await pull(bus, ref)
    assert time.monotonic() - started < 5
    assert (f"its host configuration is refused: {toml}: "
            f'host."{regs.mirror.url}".capabilities: must be a list') in info.value.message

    write(toml, f'[host."{regs.mirror.url}"]\ncapabilities = ["pull", "resolve"]\n')
    await asyncio.sleep(1.1)
    assert (await pull(bus, ref)).image.manifest_digest == regs.image.digest
