"""RegistryClient against the real registry, directly and through fault-injecting fronts."""

from __future__ import annotations

import json
import ssl
import time

import pytest
from aiohttp import web
from prometheus_client import REGISTRY as PROMETHEUS
from shoal_common.errors import FailedPrecondition, Invalid, NotFound, ShoalError, Unavailable
from shoal_puller.config import RegistryHostConfig
from shoal_puller.registry import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Credentials,
    Platform,
    RegistryClient,
    parse_reference,
    select_manifest,
)
from support.faulty_registry import (
    BlobStorage,
    FaultyRegistry,
    MakeClient,
    Pushed,
    TokenServer,
    basic_gate,
    collect,
    sha256,
)
from support.images import Layer
from support.pki import Pki, make_pki
from support.ports import free_port
from support.registry import Registry

pytestmark = pytest.mark.e2e


def _metric(name: str, **labels: str) -> float:
    return PROMETHEUS.get_sample_value(name, labels) or 0.0


# ----------------------------------------------------------------------------- pulling


async def test_pull_oci_image(registry: Registry, pushed: Pushed,
                              make_client: MakeClient) -> None:
    client = make_client()
    ref = parse_reference(f"{registry.host}/puller/busybox:oci")
    fetched_before = _metric("shoal_puller_fetched_bytes_total", registry=registry.host)

    manifest = await client.get_manifest(ref, ref.object)
    assert manifest.media_type == OCI_MANIFEST
    assert manifest.digest == pushed.busybox.digest
    assert manifest.body == pushed.busybox.manifest_bytes
    assert manifest.endpoint == registry.url
    assert not manifest.is_index
    assert await client.get_manifest(ref, manifest.digest) == manifest

    doc = manifest.json()
    descriptors = [doc["config"], *doc["layers"]]
    for desc in descriptors:
        data = await collect(client.fetch_blob(ref, desc["digest"],
                                               expected_size=desc["size"]))
        assert len(data) == desc["size"]
        assert sha256(data) == desc["digest"]
    fetched = _metric("shoal_puller_fetched_bytes_total", registry=registry.host)
    assert fetched - fetched_before == sum(d["size"] for d in descriptors)
    assert _metric("shoal_puller_registry_requests_total", registry=registry.host,
                   kind="manifest", code="200") >= 2


async def test_pull_oci_index_by_platform(registry: Registry, pushed: Pushed,
                                          make_client: MakeClient) -> None:
    client = make_client()
    ref = parse_reference(f"{registry.host}/puller/multi:oci")
    index = await client.get_manifest(ref, ref.object)
    assert index.media_type == OCI_INDEX and index.is_index
    assert index.digest == pushed.index.digest

    desc = select_manifest(index.json(), Platform.parse("linux/arm64"), source=str(ref))
    child = await client.get_manifest(ref, desc["digest"])
    assert child.media_type == OCI_MANIFEST
    assert child.digest == pushed.index.images[1].digest
    config_desc = child.json()["config"]
    config = json.loads(await collect(client.fetch_blob(ref, config_desc["digest"])))
    assert (config["architecture"], config["variant"]) == ("arm64", "v8")

    with pytest.raises(NotFound) as info:
        select_manifest(index.json(), Platform.parse("linux/s390x"), source=str(ref))
    assert info.value.message == (f"{ref}: no image for platform linux/s390x (available: "
                                  "linux/amd64, linux/arm64/v8, linux/arm/v7)")


async def test_pull_docker_schema2_and_manifest_list(registry: Registry, pushed: Pushed,
                                                     make_client: MakeClient) -> None:
    client = make_client()
    ref = parse_reference(f"{registry.host}/puller/busybox:docker")
    manifest = await client.get_manifest(ref, ref.object)
    assert manifest.media_type == DOCKER_MANIFEST
    assert manifest.digest == pushed.busybox_docker.digest
    layer = manifest.json()["layers"][0]
    data = await collect(client.fetch_blob(ref, layer["digest"], expected_size=layer["size"]))
    assert sha256(data) == layer["digest"]

    ref = parse_reference(f"{registry.host}/puller/multi:docker")
    listing = await client.get_manifest(ref, ref.object)
    assert listing.media_type == DOCKER_MANIFEST_LIST and listing.is_index
    desc = select_manifest(listing.json(), Platform.parse("linux/amd64"))
    child = await client.get_manifest(ref, desc["digest"])
    assert child.media_type == DOCKER_MANIFEST
    assert child.digest == pushed.manifest_list.images[0].digest


