"""Async client of the OCI distribution API: manifests and blobs, over mirrors and upstream.

Per request: bearer/basic auth on a 401 challenge, retries with backoff on 429, 5xx and
broken connections, manual redirects (the registry's Authorization never leaves its
origin). Per registry: its mirrors in order, then the registry itself. Blob downloads
resume with a Range request where a connection dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import re
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp
import structlog
import yarl
from shoal_common.config import RegistryHostConfig
from shoal_common.errors import FailedPrecondition, Invalid, NotFound, ShoalError, Unavailable

from shoal_puller.registry._http import MAX_ERROR_BODY, Backoff, error_text, parse_retry_after
from shoal_puller.registry.auth import (
    CacheKey,
    Challenge,
    Credentials,
    Token,
    TokenCache,
    TokenRequestError,
    basic_header,
    fetch_token,
    parse_challenges,
)
from shoal_puller.registry.metrics import Kind, count_bytes, count_request
from shoal_puller.registry.reference import DOCKER_HUB, Reference, is_digest, is_tag
from shoal_puller.registry.tls import has_tls_settings, ssl_context

log = structlog.get_logger("shoal.puller.registry")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ALL_MANIFEST_TYPES: tuple[str, ...] = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST,
                                       DOCKER_MANIFEST)
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})

DOCKER_HUB_ENDPOINT = "https://registry-1.docker.io"
# Manifests are small JSON; anything bigger is a broken or hostile registry.
MAX_MANIFEST_SIZE = 4 << 20
# Reads of up to this much: fewer loop iterations per blob (each costs Python overhead).
READ_BUFFER = 1 << 20
MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Errors after which the same request may succeed: the network, not the request, failed.
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError,
    TimeoutError)

T = TypeVar("T")


def _transient_status(status: int) -> bool:
    # 501/505 say the server will never do it; every other 5xx may pass.
    return status == 429 or (500 <= status <= 599 and status not in (501, 505))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_loopback(domain: str) -> bool:
    host = domain[1:].split("]", 1)[0] if domain.startswith("[") else domain.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(url: yarl.URL) -> str:
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{url.explicit_port}" if url.explicit_port else host


@dataclass(frozen=True)
class Manifest:
    media_type: str
    digest: str
    body: bytes
    endpoint: str  # the mirror or registry URL that served it

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def json(self) -> dict[str, Any]:
        doc = json.loads(self.body)
        if not isinstance(doc, dict):
            raise Invalid(f"manifest {self.digest} is not a JSON object")
        return doc


@dataclass(frozen=True)
class _Endpoint:
    name: str  # as configured / derived, e.g. "https://mirror:5000/prefix"
    base: yarl.URL  # the API root: name + "/v2"
    host: str  # host[:port], for credentials, logs and metrics
    mirror: bool
    tls: ssl.SSLContext | bool  # for aiohttp's ssl=: a context, or True (system trust)

    def url(self, ref: Reference, kind: str, obj: str) -> yarl.URL:
        # Repository paths, tags and digests are validated, so nothing needs escaping.
        return yarl.URL(f"{self.base}/{ref.path}/{kind}/{obj}", encoded=True)

    def __str__(self) -> str:
        return self.name


class _Unreachable(Unavailable):
    """A mirror refused the connection: skip it for a while instead of retrying it."""


class _Attempts:
    """The retry budget of one request (or one blob download on one endpoint)."""

    def __init__(self, limit: int, backoff: Backoff, what: str) -> None:
        self.limit = limit
        self.backoff = backoff
        self.what = what
        self.used = 0

    async def failed(self, error: str, retry_after: float | None = None) -> None:
        """Count a failure; sleep before the next try, or raise Unavailable if none is left."""
        self.used += 1
        if self.used >= self.limit:
            raise Unavailable(f"{self.what}: giving up after {self.used} attempt"
                              f"{'s' if self.used > 1 else ''}; last error: {error}")
        delay = self.backoff.delay(self.used, retry_after)
        log.info("registry request failed; retrying", what=self.what, attempt=self.used,
                 error=error, retry_in=round(delay, 3))
        await asyncio.sleep(delay)


class RegistryClient:
    """One per puller process: holds the HTTP session, TLS contexts and the token cache."""

    def __init__(
        self,
        registries: Mapping[str, RegistryHostConfig] | None = None,
        *,
        max_attempts: int = 5,
        user_agent: str = "shoal/0.1",
        session: aiohttp.ClientSession | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        backoff_base: float = 0.2,
        backoff_cap: float = 5.0,
        retry_after_cap: float = 30.0,
        max_manifest_size: int = MAX_MANIFEST_SIZE,
        mirror_down_for: float = 30.0,
    ) -> None:
        """`read_timeout` bounds the wait for each chunk, not a whole download, so large
        blobs are fine and a stalled connection is noticed. `mirror_down_for`: a mirror
        that refused a connection is skipped this many seconds."""
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self._registries = dict(registries or {})
        self._max_attempts = max_attempts
        self._session = session
        self._own_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=None, connect=None,
                                              sock_connect=connect_timeout,
                                              sock_read=read_timeout)
        self._backoff = Backoff(backoff_base, backoff_cap, retry_after_cap)
        self._max_manifest_size = max_manifest_size
        self._mirror_down_for = mirror_down_for
        # Identity encoding: blobs are verified by digest byte for byte, so no transparent
        # decompression may touch them.
        self._headers = {"User-Agent": user_agent, "Accept-Encoding": "identity"}
        self._tokens = TokenCache()
        self._token_locks: dict[CacheKey, asyncio.Lock] = {}
        self._ssl: dict[str, ssl.SSLContext | None] = {}
        self._down_until: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Created lazily: aiohttp wants a running loop. No env proxies (trust_env off).
            # A 1 MiB read buffer: with aiohttp's 64 KiB default, a fast registry fills it
            # several times per MiB and the socket's reading is paused and resumed each time
            # (measured: ~0.38 s against 0.40-0.54 s for 200 MB over loopback).
            self._session = aiohttp.ClientSession(auto_decompress=False, trust_env=False,
                                                  read_bufsize=READ_BUFFER)
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # ------------------------------------------------------------------ endpoints

    def _config(self, domain: str) -> RegistryHostConfig:
        cfg = self._registries.get(domain)
        if cfg is None and domain == DOCKER_HUB:
            cfg = (self._registries.get("registry-1.docker.io")
                   or self._registries.get("index.docker.io"))
        return cfg or RegistryHostConfig()

    def _ssl_for(self, domain: str, cfg: RegistryHostConfig) -> ssl.SSLContext | bool:
        if domain not in self._ssl:
            self._ssl[domain] = ssl_context(domain, cfg)
        return self._ssl[domain] or True

    def endpoints(self, domain: str) -> list[str]:
        """The endpoints tried for a registry host, in order (for logs and tests)."""
        return [ep.name for ep in self._endpoints(domain)]

    def _endpoints(self, domain: str) -> list[_Endpoint]:
        cfg = self._config(domain)
        tls = self._ssl_for(domain, cfg)
        out: list[_Endpoint] = []
        for mirror in cfg.mirrors:
            url = yarl.URL(mirror.rstrip("/"))
            path = url.path.rstrip("/")
            base = url.with_path(path if path.endswith("/v2") else f"{path}/v2")
            out.append(_Endpoint(str(url), base, _url_host(url), True, tls))
        if domain == DOCKER_HUB:
            upstream = yarl.URL(DOCKER_HUB_ENDPOINT)
        else:
            # Loopback registries are plain HTTP unless configured with TLS (as docker
            # treats localhost as insecure); anything else is HTTPS unless plain_http.
            plain = cfg.plain_http or (_is_loopback(domain) and not has_tls_settings(cfg))
            upstream = yarl.URL(f"{'http' if plain else 'https'}://{domain}")
        out.append(_Endpoint(str(upstream), upstream.with_path("/v2"), domain, False, tls))
        return out

    def _live_endpoints(self, domain: str) -> list[_Endpoint]:
        now = time.monotonic()
        return [ep for ep in self._endpoints(domain)
                if not ep.mirror or self._down_until.get(ep.name, 0.0) <= now]

    async def _over_endpoints(self, domain: str,
                              attempt: Callable[[_Endpoint], Awaitable[T]]) -> T:
        """Run `attempt` on each endpoint in turn until one succeeds; the upstream's error
        is raised (naming what the mirrors said) when all fail."""
        failures: list[str] = []
        endpoints = self._live_endpoints(domain)
        for i, ep in enumerate(endpoints):
            try:
                return await attempt(ep)
            except ShoalError as exc:
                if i == len(endpoints) - 1:
                    raise _with_failures(exc, failures) from None
                self._mirror_failed(ep, exc)
                failures.append(_naming(ep, exc))
        raise AssertionError("the upstream endpoint is always last")

    def _mirror_failed(self, ep: _Endpoint, exc: ShoalError) -> None:
        if isinstance(exc, _Unreachable):
            self._down_until[ep.name] = time.monotonic() + self._mirror_down_for
        log.warning("registry mirror failed; trying the next endpoint", endpoint=ep.name,
                    error=exc.message)

    # ------------------------------------------------------------------ auth

    def _credentials(self, ep: _Endpoint, ref: Reference,
                     creds: Credentials | None) -> Credentials | None:
        """Which credentials go to `ep`: the pull's own if they are for this host (a mirror
        gets them only when they name no server or name the mirror), else configured ones:
        the registry's for the upstream, the mirror host's own entry for a mirror."""
        if creds is not None and not creds.anonymous:
            names = (ep.host,) if ep.mirror else (ref.domain, ep.host)
            if any(creds.applies_to(name) for name in names):
                return creds
        cfg = self._registries.get(ep.host) if ep.mirror else self._config(ref.domain)
        if cfg is not None and (cfg.username or cfg.password):
            return Credentials(username=cfg.username, password=cfg.password)
        return None

    async def _authenticate(self, ep: _Endpoint, ref: Reference, key: CacheKey, scope: str,
                            challenges: list[Challenge], creds: Credentials | None,
                            stale: str | None, body: bytes, attempts: _Attempts) -> None:
        """Answer a 401: get a header for `key` into the token cache, or raise."""
        if stale is not None:
            self._tokens.drop(key)
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None:
            lock = self._token_locks.setdefault(key, asyncio.Lock())
            async with lock:
                # Concurrent requests for the same repository share one token fetch.
                current = self._tokens.get(key)
                if current is None or current == stale:
                    scopes = sorted({scope, *bearer.params.get("scope", "").split()})
                    token = await self._fetch_token(ep, ref, bearer, scopes, creds, attempts)
                    self._tokens.put(key, f"Bearer {token.value}", token.expires_in)
            if not lock.locked():
                # Idle locks go, so the dict does not grow with every repository pulled; a
                # waiter racing this at worst fetches one token twice.
                self._token_locks.pop(key, None)
        elif basic is not None:
            if creds is None or not (creds.username or creds.password):
                raise FailedPrecondition(f"pull access denied for {ref.repository}: {ep} "
                                         "requires a username and password (basic auth)")
            self._tokens.put(key, basic_header(creds.username, creds.password), None)
        else:
            raise FailedPrecondition(
                f"pull access denied for {ref.repository}: {ep} answered 401 without a "
                f"bearer or basic challenge: {error_text(body) or 'no details'}")

    async def _fetch_token(self, ep: _Endpoint, ref: Reference, challenge: Challenge,
                           scopes: list[str], creds: Credentials | None,
                           attempts: _Attempts) -> Token:
        session = await self._get_session()
        while True:
            try:
                token = await fetch_token(session, challenge, scopes, creds, ssl_context=ep.tls,
                                          timeout=self._timeout, headers=self._headers)
            except TokenRequestError as exc:
                count_request(ep.host, "token", exc.status or "error")
                if _transient_status(exc.status):
                    await attempts.failed(str(exc), exc.retry_after)
                    continue
                source = (f"token server {exc.realm} answered HTTP {exc.status}" if exc.status
                          else f"challenge from {ep}")
                raise FailedPrecondition(
                    f"pull access denied for {ref.repository}: {exc.message} ({source})"
                ) from None
            except aiohttp.ClientSSLError as exc:
                count_request(ep.host, "token", "error")
                raise FailedPrecondition(f"token server for {ep}: TLS failed: {exc}") from None
            except _TRANSIENT_ERRORS as exc:
                count_request(ep.host, "token", "error")
                await attempts.failed(f"token server {challenge.params.get('realm')}: "
                                      f"{_describe(exc)}")
                continue
            count_request(ep.host, "token", 200)
            return token

    # ------------------------------------------------------------------ requests

    async def _open(self, ep: _Endpoint, kind: Kind, url: yarl.URL,
                    headers: dict[str, str]) -> aiohttp.ClientResponse:
        """GET following redirects by hand: blob GETs are often sent to storage on another
        host, which must not see the registry's Authorization header."""
        session = await self._get_session()
        for _ in range(MAX_REDIRECTS + 1):
            try:
                resp = await session.get(url, headers=headers, ssl=ep.tls,
                                         timeout=self._timeout, allow_redirects=False)
            except Exception:
                count_request(ep.host, kind, "error")
                raise
            count_request(ep.host, kind, resp.status)
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECT_STATUSES or not location:
                return resp
            resp.release()
            target = url.join(yarl.URL(location, encoded=True))
            if target.scheme not in ("http", "https") or not target.host:
                raise FailedPrecondition(f"{ep}: redirect to unusable URL {location!r}")
            if target.origin() != url.origin():
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target
        raise FailedPrecondition(f"{ep}: more than {MAX_REDIRECTS} redirects for {url}")

    async def _send(self, ep: _Endpoint, ref: Reference, kind: Kind, url: yarl.URL,
                    headers: Mapping[str, str], creds: Credentials | None,
                    attempts: _Attempts) -> aiohttp.ClientResponse:
        """GET `url` with auth and retries; return a response that is not 401/403/429/5xx
        (the caller reads and releases it)."""
        scope = f"repository:{ref.path}:pull"
        ep_creds = self._credentials(ep, ref, creds)
        key: CacheKey = (ep.name, frozenset({scope}),
                         ep_creds.fingerprint() if ep_creds else "")
        challenged = False
        while True:
            request_headers = {**self._headers, **headers}
            if ep_creds is not None and ep_creds.registry_token:
                # A registry token from the kubelet is used as is: no token server round.
                sent: str | None = f"Bearer {ep_creds.registry_token}"
            else:
                sent = self._tokens.get(key)
            if sent is not None:
                request_headers["Authorization"] = sent
            try:
                resp = await self._open(ep, kind, url, request_headers)
            except aiohttp.ClientSSLError as exc:
                # Certificates do not get better with retries.
                raise FailedPrecondition(f"{ep}: TLS failed: {exc}") from None
            except _TRANSIENT_ERRORS as exc:
                if ep.mirror and isinstance(exc, aiohttp.ClientConnectorError):
                    raise _Unreachable(f"{ep}: {_describe(exc)}") from None
                await attempts.failed(_describe(exc))
                continue

            status = resp.status
            if status in (401, 403) and resp.url.origin() != url.origin():
                # Refused by the storage a redirect led to (say, an expired pre-signed URL):
                # the registry hands out a fresh redirect on the next try.
                body = await _read_error(resp)
                await attempts.failed(f"HTTP {status} from {resp.url.origin()} after a "
                                      f"redirect: {error_text(body) or resp.reason}")
                continue
            if status in (401, 403) or _transient_status(status):
                body = await _read_error(resp)
                if status == 401 and not challenged and not (ep_creds and ep_creds.registry_token):
                    challenged = True
                    challenges = parse_challenges(resp.headers.getall("WWW-Authenticate", []))
                    await self._authenticate(ep, ref, key, scope, challenges, ep_creds, sent,
                                             body, attempts)
                    continue
                if status in (401, 403):
                    raise FailedPrecondition(f"pull access denied for {ref.repository}: "
                                             f"{error_text(body) or f'HTTP {status}'} ({ep})")
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                await attempts.failed(f"HTTP {status}: {error_text(body) or resp.reason}",
                                      retry_after)
                continue
            return resp

    # ------------------------------------------------------------------ manifests

    async def get_manifest(self, ref: Reference, reference: str,
                           creds: Credentials | None = None, *,
                           accept: Sequence[str] = ALL_MANIFEST_TYPES) -> Manifest:
        """Fetch the manifest `reference` (a tag or a digest) of `ref`'s repository. A
        digest is verified against the body; for a tag the digest is computed."""
        by_digest = is_digest(reference)
        if not by_digest and not is_tag(reference):
            raise Invalid(f"{ref.repository}: {reference!r} is neither a tag nor a digest")
        what = f"{ref.repository}{'@' if by_digest else ':'}{reference}"

        async def attempt(ep: _Endpoint) -> Manifest:
            attempts = _Attempts(self._max_attempts, self._backoff,
                                 f"{ep}: GET manifest {what}")
            url = ep.url(ref, "manifests", reference)
            while True:
                resp = await self._send(ep, ref, "manifest", url, {"Accept": ", ".join(accept)},
                                        creds, attempts)
                try:
                    if resp.status == 404:
                        raise NotFound(f"{what}: not found")
                    if resp.status != 200:
                        raise _unexpected(resp, f"{ep}: GET manifest {what}",
                                          await _read_error(resp))
                    body = await self._read_manifest(resp, ep, what)
                except _TRANSIENT_ERRORS as exc:
                    await attempts.failed(f"reading the manifest: {_describe(exc)}")
                    continue
                finally:
                    resp.release()
                return self._manifest(resp, body, ep, what, reference if by_digest else None)

        return await self._over_endpoints(ref.domain, attempt)

    async def _read_manifest(self, resp: aiohttp.ClientResponse, ep: _Endpoint,
                             what: str) -> bytes:
        limit = self._max_manifest_size
        too_big = Invalid(f"{what}: manifest from {ep} is larger than {limit} bytes")
        if resp.content_length is not None and resp.content_length > limit:
            raise too_big
        body = await resp.content.read(limit + 1)
        while len(body) <= limit and not resp.content.at_eof():
            more = await resp.content.read(limit + 1 - len(body))
            if not more:
                break
            body += more
        if len(body) > limit:
            raise too_big
        return body

    def _manifest(self, resp: aiohttp.ClientResponse, body: bytes, ep: _Endpoint, what: str,
                  digest: str | None) -> Manifest:
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if media_type not in ALL_MANIFEST_TYPES:
            # Some registries serve manifests as application/json; the body says what it is.
            media_type = _sniff_media_type(body) or media_type
        if digest is not None:
            actual = _digest_of(body, digest.split(":")[0])
            if actual != digest:
                raise Invalid(f"{what}: digest mismatch: {ep} returned a manifest whose "
                              f"digest is {actual}")
        else:
            digest = _digest_of(body, "sha256")
            header = resp.headers.get("Docker-Content-Digest", "")
            if header and header != digest:
                if is_digest(header) and _digest_of(body, header.split(":")[0]) == header:
                    digest = header  # same content, named with another algorithm
                else:
                    log.warning("Docker-Content-Digest does not match the manifest; using the "
                                "computed digest", what=what, endpoint=ep.name, header=header,
                                computed=digest)
        return Manifest(media_type=media_type, digest=digest, body=body, endpoint=ep.name)

    # ------------------------------------------------------------------ blobs

    async def fetch_blob(self, ref: Reference, digest: str, *, offset: int = 0,
                         creds: Credentials | None = None,
                         expected_size: int | None = None) -> AsyncGenerator[bytes, None]:
        """Yield the blob's bytes from `offset` on. A dropped connection is resumed with a
        Range request (up to max_attempts tries per endpoint); the digest is not checked
        here (the content store does), but more than `expected_size` bytes never pass."""
        if not is_digest(digest):
            raise Invalid(f"{ref.repository}: {digest!r} is not a digest")
        if offset < 0 or (expected_size is not None and not 0 <= offset <= expected_size):
            raise Invalid(f"blob {digest}: offset {offset} outside 0..{expected_size}")
        if expected_size is not None and offset == expected_size:
            return
        what = f"blob {digest} of {ref.repository}"
        position = offset
        failures: list[str] = []
        endpoints = self._live_endpoints(ref.domain)
        for i, ep in enumerate(endpoints):
            attempts = _Attempts(self._max_attempts, self._backoff, f"{ep}: GET {what}")
            try:
                stream = self._blob_stream(ep, ref, digest, position, creds, expected_size,
                                           attempts, what)
                async with aclosing(stream):
                    async for chunk in stream:
                        position += len(chunk)
                        yield chunk
                return
            except ShoalError as exc:
                if i == len(endpoints) - 1:
                    raise _with_failures(exc, failures) from None
                # Bytes already passed on stay valid: the next endpoint continues from here.
                self._mirror_failed(ep, exc)
                failures.append(_naming(ep, exc))

    async def _blob_stream(self, ep: _Endpoint, ref: Reference, digest: str, start: int,
                           creds: Credentials | None, expected_size: int | None,
                           attempts: _Attempts, what: str) -> AsyncIterator[bytes]:
        url = ep.url(ref, "blobs", digest)
        position = start
        while True:
            headers = {"Range": f"bytes={position}-"} if position else {}
            resp = await self._send(ep, ref, "blob", url, headers, creds, attempts)
            _read_in_large_pieces(resp)
            try:
                body = await _blob_body(resp, ep, what, position)
                if body is None:
                    return  # nothing left after `position`
                if None not in (expected_size, body.total) and body.total != expected_size:
                    raise Invalid(f"{what}: {ep} has {body.total} bytes, expected "
                                  f"{expected_size}")
                size = expected_size if expected_size is not None else body.total
                skip = body.skip
                # Each buffer as it was received: no re-joining into fixed-size chunks.
                async for chunk, _ in resp.content.iter_chunks():
                    if skip:
                        # The server ignored Range: drop what the caller already has.
                        cut = min(skip, len(chunk))
                        skip -= cut
                        chunk = chunk[cut:]
                        if not chunk:
                            continue
                    if size is not None and position + len(chunk) > size:
                        raise Invalid(f"{what}: {ep} sent more than the expected {size} bytes")
                    count_bytes(ep.host, len(chunk))
                    position += len(chunk)
                    yield chunk
                if skip:
                    raise Invalid(f"{what}: {ep} sent a blob shorter than offset {start}")
                if size is not None and position < size:
                    if position == body.range_end:
                        continue  # a smaller range than asked for, as announced: ask again
                    # A body that ended cleanly but short (no Content-Length to catch it).
                    await attempts.failed(f"stream ended at byte {position} of {size}")
                    continue
                return
            except _TRANSIENT_ERRORS as exc:
                log.info("blob download interrupted; resuming", what=what, endpoint=ep.name,
                         position=position, error=_describe(exc))
                await attempts.failed(f"connection lost at byte {position}: {_describe(exc)}")
            finally:
                resp.release()


