"""Registry authentication: credentials, WWW-Authenticate challenges, bearer tokens.

The flow is the distribution token protocol: a registry answers 401 with
`WWW-Authenticate: Bearer realm=...,service=...,scope=...`, the client asks the realm for a
token (anonymously, with basic credentials, or with an OAuth2 refresh token) and retries
with `Authorization: Bearer <token>`. A `Basic` challenge is answered with the credentials.
`Authorizer` runs that flow for the client: which credentials go to which endpoint, and the
headers won with them, cached per endpoint, scope and credentials.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import aiohttp
import yarl
from shoal_common.errors import FailedPrecondition, Invalid
from shoal_common.messages.images import RegistryAuth

from shoal_puller.registry._http import MAX_ERROR_BODY, error_text, parse_retry_after
from shoal_puller.registry.endpoints import Endpoint, Endpoints
from shoal_puller.registry.metrics import count_request
from shoal_puller.registry.reference import Reference
from shoal_puller.registry.transport import (
    TRANSIENT_ERRORS,
    Attempts,
    Transport,
    describe,
    transient_status,
)

CLIENT_ID = "shoal"
DEFAULT_TOKEN_TTL = 60.0
# Tokens are renewed a little before the server says they expire, so a request does not
# set out with a token that dies on the way.
_EXPIRY_MARGIN = 5.0
_PRUNE_AT = 1024  # cache entries; expired ones are dropped when it grows this big
_DOCKER_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


def registry_host_key(address: str) -> str:
    """`https://index.docker.io/v1/` -> `docker.io`; `Reg.example:5000/x` -> `reg.example:5000`.
    The form in which a CRI server_address is compared with a registry host."""
    host = address.strip()
    if "://" in host:
        host = host.split("://", 1)[1]
    host = host.split("/", 1)[0].lower()
    return "docker.io" if host in _DOCKER_HUB_NAMES else host


@dataclass
class Credentials:
    """Credentials for one pull. Secrets are kept out of repr so they never reach a log."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)
    # When set, the credentials are only for this registry (kubelet sets it from the key
    # of the matching docker config entry); they are not sent to other hosts or mirrors.
    server_address: str = ""

    @classmethod
    def from_cri(cls, username: str = "", password: str = "", auth: str = "",
                 server_address: str = "", identity_token: str = "",
                 registry_token: str = "") -> Credentials:
        """From CRI's AuthConfig; `auth` is base64("user:password") as in docker config."""
        if auth and not username:
            try:
                decoded = base64.b64decode(auth.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise Invalid("auth config: the auth field is not base64 of "
                              "user:password") from None
            username, sep, password = decoded.partition(":")
            if not sep:
                raise Invalid("auth config: the auth field decodes to no user:password pair")
        return cls(username=username, password=password, identity_token=identity_token,
                   registry_token=registry_token, server_address=server_address)

    @classmethod
    def from_message(cls, auth: RegistryAuth | None) -> Credentials | None:
        """What a pull or push request carries (None: it carries none)."""
        if auth is None:
            return None
        return cls.from_cri(username=auth.username, password=auth.password, auth=auth.auth,
                            server_address=auth.server_address,
                            identity_token=auth.identity_token,
                            registry_token=auth.registry_token)

    @property
    def anonymous(self) -> bool:
        return not (self.username or self.password or self.identity_token
                    or self.registry_token)

    def applies_to(self, host: str) -> bool:
        """Whether these credentials may be sent to registry `host` (host[:port])."""
        return not self.server_address or (
            registry_host_key(self.server_address) == registry_host_key(host))

    def fingerprint(self) -> str:
        """Identifies the credentials in cache keys without holding the secrets there: a
        token fetched with one pull's credentials must never serve another's."""
        raw = "\0".join((self.username, self.password, self.identity_token,
                         self.registry_token))
        return hashlib.sha256(raw.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercase: "bearer", "basic", ...
    params: dict[str, str]


_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _quoted(text: str, pos: int) -> tuple[str, int]:
    """Read a quoted-string starting at text[pos] == '"'; return (value, index after)."""
    out: list[str] = []
    pos += 1
    while pos < len(text):
        char = text[pos]
        if char == "\\" and pos + 1 < len(text):
            out.append(text[pos + 1])
            pos += 2
        elif char == '"':
            return "".join(out), pos + 1
        else:
            out.append(char)
            pos += 1
    return "".join(out), pos  # unterminated: take what there is


def parse_challenges(headers: Iterable[str]) -> list[Challenge]:
    """Parse WWW-Authenticate values; one value may hold several challenges, and quoted
    parameter values may contain commas (scope="repository:a:pull,push")."""
    challenges: list[Challenge] = []
    for text in headers:
        current: Challenge | None = None
        pos = 0
        while pos < len(text):
            if text[pos] in " \t,":
                pos += 1
                continue
            match = _TOKEN_RE.match(text, pos)
            if not match:
                pos += 1  # junk; skip it rather than fail the whole header
                continue
            name, pos = match.group(0), match.end()
            after = pos
            while after < len(text) and text[after] in " \t":
                after += 1
            if after < len(text) and text[after] == "=":
                pos = after + 1
                while pos < len(text) and text[pos] in " \t":
                    pos += 1
                if pos < len(text) and text[pos] == '"':
                    value, pos = _quoted(text, pos)
                else:
                    value_match = re.compile(r"[^,\s]*").match(text, pos)
                    assert value_match is not None  # `*` always matches
                    value, pos = value_match.group(0), value_match.end()
                if current is not None:
                    current.params[name.lower()] = value
            else:
                current = Challenge(name.lower(), {})
                challenges.append(current)
    return challenges


def access_word(scopes: Iterable[str]) -> str:
    """What a refusal is named after: "push" when any scope asks to push, else "pull"."""
    pushing = any("push" in scope.rpartition(":")[2].split(",") for scope in scopes)
    return "push" if pushing else "pull"


def basic_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


CacheKey = tuple[str, frozenset[str], str]


class TokenCache:
    """Authorization header values per (endpoint, scope set, credentials fingerprint),
    each kept until its expiry (never, for basic auth)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[CacheKey, tuple[str, float]] = {}

    def get(self, key: CacheKey) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        header, expires = entry
        if self._clock() >= expires:
            del self._entries[key]
            return None
        return header

    def put(self, key: CacheKey, header: str, ttl: float | None) -> None:
        expires = float("inf") if ttl is None else self._clock() + max(
            1.0, ttl - min(_EXPIRY_MARGIN, ttl / 10))
        if len(self._entries) >= _PRUNE_AT:
            now = self._clock()
            self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
        self._entries[key] = (header, expires)

    def drop(self, key: CacheKey) -> None:
        self._entries.pop(key, None)


class TokenRequestError(Exception):
    """The token server answered with an error status (or not with a token)."""

    def __init__(self, realm: str, status: int, message: str,
                 retry_after: float | None = None) -> None:
        super().__init__(f"token server {realm} answered HTTP {status}: {message}")
        self.realm = realm
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class Token:
    value: str
    expires_in: float


async def fetch_token(session: aiohttp.ClientSession, challenge: Challenge,
                      scopes: Sequence[str], creds: Credentials | None, *,
                      ssl_context: ssl.SSLContext | bool, timeout: aiohttp.ClientTimeout,
                      headers: dict[str, str]) -> Token:
    """One token request to the challenge's realm (retries are the caller's). Connection
    errors propagate as aiohttp exceptions; HTTP errors raise TokenRequestError."""
    realm = challenge.params.get("realm", "")
    url = yarl.URL(realm)
    if url.scheme not in ("http", "https") or not url.host:
        raise TokenRequestError(realm or "(none)", 0, "bearer challenge has no usable realm")
    service = challenge.params.get("service", "")
    creds = creds or Credentials()
    basic = ({"Authorization": basic_header(creds.username, creds.password)}
             if creds.username or creds.password else {})
    request_headers = {**headers, "Accept": "application/json"}

    if creds.identity_token:
        # docker's OAuth2 refresh-token grant, for identity tokens from `docker login`.
        form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                "service": service, "scope": " ".join(scopes), "client_id": CLIENT_ID}
        async with session.post(url, data=form, headers=request_headers, ssl=ssl_context,
                                timeout=timeout) as resp:
            body = await resp.content.read(MAX_ERROR_BODY)
            # Registries without the OAuth endpoint answer 404/405: use the GET flow below.
            if resp.status not in (404, 405):
                return _token_from(realm, resp, body)

    query = [("service", service)] if service else []
    query += [("scope", s) for s in scopes]
    async with session.get(url.extend_query(query), headers={**request_headers, **basic},
                           ssl=ssl_context, timeout=timeout) as resp:
        body = await resp.content.read(MAX_ERROR_BODY)
        return _token_from(realm, resp, body)


def _token_from(realm: str, resp: aiohttp.ClientResponse, body: bytes) -> Token:
    if resp.status != 200:
        raise TokenRequestError(realm, resp.status, error_text(body) or resp.reason or "",
                                parse_retry_after(resp.headers.get("Retry-After")))
    try:
        doc = json.loads(body)
    except ValueError:
        raise TokenRequestError(realm, resp.status, "response is not JSON") from None
    if not isinstance(doc, dict):
        raise TokenRequestError(realm, resp.status, "response is not a JSON object")
    value = doc.get("token") or doc.get("access_token")
    if not isinstance(value, str) or not value:
        raise TokenRequestError(realm, resp.status, "response has no token")
    expires_in = doc.get("expires_in")
    ttl = float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else (
        DEFAULT_TOKEN_TTL)
    return Token(value, ttl)


class Authorizer:
    """Which credentials go to which endpoint, and the Authorization headers won with them
    (one token fetch at a time per cache key)."""

    def __init__(self, endpoints: Endpoints, transport: Transport) -> None:
        self._endpoints = endpoints
        self._transport = transport
        self._tokens = TokenCache()
        self._locks: dict[CacheKey, asyncio.Lock] = {}

    def request(self, ep: Endpoint, ref: Reference, creds: Credentials | None,
                scopes: Sequence[str] = ()) -> RequestAuth:
        """The Authorization of one request to `ep` for `ref`'s repository; `scopes` (token
        scopes, e.g. `repository:<path>:pull,push` for a push) default to pulling it."""
        return RequestAuth(self, ep, ref, self._credentials(ep, ref, creds), scopes)

    def cached(self, key: CacheKey) -> str | None:
        return self._tokens.get(key)

    def _credentials(self, ep: Endpoint, ref: Reference,
                     creds: Credentials | None) -> Credentials | None:
        """Which credentials go to `ep`: the pull's own if they are for this host (a mirror
        gets them only when they name no server or name the mirror), else configured ones:
        the registry's for the upstream, the mirror host's own entry for a mirror."""
        if creds is not None and not creds.anonymous:
            names = (ep.host,) if ep.mirror else (ref.domain, ep.host)
            if any(creds.applies_to(name) for name in names):
                return creds
        cfg = (self._endpoints.host_config(ep.host) if ep.mirror
               else self._endpoints.config(ref.domain))
        if cfg is not None and (cfg.username or cfg.password):
            return Credentials(username=cfg.username, password=cfg.password)
        return None

    async def authenticate(self, ep: Endpoint, ref: Reference, key: CacheKey,
                           scopes: Sequence[str], challenges: list[Challenge],
                           creds: Credentials | None, stale: str | None, body: bytes,
                           attempts: Attempts) -> None:
        """Answer a 401: get a header for `key` into the token cache, or raise."""
        denied = f"{access_word(scopes)} access denied for {ref.repository}"
        if stale is not None:
            self._tokens.drop(key)
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None:
            lock = self._locks.setdefault(key, asyncio.Lock())
            async with lock:
                # Concurrent requests for the same repository share one token fetch.
                current = self._tokens.get(key)
                if current is None or current == stale:
                    wanted = sorted({*scopes, *bearer.params.get("scope", "").split()})
                    token = await self._fetch_token(ep, ref, bearer, wanted, creds, attempts)
                    self._tokens.put(key, f"Bearer {token.value}", token.expires_in)
            if not lock.locked():
                # Idle locks go, so the dict does not grow with every repository pulled; a
                # waiter racing this at worst fetches one token twice.
                self._locks.pop(key, None)
        elif basic is not None:
            if creds is None or not (creds.username or creds.password):
                raise FailedPrecondition(f"{denied}: {ep} requires a username and password "
                                         "(basic auth)")
            self._tokens.put(key, basic_header(creds.username, creds.password), None)
        else:
            raise FailedPrecondition(
                f"{denied}: {ep} answered 401 without a bearer or basic challenge: "
                f"{error_text(body) or 'no details'}")

    async def _fetch_token(self, ep: Endpoint, ref: Reference, challenge: Challenge,
                           scopes: list[str], creds: Credentials | None,
                           attempts: Attempts) -> Token:
        session = await self._transport.session()
        while True:
            try:
                token = await fetch_token(session, challenge, scopes, creds, ssl_context=ep.tls,
                                          timeout=self._transport.timeout,
                                          headers=self._transport.headers)
            except TokenRequestError as exc:
                count_request(ep.host, "token", exc.status or "error")
                if transient_status(exc.status):
                    await attempts.failed(str(exc), exc.retry_after)
                    continue
                source = (f"token server {exc.realm} answered HTTP {exc.status}" if exc.status
                          else f"challenge from {ep}")
                raise FailedPrecondition(
                    f"{access_word(scopes)} access denied for {ref.repository}: "
                    f"{exc.message} ({source})") from None
            except aiohttp.ClientSSLError as exc:
                count_request(ep.host, "token", "error")
                raise FailedPrecondition(f"token server for {ep}: TLS failed: {exc}") from None
            except TRANSIENT_ERRORS as exc:
                count_request(ep.host, "token", "error")
                await attempts.failed(f"token server {challenge.params.get('realm')}: "
                                      f"{describe(exc)}")
                continue
            count_request(ep.host, "token", 200)
            return token


class RequestAuth:
    """The Authorization of one request to one endpoint (transport.Authorization): a
    registry token from the kubelet as is, else the header cached for (endpoint, scope,
    credentials), renewed at most once, on the first 401."""

    def __init__(self, authorizer: Authorizer, ep: Endpoint, ref: Reference,
                 creds: Credentials | None, scopes: Sequence[str] = ()) -> None:
        self._authorizer = authorizer
        self._ep = ep
        self._ref = ref
        self._creds = creds
        self._scopes = tuple(scopes) or (f"repository:{ref.path}:pull",)
        self._key: CacheKey = (ep.name, frozenset(self._scopes),
                               creds.fingerprint() if creds else "")
        # A registry token is used as is: there is no token server round to repeat.
        self._challenged = bool(creds and creds.registry_token)

    def header(self) -> str | None:
        if self._creds is not None and self._creds.registry_token:
            return f"Bearer {self._creds.registry_token}"
        return self._authorizer.cached(self._key)

    async def renew(self, challenges: list[str], sent: str | None, body: bytes,
                    attempts: Attempts) -> bool:
        if self._challenged:
            return False
        self._challenged = True
        await self._authorizer.authenticate(self._ep, self._ref, self._key, self._scopes,
                                            parse_challenges(challenges), self._creds, sent,
                                            body, attempts)
        return True