async def test_request_headers(front: FaultyRegistry, pushed: Pushed,
                               make_client: MakeClient) -> None:
    client = make_client(user_agent="shoal-test/9")
    ref = parse_reference(f"{front.host}/puller/small:v1")
    await client.get_manifest(ref, ref.object)
    headers = front.seen("/manifests/v1")[0].headers
    assert {t.strip() for t in headers["Accept"].split(",")} == {
        OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST}
    assert headers["User-Agent"] == "shoal-test/9"
    assert headers["Accept-Encoding"] == "identity"


async def test_manifest_not_found(registry: Registry, pushed: Pushed,
                                  make_client: MakeClient) -> None:
    client = make_client()
    ref = parse_reference(f"{registry.host}/puller/busybox:nope")
    with pytest.raises(NotFound) as info:
        await client.get_manifest(ref, ref.object)
    assert info.value.message == f"{registry.host}/puller/busybox:nope: not found"
    ref = parse_reference(f"{registry.host}/puller/no-such-repo:v1")
    with pytest.raises(NotFound):
        await client.get_manifest(ref, ref.object)
    missing = "sha256:" + "0" * 64
    with pytest.raises(NotFound, match="not found"):
        await collect(client.fetch_blob(ref, missing))


async def test_manifest_digest_mismatch(front: FaultyRegistry, pushed: Pushed,
                                        make_client: MakeClient) -> None:
    front.tamper(r"/manifests/", lambda body: body + b"\n")
    client = make_client()
    ref = parse_reference(f"{front.host}/puller/small@{pushed.small.digest}")
    with pytest.raises(Invalid, match="digest mismatch"):
        await client.get_manifest(ref, ref.object)
    # By tag there is nothing to check against: the digest is that of the bytes received
    # (the registry's Docker-Content-Digest header, now wrong, is not believed).
    tagged = await client.get_manifest(ref, "v1")
    assert tagged.digest == sha256(tagged.body) != pushed.small.digest


async def test_manifest_size_limit(registry: Registry, pushed: Pushed,
                                   make_client: MakeClient) -> None:
    client = make_client(max_manifest_size=100)
    ref = parse_reference(f"{registry.host}/puller/small:v1")
    with pytest.raises(Invalid, match="larger than 100 bytes"):
        await client.get_manifest(ref, ref.object)


async def test_bad_arguments(registry: Registry, make_client: MakeClient) -> None:
    client = make_client()
    ref = parse_reference(f"{registry.host}/puller/small:v1")
    with pytest.raises(Invalid, match="neither a tag nor a digest"):
        await client.get_manifest(ref, "bad tag")
    with pytest.raises(Invalid, match="not a digest"):
        await collect(client.fetch_blob(ref, "sha256:short"))
    digest = "sha256:" + "0" * 64
    with pytest.raises(Invalid, match="offset 11 outside"):
        await collect(client.fetch_blob(ref, digest, offset=11, expected_size=10))


# ------------------------------------------------------------------------------- blobs


async def fetch_through(front: FaultyRegistry, client: RegistryClient, layer: Layer) -> bytes:
    """`layer` of puller/busybox:oci fetched through `front`, with its size expected."""
    ref = parse_reference(f"{front.host}/puller/busybox:oci")
    return await collect(client.fetch_blob(ref, layer.digest, expected_size=layer.size))


async def test_blob_resumes_after_dropped_connections(front: FaultyRegistry, pushed: Pushed,
                                                      make_client: MakeClient) -> None:
    layer = pushed.busybox.layers[0]
    cut = 100_000
    assert layer.size > 3 * cut
    front.cut(r"/blobs/", cut, times=2)
    assert await fetch_through(front, make_client(), layer) == layer.blob
    ranges = [r.headers.get("Range") for r in front.seen(f"/blobs/{layer.digest}")]
    assert ranges == [None, f"bytes={cut}-", f"bytes={2 * cut}-"]


async def test_blob_resume_when_server_ignores_range(front: FaultyRegistry, pushed: Pushed,
                                                     make_client: MakeClient) -> None:
    layer = pushed.busybox.layers[0]
    front.cut(r"/blobs/", 70_000, times=1)
    front.ignore_range(r"/blobs/")  # answers the resume with 200 and the whole blob
    assert await fetch_through(front, make_client(), layer) == layer.blob
    assert [r.headers.get("Range") for r in front.seen("/blobs/")] == [None, "bytes=70000-"]