@dataclass(frozen=True)
class _BlobBody:
    skip: int  # leading bytes to drop (a 200 answer to a Range request)
    total: int | None  # the blob's size, when the response says
    range_end: int | None  # for a 206: the position after its last byte


_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


async def _blob_body(resp: aiohttp.ClientResponse, ep: _Endpoint, what: str,
                     position: int) -> _BlobBody | None:
    """How to read `resp` to continue at `position`; None when the blob has nothing after
    `position`. Raises for error statuses."""
    if resp.status == 200:
        if position:
            log.info("registry ignored Range; skipping bytes already received", what=what,
                     endpoint=ep.name, skip=position)
        return _BlobBody(position, resp.content_length, None)
    if resp.status == 206:
        content_range = resp.headers.get("Content-Range")
        if content_range is None:
            return _BlobBody(0, None, None)  # assume it honoured our open-ended range
        match = _CONTENT_RANGE_RE.match(content_range.strip())
        if not match or int(match.group(1)) > position:
            raise Invalid(f"{what}: {ep} answered Range bytes={position}- with Content-Range "
                          f"{content_range!r}")
        total = int(match.group(3)) if match.group(3).isdigit() else None
        return _BlobBody(position - int(match.group(1)), total, int(match.group(2)) + 1)
    if resp.status == 416 and position:
        total_text = (resp.headers.get("Content-Range") or "").rpartition("/")[2]
        if total_text.isdigit() and int(total_text) == position:
            return None
    body = await _read_error(resp)
    if resp.status == 404:
        raise NotFound(f"{what}: not found")
    raise _unexpected(resp, f"{ep}: GET {what}", body)


