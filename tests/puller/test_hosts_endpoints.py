"""The registry client reading a certs.d tree: which endpoints, in which order, for which
capabilities, how they combine with `registries`, and pulls through real registries (plain
and TLS, with a CA, client certificates and Docker's certificate files from the tree)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from shoal_common.errors import FailedPrecondition, NotFound, ShoalError
from shoal_puller.config import RegistryHostConfig
from shoal_puller.registry import RegistryClient, parse_reference
from shoal_puller.registry._http import Backoff
from shoal_puller.registry.endpoints import PULL, PUSH, RESOLVE, Endpoints
from shoal_puller.registry.hosts_tree import HostsDir
from shoal_puller.registry.transport import Transport
from support.faulty_registry import FaultyRegistry, MakeClient, collect
from support.images import Image, LayerBuilder, build_image, push
from support.pki import Pki, make_pki
from support.registry import Registry

pytestmark = pytest.mark.e2e


def tree(root: Path, **dirs: str) -> HostsDir:
    """A certs.d tree: directory name (`__` for `:`) -> hosts.toml text, loaded."""
    for name, text in dirs.items():
        d = root / name.replace("__", ":")
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts.toml").write_text(text)
    hosts = HostsDir(root, recheck=0)
    hosts.load_all()
    return hosts


def names(endpoints: Endpoints, domain: str, need: frozenset[str] = PULL) -> list[str]:
    return [ep.name for ep in endpoints.all(domain, need)]


# ------------------------------------------------------------- which endpoints (no I/O)


def test_order_capabilities_and_default_server(tmp_path: Path) -> None:
    hosts = tree(tmp_path, **{
        "docker.io": 'server = "https://registry-1.docker.io"\n'
                     '[host."https://public-mirror.example.com"]\ncapabilities = ["pull"]\n'
                     '[host."https://docker-mirror.internal"]\n'
                     'capabilities = ["pull", "resolve"]\n',
        "reg.example_5000_": '[host."https://m.example"]\ncapabilities = ["pull", "resolve"]\n',
        "127.0.0.1__5000": '[host."https://m.example"]\n',
        "127.0.0.1__5001": 'skip_verify = true\n',
    })
    e = Endpoints({}, 30.0, hosts)
    assert names(e, "docker.io", PULL) == ["https://public-mirror.example.com",
                                           "https://docker-mirror.internal",
                                           "https://registry-1.docker.io"]
    assert names(e, "docker.io", RESOLVE) == ["https://docker-mirror.internal",
                                              "https://registry-1.docker.io"]
    assert names(e, "docker.io", PUSH) == ["https://registry-1.docker.io"]
    assert [ep.final for ep in e.all("docker.io")] == [False, False, True]
    # No server: the registry itself, as Shoal reaches it without a tree.
    assert names(e, "reg.example:5000") == ["https://m.example", "https://reg.example:5000"]
    assert names(e, "127.0.0.1:5000") == ["https://m.example", "http://127.0.0.1:5000"]
    assert names(e, "127.0.0.1:5001") == ["https://127.0.0.1:5001"]  # TLS settings: https
    assert names(e, "quay.io") == ["https://quay.io"]  # no directory: untouched


def test_mirrors_get_the_namespace_and_headers(tmp_path: Path) -> None:
    hosts = tree(tmp_path, **{"reg.example": (
        'server = "https://reg.example"\n[header]\nx-upstream = "u"\n'
        '[host."https://m.example/cache"]\n[host."https://m.example/cache".header]\n'
        'x-mirror = ["a", "b"]\n')})
    mirror, server = Endpoints({}, 30.0, hosts).all("reg.example")
    ref = parse_reference("reg.example/team/app:1")
    assert str(mirror.url(ref, "manifests", "1")) == (
        "https://m.example/cache/v2/team/app/manifests/1?ns=reg.example")
    assert str(server.url(ref, "manifests", "1")) == "https://reg.example/v2/team/app/manifests/1"
    assert (mirror.headers, server.headers) == ((("x-mirror", "a, b"),), (("x-upstream", "u"),))
    assert mirror.mirror and not server.mirror


def test_an_http_host_with_tls_settings_is_tried_over_https_first(tmp_path: Path) -> None:
    hosts = tree(tmp_path, **{"docker.io": (
        'server = "https://registry-1.docker.io"\n'
        '[host."http://192.168.31.250:5000"]\ncapabilities = ["pull", "resolve", "push"]\n'
        "skip_verify = true\n"
        '[host."http://plain.example:5000"]\n[host."http://tls.example"]\nca = []\n'
        'skip_verify = false\n[host."http://port80.example:80"]\nskip_verify = true\n')})
    assert names(Endpoints({}, 30.0, hosts), "docker.io") == [
        "https://192.168.31.250:5000", "http://192.168.31.250:5000",
        "http://plain.example:5000", "https://tls.example", "http://tls.example",
        "http://port80.example", "https://registry-1.docker.io"]


def test_how_the_tree_and_registries_combine(tmp_path: Path) -> None:
    hosts = tree(tmp_path, **{
        "own.example": '[host."https://tree-mirror.example"]\n',
        "_default": '[host."https://default-mirror.example"]\n',
    })
    e = Endpoints({
        # Its own directory wins over its registries entry (credentials still apply).
        "own.example": RegistryHostConfig(mirrors=["https://shoal-mirror.example"],
                                          username="u", password="p"),
        # A registries entry that sets endpoints or TLS wins over _default...
        "set.example": RegistryHostConfig(mirrors=["https://shoal-mirror.example"]),
        "tls.example": RegistryHostConfig(skip_verify=True),
        # ...one with credentials only does not.
        "creds.example": RegistryHostConfig(username="u", password="p"),
    }, 30.0, hosts)
    assert names(e, "own.example") == ["https://tree-mirror.example", "https://own.example"]
    assert e.config("own.example").username == "u"
    assert names(e, "set.example") == ["https://shoal-mirror.example", "https://set.example"]
    assert names(e, "tls.example") == ["https://tls.example"]
    assert names(e, "creds.example") == ["https://default-mirror.example",
                                         "https://creds.example"]
    # Shoal's own mirrors never take a push.
    assert names(e, "set.example", PUSH) == ["https://set.example"]


def test_no_endpoint_with_the_capability_and_a_broken_file(tmp_path: Path) -> None:
    hosts = tree(tmp_path, **{"reg.example": (
        'server = "https://m.example"\ncapabilities = ["pull"]\n')})
    e = Endpoints({}, 30.0, hosts)
    assert names(e, "reg.example") == ["https://m.example"]
    with pytest.raises(FailedPrecondition, match=r"registry reg\.example: no endpoint may "
                                                 r"pull and resolve \(as .*hosts\.toml says\)"):
        e.all("reg.example", RESOLVE)
    (tmp_path / "reg.example" / "hosts.toml").write_text("server = [1]\n")
    with pytest.raises(FailedPrecondition) as info:
        e.all("reg.example")
    assert info.value.message == (
        f"registry reg.example: its host configuration is refused: "
        f"{tmp_path}/reg.example/hosts.toml: server: must be a URL such as "
        f'"https://mirror.example", not a list')


# ------------------------------------------------------------ through real registries


@dataclass(frozen=True)
class Two:
    upstream: Registry
    mirror: Registry
    on_mirror: Image  # pushed to the mirror only, as hosts/app:1
    on_upstream: Image  # pushed to the upstream only, as hosts/up:1


def _image(text: str) -> Image:
    return build_image([LayerBuilder().file("hello.txt", text).build()], cmd=["true"])


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Two]:
    with (Registry(tmp_path_factory.mktemp("upstream")) as upstream,
          Registry(tmp_path_factory.mktemp("mirror")) as mirror):
        on_mirror, on_upstream = _image("from the mirror\n"), _image("from the upstream\n")
        push(mirror.url, "hosts/app", "1", on_mirror)
        push(upstream.url, "hosts/up", "1", on_upstream)
        yield Two(upstream, mirror, on_mirror, on_upstream)


async def test_pull_through_a_mirror_with_pull_and_resolve(tmp_path: Path, two: Two,
                                                           make_client: MakeClient) -> None:
    hosts = tree(tmp_path, **{two.upstream.host.replace(":", "__"): (
        f'server = "{two.upstream.url}"\n[host."{two.mirror.url}"]\n'
        'capabilities = ["pull", "resolve"]\n')})
    client = make_client(hosts=hosts)
    ref = parse_reference(f"{two.upstream.host}/hosts/app:1")
    manifest = await client.get_manifest(ref, "1")
    assert (manifest.digest, manifest.endpoint) == (two.on_mirror.digest, two.mirror.url)
    layer = two.on_mirror.layers[0]
    assert await collect(client.fetch_blob(ref, layer.digest)) == layer.blob
    # What the mirror lacks comes from the server, after it.
    up = parse_reference(f"{two.upstream.host}/hosts/up:1")
    assert (await client.get_manifest(up, "1")).endpoint == two.upstream.url


async def test_a_pull_only_mirror_never_resolves_a_tag(tmp_path: Path, two: Two,
                                                       make_client: MakeClient) -> None:
    hosts = tree(tmp_path, **{two.upstream.host.replace(":", "__"): (
        f'server = "{two.upstream.url}"\n[host."{two.mirror.url}"]\ncapabilities = ["pull"]\n')})
    client = make_client(hosts=hosts)
    ref = parse_reference(f"{two.upstream.host}/hosts/app:1")
    with pytest.raises(NotFound) as info:
        await client.get_manifest(ref, "1")  # asked of the upstream alone
    assert "mirrors tried first" not in info.value.message
    # By digest (a pull, verified by its digest) the mirror serves it.
    manifest = await client.get_manifest(ref, two.on_mirror.digest)
    assert manifest.endpoint == two.mirror.url


async def test_a_server_only_tree_never_asks_the_registry(tmp_path: Path, two: Two,
                                                          make_client: MakeClient) -> None:
    hosts = tree(tmp_path, _default=f'server = "{two.mirror.url}"\n')
    client = make_client(hosts=hosts)
    assert client.endpoints(two.upstream.host) == [two.mirror.url]
    ok = parse_reference(f"{two.upstream.host}/hosts/app:1")
    assert (await client.get_manifest(ok, "1")).endpoint == two.mirror.url
    with pytest.raises(NotFound):
        await client.get_manifest(parse_reference(f"{two.upstream.host}/hosts/up:1"), "1")


async def test_headers_and_ns_reach_the_mirror(tmp_path: Path, two: Two,
                                               make_client: MakeClient) -> None:
    async with FaultyRegistry(two.mirror.url) as front:
        hosts = tree(tmp_path, **{two.upstream.host.replace(":", "__"): (
            f'[host."{front.url}"]\ncapabilities = ["pull", "resolve"]\n'
            '[host."' + front.url + '".header]\nx-team = ["a", "b"]\n')})
        client = make_client(hosts=hosts)
        ref = parse_reference(f"{two.upstream.host}/hosts/app:1")
        await client.get_manifest(ref, "1")
        (seen,) = front.requests
        assert seen.path == "/v2/hosts/app/manifests/1"
        assert seen.query == f"ns={two.upstream.host}"
        assert seen.headers["x-team"] == "a, b"


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_registry(two: Two, pki: Pki) -> Iterator[Registry]:
    """HTTPS over the mirror's storage (so it holds hosts/app:1)."""
    with Registry(two.mirror.storage_dir, tls=(pki.server_cert, pki.server_key)) as reg:
        yield reg


