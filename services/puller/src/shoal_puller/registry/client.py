"""Async client of the OCI distribution API: manifests and blobs, over mirrors and upstream.

Per request: bearer/basic auth on a 401 challenge (auth.py), retries with backoff on 429,
5xx and broken connections, manual redirects (transport.py). Per registry: its mirrors in
order, then the registry itself (endpoints.py). Here: manifests, read with a size limit and
checked against their digest, and blobs, streamed and resumed with a Range request where a
connection dropped.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aiohttp
import structlog
import yarl
from shoal_common.errors import Invalid, NotFound, ShoalError
from shoal_common.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
)

from shoal_puller.config import RegistryHostConfig
from shoal_puller.registry._http import Backoff
from shoal_puller.registry.auth import Authorizer, Credentials
from shoal_puller.registry.endpoints import PULL, RESOLVE, Endpoint, Endpoints
from shoal_puller.registry.hosts_tree import HostsDir
from shoal_puller.registry.metrics import Kind, count_bytes
from shoal_puller.registry.reference import Reference, is_digest, is_tag
from shoal_puller.registry.transport import (
    TRANSIENT_ERRORS,
    Attempts,
    Transport,
    describe,
    read_error,
    read_in_large_pieces,
    unexpected,
)
from shoal_puller.registry.upload import DEFAULT_CHUNK_SIZE, Uploads

log = structlog.get_logger("shoal.puller.registry")

# What a manifest GET accepts, indexes first.
ALL_MANIFEST_TYPES: tuple[str, ...] = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST,
                                       DOCKER_MANIFEST)
# Manifests are small JSON; anything bigger is a broken or hostile registry.
MAX_MANIFEST_SIZE = 4 << 20


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
        hosts: HostsDir | None = None,
    ) -> None:
        """`read_timeout` bounds the wait for each chunk, not a whole download, so large
        blobs are fine and a stalled connection is noticed. `mirror_down_for`: a mirror
        that refused a connection is skipped this many seconds. `hosts`: containerd's
        host directories (services.puller.config_path)."""
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self._endpoints = Endpoints(registries, mirror_down_for, hosts)
        self._transport = Transport(
            session=session, user_agent=user_agent, max_attempts=max_attempts,
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            backoff=Backoff(backoff_base, backoff_cap, retry_after_cap))
        self._auth = Authorizer(self._endpoints, self._transport)
        self._max_manifest_size = max_manifest_size

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def uploads(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Uploads:
        """The push side, sharing this client's endpoints, HTTP session and tokens."""
        return Uploads(self._endpoints, self._transport, self._auth, chunk_size)

    def endpoints(self, domain: str) -> list[str]:
        """The endpoints tried for a registry host, in order (for logs and tests)."""
        return [ep.name for ep in self._endpoints.all(domain)]

    async def _send(self, ep: Endpoint, ref: Reference, kind: Kind, url: yarl.URL,
                    headers: Mapping[str, str], creds: Credentials | None,
                    attempts: Attempts) -> aiohttp.ClientResponse:
        # A fresh RequestAuth each time: every GET may answer one 401 with a new token.
        return await self._transport.send(ep, ref, kind, url, headers,
                                          self._auth.request(ep, ref, creds), attempts)

    async def get_manifest(self, ref: Reference, reference: str,
                           creds: Credentials | None = None, *,
                           accept: Sequence[str] = ALL_MANIFEST_TYPES) -> Manifest:
        """Fetch the manifest `reference` (a tag or a digest) of `ref`'s repository. A
        digest is verified against the body; for a tag the digest is computed."""
        by_digest = is_digest(reference)
        if not by_digest and not is_tag(reference):
            raise Invalid(f"{ref.repository}: {reference!r} is neither a tag nor a digest")
        what = f"{ref.repository}{'@' if by_digest else ':'}{reference}"

        async def attempt(ep: Endpoint) -> Manifest:
            attempts = self._transport.attempts(f"{ep}: GET manifest {what}")
            url = ep.url(ref, "manifests", reference)
            while True:
                resp = await self._send(ep, ref, "manifest", url, {"Accept": ", ".join(accept)},
                                        creds, attempts)
                try:
                    if resp.status == 404:
                        raise NotFound(f"{what}: not found")
                    if resp.status != 200:
                        raise unexpected(resp, f"{ep}: GET manifest {what}",
                                         await read_error(resp))
                    body = await self._read_manifest(resp, ep, what)
                except TRANSIENT_ERRORS as exc:
                    await attempts.failed(f"reading the manifest: {describe(exc)}")
                    continue
                finally:
                    resp.release()
                return self._manifest(resp, body, ep, what, reference if by_digest else None)

        # A tag is resolved only where resolving is trusted; a digest verifies itself.
        return await self._endpoints.first_success(ref.domain, attempt,
                                                   PULL if by_digest else RESOLVE)

    async def _read_manifest(self, resp: aiohttp.ClientResponse, ep: Endpoint,
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

    def _manifest(self, resp: aiohttp.ClientResponse, body: bytes, ep: Endpoint, what: str,
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
        for ep in self._endpoints.live(ref.domain):
            attempts = self._transport.attempts(f"{ep}: GET {what}")
            try:
                stream = self._blob_stream(ep, ref, digest, position, creds, expected_size,
                                           attempts, what)
                async with aclosing(stream):
                    async for chunk in stream:
                        position += len(chunk)
                        yield chunk
                return
            except ShoalError as exc:
                # Raised for the upstream; after a mirror, the bytes already passed on stay
                # valid: the next endpoint continues from here.
                self._endpoints.failed(ep, exc, failures)

    async def _blob_stream(self, ep: Endpoint, ref: Reference, digest: str, start: int,
                           creds: Credentials | None, expected_size: int | None,
                           attempts: Attempts, what: str) -> AsyncGenerator[bytes, None]:
        url = ep.url(ref, "blobs", digest)
        position = start
        while True:
            headers = {"Range": f"bytes={position}-"} if position else {}
            resp = await self._send(ep, ref, "blob", url, headers, creds, attempts)
            read_in_large_pieces(resp)
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
            except TRANSIENT_ERRORS as exc:
                log.info("blob download interrupted; resuming", what=what, endpoint=ep.name,
                         position=position, error=describe(exc))
                await attempts.failed(f"connection lost at byte {position}: {describe(exc)}")
            finally:
                resp.release()


@dataclass(frozen=True)
class _BlobBody:
    skip: int  # leading bytes to drop (a 200 answer to a Range request)
    total: int | None  # the blob's size, when the response says
    range_end: int | None  # for a 206: the position after its last byte


_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


async def _blob_body(resp: aiohttp.ClientResponse, ep: Endpoint, what: str,
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
    body = await read_error(resp)
    if resp.status == 404:
        raise NotFound(f"{what}: not found")
    raise unexpected(resp, f"{ep}: GET {what}", body)


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