async def _read_error(resp: aiohttp.ClientResponse) -> bytes:
    try:
        return await resp.content.read(MAX_ERROR_BODY)
    except _TRANSIENT_ERRORS:
        return b""
    finally:
        resp.release()


def _unexpected(resp: aiohttp.ClientResponse, what: str, body: bytes) -> ShoalError:
    message = f"{what}: HTTP {resp.status}: {error_text(body) or resp.reason}"
    return Invalid(message) if resp.status == 400 else FailedPrecondition(message)


def _naming(ep: _Endpoint, exc: ShoalError) -> str:
    return f"{ep}: {exc.message.removeprefix(f'{ep.name}: ')}"


def _with_failures(exc: ShoalError, failures: list[str]) -> ShoalError:
    if not failures:
        return exc
    return type(exc)(f"{exc.message} (mirrors tried first: {'; '.join(failures)})",
                     details=exc.details)


def _digest_of(body: bytes, algorithm: str) -> str:
    return f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"


def _sniff_media_type(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(doc, dict):
        return ""
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if isinstance(doc.get("manifests"), list):
        return OCI_INDEX
    if "config" in doc and "layers" in doc:
        return OCI_MANIFEST
    return ""


def _read_in_large_pieces(resp: aiohttp.ClientResponse) -> None:
    """Let a blob's socket be read up to READ_BUFFER at a time, not asyncio's 256 KiB.

    asyncio's socket transport reads at most its `max_size` per recv (a class attribute;
    set here on this connection's transport only). A fast registry fills the socket faster
    than that, and every recv is a trip through the transport, aiohttp's parser and stream
    and our generators: measured over loopback, 1 MiB reads cut the puller's CPU per
    200 MB pull by a tenth (0.40 to 0.36 s) and its time by 7%. A transport without the
    attribute (TLS) keeps its own reads."""
    connection = resp.connection
    transport = connection.transport if connection is not None else None
    if transport is not None and isinstance(getattr(transport, "max_size", None), int):
        transport.max_size = max(transport.max_size, READ_BUFFER)  # type: ignore[attr-defined]