async def test_blob_resume_after_stall(front: FaultyRegistry, pushed: Pushed,
                                       make_client: MakeClient) -> None:
    layer = pushed.busybox.layers[0]
    front.stall(r"/blobs/", 50_000, 0.6)
    assert await fetch_through(front, make_client(read_timeout=0.2), layer) == layer.blob
    assert [r.headers.get("Range") for r in front.seen("/blobs/")] == [None, "bytes=50000-"]


async def test_blob_from_offset(registry: Registry, pushed: Pushed,
                                make_client: MakeClient) -> None:
    layer = pushed.busybox.layers[0]
    client = make_client()
    ref = parse_reference(f"{registry.host}/puller/busybox:oci")
    tail = await collect(client.fetch_blob(ref, layer.digest, offset=1000,
                                           expected_size=layer.size))
    assert tail == layer.blob[1000:]
    assert await collect(client.fetch_blob(ref, layer.digest, offset=layer.size,
                                           expected_size=layer.size)) == b""


async def test_blob_never_exceeds_expected_size(front: FaultyRegistry, pushed: Pushed,
                                                make_client: MakeClient) -> None:
    layer = pushed.busybox.layers[0]
    client = make_client()
    ref = parse_reference(f"{front.host}/puller/busybox:oci")
    expected = layer.size - 10
    # With a Content-Length the mismatch shows before any byte is passed on...
    with pytest.raises(Invalid, match=f"has {layer.size} bytes, expected {expected}"):
        await collect(client.fetch_blob(ref, layer.digest, expected_size=expected))

    # ...without one (chunked), the bytes stop at the expected size.
    async def chunked(request: web.Request, path: str) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(layer.blob)
        await resp.write_eof()
        return resp

    front.add(r"/blobs/", chunked)
    received = 0
    with pytest.raises(Invalid, match=f"more than the expected {expected} bytes"):
        async for chunk in client.fetch_blob(ref, layer.digest, expected_size=expected):
            received += len(chunk)
    assert 0 < received <= expected


