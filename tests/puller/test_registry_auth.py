"""Registry auth: challenge parsing, credentials, token cache, and the bearer/basic flows
against a test token server in front of the real registry."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from urllib.parse import parse_qs

import pytest
from shoal_common.errors import FailedPrecondition, Invalid
from shoal_puller.config import RegistryHostConfig
from shoal_puller.registry import Credentials, parse_reference
from shoal_puller.registry._http import Backoff, error_text, parse_retry_after
from shoal_puller.registry.auth import (
    Challenge,
    TokenCache,
    parse_challenges,
    registry_host_key,
)
from support.faulty_registry import FaultyRegistry, MakeClient, Pushed, TokenServer, basic_gate

# ------------------------------------------------------------------------------- units


@pytest.mark.parametrize(("headers", "expected"), [
    (['Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
      'scope="repository:library/busybox:pull"'],
     [Challenge("bearer", {"realm": "https://auth.docker.io/token",
                           "service": "registry.docker.io",
                           "scope": "repository:library/busybox:pull"})]),
    # Commas inside quoted values; spaces around '='; unquoted values.
    (['Bearer realm = "https://a/token", scope="repository:x:pull,push", service=reg'],
     [Challenge("bearer", {"realm": "https://a/token", "scope": "repository:x:pull,push",
                           "service": "reg"})]),
    (['Basic realm="Registry Realm"'], [Challenge("basic", {"realm": "Registry Realm"})]),
    # Two challenges in one header, and one in a second header.
    (['Basic realm="x", Bearer realm="https://t/", error="insufficient_scope"',
      'Negotiate'],
     [Challenge("basic", {"realm": "x"}),
      Challenge("bearer", {"realm": "https://t/", "error": "insufficient_scope"}),
      Challenge("negotiate", {})]),
    (['BEARER REALM="https://t/\\"q\\""'], [Challenge("bearer", {"realm": 'https://t/"q"'})]),
    ([""], []),
])
def test_parse_challenges(headers: list[str], expected: list[Challenge]) -> None:
    assert parse_challenges(headers) == expected


def test_credentials_from_cri() -> None:
    auth = base64.b64encode(b"alice:pa:ss").decode()
    creds = Credentials.from_cri(auth=auth, server_address="https://index.docker.io/v1/")
    assert (creds.username, creds.password) == ("alice", "pa:ss")
    assert creds.applies_to("docker.io") and creds.applies_to("registry-1.docker.io")
    assert not creds.applies_to("quay.io")
    # Explicit username/password win over `auth`.
    creds = Credentials.from_cri(username="bob", password="pw", auth=auth)
    assert (creds.username, creds.password) == ("bob", "pw")
    assert creds.applies_to("anything.example")  # no server_address: any host
    creds = Credentials.from_cri(identity_token="id", registry_token="reg")
    assert (creds.identity_token, creds.registry_token) == ("id", "reg")
    assert Credentials.from_cri().anonymous
    with pytest.raises(Invalid, match="not base64"):
        Credentials.from_cri(auth="%%%")
    with pytest.raises(Invalid, match="no user:password"):
        Credentials.from_cri(auth=base64.b64encode(b"nocolon").decode())


def test_credentials_repr_hides_secrets() -> None:
    text = repr(Credentials("alice", "hunter2", "idtok", "regtok"))
    assert "alice" in text
    assert not any(secret in text for secret in ("hunter2", "idtok", "regtok"))


def test_registry_host_key() -> None:
    assert registry_host_key("https://index.docker.io/v1/") == "docker.io"
    assert registry_host_key("Reg.Example:5000/path") == "reg.example:5000"
    assert registry_host_key("localhost:5000") == "localhost:5000"


def test_token_cache_expiry() -> None:
    now = [100.0]
    cache = TokenCache(clock=lambda: now[0])
    key = ("http://r", frozenset({"repository:a:pull"}), "")
    cache.put(key, "Bearer t", 60)
    assert cache.get(key) == "Bearer t"
    now[0] += 50
    assert cache.get(key) == "Bearer t"
    now[0] += 6  # within the renewal margin before expiry
    assert cache.get(key) is None
    cache.put(key, "Basic x", None)
    now[0] += 1e9
    assert cache.get(key) == "Basic x"
    cache.drop(key)
    assert cache.get(key) is None


def test_error_text_and_retry_after() -> None:
    assert error_text(b'{"errors":[{"code":"DENIED","message":"requested access to the '
                      b'resource is denied"}]}') == "requested access to the resource is denied"
    assert error_text(b'{"details":"incorrect username or password"}') == (
        "incorrect username or password")
    assert error_text(b"<html>\n Bad   gateway</html>") == "<html> Bad gateway</html>"
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_backoff_delays() -> None:
    backoff = Backoff(base=0.2, cap=5.0, retry_after_cap=30.0)
    for failures, nominal in ((1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6)):
        assert 0.5 * nominal <= backoff.delay(failures) <= 1.5 * nominal
    assert backoff.delay(20) <= 5.0
    assert backoff.delay(1, retry_after=12) == 12
    assert backoff.delay(1, retry_after=3600) == 30.0


# ------------------------------------------------------------------------------- flows


@pytest.fixture
async def tokens(front: FaultyRegistry) -> AsyncIterator[TokenServer]:
    """A token server guarding `front`; puller/private needs a known user."""
    async with TokenServer(users={"alice": "s3cret"}, refresh_tokens={"idtok": "alice"},
                           private={"puller/private"}) as server:
        front.gate = server.bearer_gate()
        yield server


def _token_gets(tokens: TokenServer) -> list[dict[str, list[str]]]:
    return [parse_qs(r.query) for r in tokens.requests if r.method == "GET"]


async def test_anonymous_token(front: FaultyRegistry, tokens: TokenServer, pushed: Pushed,
                               make_client: MakeClient) -> None:
    client = make_client()
    ref = parse_reference(f"{front.host}/puller/small:v1")
    assert (await client.get_manifest(ref, ref.object)).digest == pushed.small.digest
    assert _token_gets(tokens) == [{"service": ["test-registry"],
                                    "scope": ["repository:puller/small:pull"]}]
    assert "Authorization" not in tokens.requests[0].headers
    # The token is cached: more requests to the repository fetch no new one.
    layer = pushed.small.layers[0]
    async for _ in client.fetch_blob(ref, layer.digest):
        pass
    await client.get_manifest(ref, ref.object)
    assert len(tokens.requests) == 1
    assert front.seen("/blobs/")[0].headers["Authorization"].startswith("Bearer ")


async def test_anonymous_denied_for_private(front: FaultyRegistry, tokens: TokenServer,
                                            make_client: MakeClient) -> None:
    client = make_client()
    ref = parse_reference(f"{front.host}/puller/private:v1")
    with pytest.raises(FailedPrecondition) as info:
        await client.get_manifest(ref, ref.object)
    assert info.value.message.startswith(
        f"pull access denied for {front.host}/puller/private: authentication required")


async def test_username_password(front: FaultyRegistry, tokens: TokenServer, pushed: Pushed,
                                 make_client: MakeClient) -> None:
    client = make_client()
    ref = parse_reference(f"{front.host}/puller/private:v1")
    creds = Credentials(username="alice", password="s3cret")
    assert (await client.get_manifest(ref, ref.object, creds)).digest == pushed.small.digest
    expected = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert tokens.requests[0].headers["Authorization"] == expected


async def test_cri_auth_field(front: FaultyRegistry, tokens: TokenServer, pushed: Pushed,
                              make_client: MakeClient) -> None:
    client = make_client()
    ref = parse_reference(f"{front.host}/puller/private:v1")
    creds = Credentials.from_cri(auth=base64.b64encode(b"alice:s3cret").decode(),
                                 server_address=front.host)
    assert (await client.get_manifest(ref, ref.object, creds)).digest == pushed.small.digest


async def test_credentials_for_another_server_are_not_sent(
        front: FaultyRegistry, tokens: TokenServer, make_client: MakeClient) -> None:
    client = make_client()
    ref = parse_reference(f"{front.host}/puller/private:v1")
    creds = Credentials(username="alice", password="s3cret", server_address="quay.io")
    with pytest.raises(FailedPrecondition, match="pull access denied"):
        await client.get_manifest(ref, ref.object, creds)
    assert all("Authorization" not in r.headers for r in tokens.requests)


async def test_identity_token(front: FaultyRegistry, tokens: TokenServer, pushed: Pushed,
                              make_client: MakeClient) -> None:
    client = make_client()
    ref = parse_reference(f"{front.host}/puller/private:v1")
    creds = Credentials.from_cri(identity_token="idtok")
    assert (await client.get_manifest(ref, ref.object, creds)).digest == pushed.small.digest
    assert [r.method for r in tokens.requests] == ["POST"]
    assert tokens.forms == [{"grant_type": "refresh_token", "refresh_token": "idtok",
                             "service": "test-registry",
                             "scope": "repository:puller/private:pull", "client_id": "shoal"}]


async def test_registry_token_sent_directly(front: FaultyRegistry, tokens: TokenServer,
                                            pushed: Pushed, make_client: MakeClient) -> None:
    token = tokens.issue("alice", {"repository:puller/private:pull"})
    client = make_client()
    ref = parse_reference(f"{front.host}/puller/private:v1")
    creds = Credentials.from_cri(registry_token=token)
    assert (await client.get_manifest(ref, ref.object, creds)).digest == pushed.small.digest
    assert tokens.requests == []
    assert [r.headers.get("Authorization") for r in front.requests] == [f"Bearer {token}"]
    with pytest.raises(FailedPrecondition, match="pull access denied"):
        await client.get_manifest(ref, ref.object, Credentials(registry_token="forged"))


async def test_wrong_password(front: FaultyRegistry, tokens: TokenServer,
                              make_client: MakeClient) -> None:
    client = make_client()
    ref = parse_reference(f"{front.host}/puller/private:v1")
    with pytest.raises(FailedPrecondition) as info:
        await client.get_manifest(ref, ref.object,
                                  Credentials(username="alice", password="wrong"))
    assert info.value.message == (
        f"pull access denied for {front.host}/puller/private: incorrect username or password "
        f"(token server {tokens.url}/token answered HTTP 401)")
    assert len(tokens.requests) == 1, "a refused token is not retried"


async def test_rejected_cached_token_is_renewed(front: FaultyRegistry, tokens: TokenServer,
                                                pushed: Pushed,
                                                make_client: MakeClient) -> None:
    client = make_client()
    ref = parse_reference(f"{front.host}/puller/small:v1")
    await client.get_manifest(ref, ref.object)
    tokens.grants.clear()  # the server forgets its tokens (e.g. a restart)
    assert (await client.get_manifest(ref, ref.object)).digest == pushed.small.digest
    assert len(_token_gets(tokens)) == 2


async def test_token_server_503_is_retried(front: FaultyRegistry, tokens: TokenServer,
                                           pushed: Pushed, make_client: MakeClient) -> None:
    tokens.refuse(2, 503, "busy")
    client = make_client()
    ref = parse_reference(f"{front.host}/puller/small:v1")
    assert (await client.get_manifest(ref, ref.object)).digest == pushed.small.digest
    assert len(tokens.requests) == 3


async def test_basic_challenge(front: FaultyRegistry, pushed: Pushed,
                               make_client: MakeClient) -> None:
    front.gate = basic_gate("bob", "pw")
    ref = parse_reference(f"{front.host}/puller/small:v1")
    client = make_client()
    creds = Credentials(username="bob", password="pw")
    assert (await client.get_manifest(ref, ref.object, creds)).digest == pushed.small.digest
    with pytest.raises(FailedPrecondition, match="requires a username and password"):
        await client.get_manifest(ref, ref.object)
    with pytest.raises(FailedPrecondition, match="basic auth required"):
        await client.get_manifest(ref, ref.object, Credentials(username="bob", password="no"))
    # Configured credentials serve pulls that bring none.
    client = make_client({front.host: RegistryHostConfig(username="bob", password="pw")})
    assert (await client.get_manifest(ref, ref.object)).digest == pushed.small.digest