@pytest.fixture(scope="module")
def mtls_registry(two: Two, pki: Pki) -> Iterator[Registry]:
    """HTTPS that also requires a client certificate signed by the test CA."""
    with Registry(two.mirror.storage_dir, tls=(pki.server_cert, pki.server_key),
                  client_ca=pki.ca) as reg:
        yield reg


def _copy(d: Path, **files: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        shutil.copy(src, d / name.replace("__", "."))


async def _pulls(client: RegistryClient, registry: Registry, two: Two) -> None:
    ref = parse_reference(f"{registry.host}/hosts/app:1")
    manifest = await client.get_manifest(ref, "1")
    assert (manifest.digest, manifest.endpoint) == (two.on_mirror.digest, registry.url)
    layer = two.on_mirror.layers[0]
    assert await collect(client.fetch_blob(ref, layer.digest)) == layer.blob


async def test_tls_with_a_ca_from_the_tree(tmp_path: Path, two: Two, pki: Pki,
                                           tls_registry: Registry,
                                           make_client: MakeClient) -> None:
    d = tmp_path / f"{tls_registry.host.replace(':', '_')}_"
    _copy(d, ca__pem=pki.ca)
    hosts = tree(tmp_path, **{d.name: f'server = "{tls_registry.url}"\nca = "ca.pem"\n'})
    await _pulls(make_client(hosts=hosts), tls_registry, two)
    # Without the CA the certificate is not trusted.
    (d / "hosts.toml").write_text(f'server = "{tls_registry.url}"\n')
    with pytest.raises(ShoalError, match="certificate verify failed"):
        await make_client(hosts=HostsDir(tmp_path, recheck=0), max_attempts=1).get_manifest(
            parse_reference(f"{tls_registry.host}/hosts/app:1"), "1")


async def test_tls_from_docker_certificate_files(tmp_path: Path, two: Two, pki: Pki,
                                                 tls_registry: Registry,
                                                 mtls_registry: Registry,
                                                 make_client: MakeClient) -> None:
    # No hosts.toml: ca.crt is trusted, client.cert/client.key offered; a loopback registry
    # with TLS settings is spoken to over https.
    _copy(tmp_path / tls_registry.host, ca__crt=pki.ca)
    _copy(tmp_path / mtls_registry.host, ca__crt=pki.ca, client__cert=pki.client_cert,
          client__key=pki.client_key)
    hosts = HostsDir(tmp_path, recheck=0)
    hosts.load_all()
    client = make_client(hosts=hosts)
    await _pulls(client, tls_registry, two)
    await _pulls(client, mtls_registry, two)


async def test_mutual_tls_with_client_pairs(tmp_path: Path, two: Two, pki: Pki,
                                            mtls_registry: Registry,
                                            make_client: MakeClient) -> None:
    d = tmp_path / mtls_registry.host
    _copy(d, ca__pem=pki.ca, client__pem=pki.client_cert, client__key=pki.client_key)
    hosts = tree(tmp_path, **{d.name.replace(":", "__"): (
        f'server = "{mtls_registry.url}"\nca = "ca.pem"\n'
        'client = [["client.pem", "client.key"]]\n')})
    await _pulls(make_client(hosts=hosts), mtls_registry, two)
    (d / "hosts.toml").write_text(f'server = "{mtls_registry.url}"\nca = "ca.pem"\n')
    with pytest.raises(ShoalError):
        await make_client(hosts=HostsDir(tmp_path, recheck=0), max_attempts=1).get_manifest(
            parse_reference(f"{mtls_registry.host}/hosts/app:1"), "1")


async def test_an_http_mirror_with_skip_verify_is_reached_over_https(
        tmp_path: Path, two: Two, tls_registry: Registry, make_client: MakeClient) -> None:
    """containerd's "Bypass TLS Verification" example: an http:// host with skip_verify
    is tried over https first, and a TLS registry with an untrusted certificate serves."""
    hosts = tree(tmp_path, **{two.upstream.host.replace(":", "__"): (
        f'server = "{two.upstream.url}"\n'
        f'[host."http://{tls_registry.host}"]\ncapabilities = ["pull", "resolve", "push"]\n'
        "skip_verify = true\n")})
    client = make_client(hosts=hosts)
    manifest = await client.get_manifest(parse_reference(f"{two.upstream.host}/hosts/app:1"),
                                         "1")
    assert manifest.endpoint == tls_registry.url


def test_dial_timeout_bounds_the_connect_of_that_endpoint_only(tmp_path: Path) -> None:
    hosts = tree(tmp_path, **{"reg.example": (
        '[host."https://m.example"]\ndial_timeout = "1.5s"\n')})
    mirror, server = Endpoints({}, 30.0, hosts).all("reg.example")
    transport = Transport(session=None, user_agent="t", max_attempts=1, connect_timeout=10.0,
                          read_timeout=30.0, backoff=Backoff(0.1, 1.0, 1.0))
    assert (transport.timeout_for(mirror).sock_connect,
            transport.timeout_for(mirror).sock_read) == (1.5, 30.0)
    assert transport.timeout_for(server).sock_connect == 10.0