async def test_blob_served_in_bounded_ranges(front: FaultyRegistry, pushed: Pushed,
                                             make_client: MakeClient) -> None:
    """A server may answer an open-ended Range with less; the rest is asked for, and
    that is not a failure (one attempt is enough)."""
    layer = pushed.busybox.layers[0]
    piece = 300_000

    async def partial(request: web.Request, path: str) -> web.StreamResponse:
        start = int(request.headers.get("Range", "bytes=0-")[6:].rstrip("-"))
        end = min(start + piece, layer.size)
        return web.Response(status=206, body=layer.blob[start:end], headers={
            "Content-Range": f"bytes {start}-{end - 1}/{layer.size}"})

    front.add(r"/blobs/", partial, times=None)
    client = make_client(max_attempts=1)
    ref = parse_reference(f"{front.host}/puller/busybox:oci")
    assert await collect(client.fetch_blob(ref, layer.digest)) == layer.blob
    assert len(front.seen("/blobs/")) == -(-layer.size // piece)


async def test_blob_gives_up_after_max_attempts(front: FaultyRegistry, pushed: Pushed,
                                                make_client: MakeClient) -> None:
    layer = pushed.busybox.layers[0]
    front.cut(r"/blobs/", 10_000, times=None)
    client = make_client(max_attempts=3)
    ref = parse_reference(f"{front.host}/puller/busybox:oci")
    received = 0
    with pytest.raises(Unavailable) as info:
        async for chunk in client.fetch_blob(ref, layer.digest, expected_size=layer.size):
            received += len(chunk)
    assert received == 30_000, "bytes before each drop are passed on, never twice"
    message = info.value.message
    assert front.url in message and layer.digest in message
    assert "giving up after 3 attempts" in message
    assert "connection lost at byte 30000" in message
    assert len(front.seen("/blobs/")) == 3


async def test_blob_abandoned_midway_releases_connection(registry: Registry, pushed: Pushed,
                                                         make_client: MakeClient) -> None:
    layer = pushed.busybox.layers[0]
    client = make_client()
    ref = parse_reference(f"{registry.host}/puller/busybox:oci")
    stream = client.fetch_blob(ref, layer.digest)
    first = await anext(stream)
    assert first
    await stream.aclose()
    # The client still works afterwards (the half-read connection was not reused).
    assert await collect(client.fetch_blob(ref, layer.digest)) == layer.blob


# ----------------------------------------------------------------------------- retries


async def test_429_retry_after_is_honoured(front: FaultyRegistry, pushed: Pushed,
                                           make_client: MakeClient) -> None:
    front.respond(r"/manifests/", 429, headers={"Retry-After": "1"},
                  body=b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}')
    client = make_client(retry_after_cap=5.0)
    ref = parse_reference(f"{front.host}/puller/small:v1")
    started = time.monotonic()
    manifest = await client.get_manifest(ref, ref.object)
    assert time.monotonic() - started >= 0.95
    assert manifest.digest == pushed.small.digest
    assert len(front.seen("/manifests/")) == 2


async def test_retry_after_is_capped(front: FaultyRegistry, pushed: Pushed,
                                     make_client: MakeClient) -> None:
    front.respond(r"/manifests/", 429, headers={"Retry-After": "3600"})
    client = make_client(retry_after_cap=0.1)
    ref = parse_reference(f"{front.host}/puller/small:v1")
    started = time.monotonic()
    await client.get_manifest(ref, ref.object)
    assert time.monotonic() - started < 2


async def test_503_then_success(front: FaultyRegistry, pushed: Pushed,
                                make_client: MakeClient) -> None:
    layer = pushed.busybox.layers[0]
    front.respond(r"/blobs/", 503, times=2)
    front.respond(r"/manifests/", 502, times=1)
    client = make_client()
    ref = parse_reference(f"{front.host}/puller/busybox:oci")
    await client.get_manifest(ref, ref.object)
    assert await collect(client.fetch_blob(ref, layer.digest)) == layer.blob
    assert len(front.seen("/blobs/")) == 3
    assert len(front.seen("/manifests/")) == 2


async def test_persistent_500_is_unavailable(front: FaultyRegistry, pushed: Pushed,
                                             make_client: MakeClient) -> None:
    front.respond(r"/manifests/", 500, times=None,
                  body=b'{"errors":[{"code":"UNKNOWN","message":"disk on fire"}]}')
    before = _metric("shoal_puller_registry_requests_total", registry=front.host,
                     kind="manifest", code="500")
    client = make_client(max_attempts=4)
    ref = parse_reference(f"{front.host}/puller/small:v1")
    with pytest.raises(Unavailable) as info:
        await client.get_manifest(ref, ref.object)
    assert info.value.message == (f"{front.url}: GET manifest {ref}: giving up after 4 "
                                  "attempts; last error: HTTP 500: disk on fire")
    assert len(front.seen("/manifests/")) == 4
    assert _metric("shoal_puller_registry_requests_total", registry=front.host,
                   kind="manifest", code="500") - before == 4


async def test_501_is_not_retried(front: FaultyRegistry, make_client: MakeClient) -> None:
    front.respond(r"/manifests/", 501, times=None)
    client = make_client()
    ref = parse_reference(f"{front.host}/puller/small:v1")
    with pytest.raises(FailedPrecondition, match="HTTP 501"):
        await client.get_manifest(ref, ref.object)
    assert len(front.seen("/manifests/")) == 1


async def test_refused_connection_is_unavailable(make_client: MakeClient) -> None:
    client = make_client(max_attempts=2)
    ref = parse_reference(f"127.0.0.1:{free_port()}/puller/small:v1")
    with pytest.raises(Unavailable, match="giving up after 2 attempts; last error: "
                                          "ClientConnectorError"):
        await client.get_manifest(ref, ref.object)


# ---------------------------------------------------------------------------- redirects


async def test_blob_redirect_to_storage_drops_authorization(
        front: FaultyRegistry, pushed: Pushed, make_client: MakeClient) -> None:
    layer = pushed.busybox.layers[0]
    async with TokenServer() as tokens, BlobStorage() as storage:
        front.gate = tokens.bearer_gate()
        path = f"/v2/puller/busybox/blobs/{layer.digest}"
        storage.blobs[path] = layer.blob
        front.redirect(r"/blobs/", storage.url)
        assert await fetch_through(front, make_client(), layer) == layer.blob
        authorized = [r for r in front.seen("/blobs/") if "Authorization" in r.headers]
        assert authorized and authorized[-1].headers["Authorization"].startswith("Bearer ")
        assert len(storage.requests) == 1
        assert "Authorization" not in storage.requests[0].headers
        assert storage.requests[0].query == "signature=abc%2Fdef"  # kept as sent


async def test_storage_refusal_after_redirect_is_retried(
        front: FaultyRegistry, pushed: Pushed, make_client: MakeClient) -> None:
    layer = pushed.small.layers[0]
    async with BlobStorage() as storage:
        storage.blobs[f"/v2/puller/small/blobs/{layer.digest}"] = layer.blob
        front.redirect(r"/blobs/", storage.url)
        storage.refuse(1, 403, "Request has expired")
        client = make_client()
        ref = parse_reference(f"{front.host}/puller/small:v1")
        assert await collect(client.fetch_blob(ref, layer.digest)) == layer.blob
        assert len(front.seen("/blobs/")) == 2 and len(storage.requests) == 2


# ------------------------------------------------------------------------------ mirrors


async def test_mirror_down_then_next_mirror(registry: Registry, pushed: Pushed,
                                            make_client: MakeClient) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    client = make_client({"upstream.invalid": RegistryHostConfig(mirrors=[down, registry.url])})
    assert client.endpoints("upstream.invalid") == [down, registry.url,
                                                    "https://upstream.invalid"]
    ref = parse_reference("upstream.invalid/puller/small:v1")
    manifest = await client.get_manifest(ref, ref.object)
    assert manifest.endpoint == registry.url
    assert manifest.digest == pushed.small.digest
    layer = pushed.small.layers[0]
    assert await collect(client.fetch_blob(ref, layer.digest)) == layer.blob


async def test_mirror_404_falls_back_to_upstream(registry: Registry, pushed: Pushed,
                                                 make_client: MakeClient) -> None:
    async with FaultyRegistry(None, prefix="/cache") as mirror:  # knows nothing: all 404
        client = make_client({registry.host: RegistryHostConfig(mirrors=[mirror.url])})
        ref = parse_reference(f"{registry.host}/puller/small:v1")
        manifest = await client.get_manifest(ref, ref.object)
        assert manifest.endpoint == registry.url
        layer = pushed.small.layers[0]
        assert await collect(client.fetch_blob(ref, layer.digest)) == layer.blob
        assert [r.path for r in mirror.requests] == [
            "/cache/v2/puller/small/manifests/v1", f"/cache/v2/puller/small/blobs/{layer.digest}"]


@pytest.mark.parametrize("suffix", ["", "/", "/v2", "/v2/"])
async def test_mirror_path_prefix(registry: Registry, pushed: Pushed, make_client: MakeClient,
                                  suffix: str) -> None:
    async with FaultyRegistry(registry.url, prefix="/cache") as mirror:
        client = make_client({"upstream.invalid": RegistryHostConfig(
            mirrors=[mirror.url + suffix])})
        ref = parse_reference("upstream.invalid/puller/small:v1")
        manifest = await client.get_manifest(ref, ref.object)
        assert manifest.endpoint == mirror.url + suffix.removesuffix("/")
        assert mirror.requests[0].path == "/cache/v2/puller/small/manifests/v1"


async def test_mirror_401_then_upstream_error_names_both(
        registry: Registry, pushed: Pushed, make_client: MakeClient) -> None:
    async with FaultyRegistry(registry.url) as mirror:
        mirror.gate = basic_gate("someone", "else")
        client = make_client({registry.host: RegistryHostConfig(mirrors=[mirror.url])})
        ref = parse_reference(f"{registry.host}/puller/small:v1")
        manifest = await client.get_manifest(ref, ref.object)
        assert manifest.endpoint == registry.url
        missing = parse_reference(f"{registry.host}/puller/small:missing")
        with pytest.raises(NotFound) as info:
            await client.get_manifest(missing, missing.object)
        assert info.value.message.startswith(f"{missing}: not found (mirrors tried first: "
                                              f"{mirror.url}: pull access denied")


async def test_static_credentials_not_sent_to_mirror(registry: Registry, pushed: Pushed,
                                                     make_client: MakeClient) -> None:
    async with FaultyRegistry(None) as mirror:
        client = make_client({registry.host: RegistryHostConfig(
            mirrors=[mirror.url], username="u", password="p")})
        mirror.gate = basic_gate("u", "p")
        ref = parse_reference(f"{registry.host}/puller/small:v1")
        await client.get_manifest(ref, ref.object)  # served by the upstream
        assert all("Authorization" not in r.headers for r in mirror.requests)


# ------------------------------------------------------------------ endpoints and plain_http


def test_endpoint_schemes() -> None:
    client = RegistryClient({
        "reg.example:5000": RegistryHostConfig(plain_http=True),
        "localhost:5001": RegistryHostConfig(skip_verify=True),
        "docker.io": RegistryHostConfig(mirrors=["https://mirror.example/dockerhub/"]),
    })
    assert client.endpoints("docker.io") == ["https://mirror.example/dockerhub",
                                             "https://registry-1.docker.io"]
    assert client.endpoints("reg.example:5000") == ["http://reg.example:5000"]
    assert client.endpoints("quay.io") == ["https://quay.io"]
    assert client.endpoints("localhost:5000") == ["http://localhost:5000"]
    assert client.endpoints("127.0.0.2:5000") == ["http://127.0.0.2:5000"]
    assert client.endpoints("[::1]:5000") == ["http://[::1]:5000"]
    # A loopback registry configured with TLS settings is spoken to over TLS.
    assert client.endpoints("localhost:5001") == ["https://localhost:5001"]


async def test_plain_http_is_respected(registry: Registry, pushed: Pushed,
                                       make_client: MakeClient) -> None:
    # TLS settings would make this loopback registry https; plain_http overrides them.
    client = make_client({registry.host: RegistryHostConfig(plain_http=True, skip_verify=True)})
    ref = parse_reference(f"{registry.host}/puller/small:v1")
    manifest = await client.get_manifest(ref, ref.object)
    assert manifest.endpoint == registry.url


# ----------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA with a server certificate for 127.0.0.1 and a client certificate."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server_context(pki: Pki, *, require_client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki.ca)
    return ctx


async def test_tls_with_extra_ca(registry: Registry, pushed: Pushed, pki: Pki,
                                 make_client: MakeClient) -> None:
    async with FaultyRegistry(registry.url, ssl_context=_server_context(pki)) as tls:
        client = make_client({tls.host: RegistryHostConfig(ca_file=str(pki.ca))})
        ref = parse_reference(f"{tls.host}/puller/small:v1")
        manifest = await client.get_manifest(ref, ref.object)
        assert manifest.endpoint == tls.url and tls.url.startswith("https://")
        layer = pushed.small.layers[0]
        assert await collect(client.fetch_blob(ref, layer.digest)) == layer.blob

        # skip_verify also gets through (and is what the name says).
        client = make_client({tls.host: RegistryHostConfig(skip_verify=True)})
        assert (await client.get_manifest(ref, ref.object)).digest == manifest.digest


async def test_tls_untrusted_certificate_fails(registry: Registry, pki: Pki,
                                               make_client: MakeClient) -> None:
    async with FaultyRegistry(registry.url, ssl_context=_server_context(pki)) as tls:
        upstream = f"127.0.0.1:{free_port()}"  # nothing listens: the mirror was the hope
        client = make_client({upstream: RegistryHostConfig(mirrors=[tls.url])},
                             max_attempts=2)
        ref = parse_reference(f"{upstream}/puller/small:v1")
        with pytest.raises(Unavailable) as info:
            await client.get_manifest(ref, ref.object)
        message = info.value.message
        assert f"mirrors tried first: {tls.url}: TLS failed" in message
        assert "certificate verify failed" in message.lower()
        assert tls.requests == []


async def test_tls_client_certificate(registry: Registry, pushed: Pushed, pki: Pki,
                                      make_client: MakeClient) -> None:
    ctx = _server_context(pki, require_client_cert=True)
    async with FaultyRegistry(registry.url, ssl_context=ctx) as tls:
        ref = parse_reference(f"{tls.host}/puller/small:v1")
        client = make_client({tls.host: RegistryHostConfig(
            ca_file=str(pki.ca), client_cert=str(pki.client_cert),
            client_key=str(pki.client_key))})
        assert (await client.get_manifest(ref, ref.object)).digest == pushed.small.digest

        client = make_client({tls.host: RegistryHostConfig(ca_file=str(pki.ca))},
                             max_attempts=2)
        with pytest.raises((Unavailable, FailedPrecondition)):
            await client.get_manifest(ref, ref.object)


async def test_credentials_are_per_pull(front: FaultyRegistry, pushed: Pushed,
                                        make_client: MakeClient) -> None:
    """A token fetched with one pull's credentials never serves another pull."""
    async with TokenServer(users={"alice": "pw"}, private={"puller/private"}) as tokens:
        front.gate = tokens.bearer_gate()
        client = make_client()
        ref = parse_reference(f"{front.host}/puller/private:v1")
        alice = Credentials(username="alice", password="pw")
        assert (await client.get_manifest(ref, ref.object, alice)).digest == pushed.small.digest
        with pytest.raises(FailedPrecondition, match="pull access denied"):
            await client.get_manifest(ref, ref.object)
        with pytest.raises(ShoalError):
            await client.get_manifest(ref, ref.object, Credentials(username="alice",
                                                                   password="wrong"))
