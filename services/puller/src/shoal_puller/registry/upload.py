"""Uploads to a registry: the push side of the OCI distribution API.

Per blob: HEAD (is it in the repository already?), then a cross-repository mount from a
repository of the same registry known to hold it, else an upload session: a blob up to
`chunk_size` goes in one PUT (monolithic), a larger one in PATCH chunks closed by a PUT with
the digest (a registry refusing chunks gets the monolithic PUT). After a broken request
the session's status (GET, its `Range`) says what the registry kept, and the upload goes on
from there. Sessions are remembered in this process after a push fails, so a retried push
resumes them; a session the registry dropped is started afresh.

Pushes go to the registry itself, never to its mirrors (read caches; a hosts.toml host
with the push capability is used instead), with the registry's TLS, plain-HTTP and
credential settings, as pulls use them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import structlog
import yarl
from shoal_common.errors import FailedPrecondition, Invalid, ShoalError
from shoal_common.messages.push import BlobOutcome

from shoal_puller.registry._http import error_text, parse_retry_after
from shoal_puller.registry.auth import Authorizer, Credentials
from shoal_puller.registry.endpoints import PUSH, Endpoint, Endpoints
from shoal_puller.registry.metrics import count_request
from shoal_puller.registry.reference import Reference
from shoal_puller.registry.transport import (
    TRANSIENT_ERRORS,
    Attempts,
    Transport,
    describe,
    read_error,
    transient_status,
)

log = structlog.get_logger("shoal.puller.registry")

DEFAULT_CHUNK_SIZE = 16 << 20
READ_PIECE = 1 << 20  # a request body is read from the blob file this much at a time
MAX_SESSIONS = 4096  # remembered upload sessions; the oldest are forgotten first
_RANGE_RE = re.compile(r"^(?:bytes=)?(\d+)-(\d+)$")
# Answers to a first PATCH that say "not in chunks" rather than "not at all".
_NO_CHUNKS = frozenset({400, 405, 416, 501})

# Reports how many bytes of a blob the registry has (or is being sent) so far.
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    path: Path  # the committed blob file (never rewritten; an open file outlives GC)


@dataclass(frozen=True)
class Uploaded:
    outcome: BlobOutcome
    mounted_from: str = ""
    resumed_from: int = 0


@dataclass
class _Session:
    location: yarl.URL
    offset: int  # bytes the registry holds


class _Interrupted(Exception):
    """A request broke (connection, 5xx) and was counted; what the registry kept is to be
    asked, not assumed."""


class _Gone(Exception):
    """The registry no longer knows the upload session."""


@dataclass
class _Call:
    """The requests for one blob or manifest: where, as whom, and their retry budget."""

    ep: Endpoint
    ref: Reference
    creds: Credentials | None
    scopes: tuple[str, ...]
    attempts: Attempts
    what: str

    def denied(self, resp: aiohttp.ClientResponse, body: bytes) -> ShoalError:
        # A HEAD's refusal has no body: its reason phrase is all there is.
        text = registry_errors(body) or resp.reason or "refused"
        return FailedPrecondition(
            f"push access denied for {self.ref.repository}: HTTP {resp.status} {text} "
            f"({self.ep})", details=_details(resp.status, body))

    def refused(self, resp: aiohttp.ClientResponse, doing: str, body: bytes) -> ShoalError:
        text = registry_errors(body) or resp.reason or "no details"
        message = f"{self.ep}: {doing} {self.what}: registry refused: HTTP {resp.status} {text}"
        cls = Invalid if resp.status == 400 else FailedPrecondition
        return cls(message, details=_details(resp.status, body))


class _Body:
    """A range of a blob file as a request body, read off the loop, counted as it is sent;
    `data()` gives a fresh stream for each attempt."""

    def __init__(self, blob: Blob, start: int, length: int, progress: Progress) -> None:
        self.blob, self.start, self.length, self.progress = blob, start, length, progress

    def data(self) -> AsyncIterator[bytes]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        fd = await asyncio.to_thread(os.open, self.blob.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            position, end = self.start, self.start + self.length
            while position < end:
                piece = await asyncio.to_thread(os.pread, fd, min(READ_PIECE, end - position),
                                                position)
                if not piece:
                    raise Invalid(f"blob {self.blob.digest} is shorter than {end} bytes")
                yield piece
                position += len(piece)
                self.progress(position)
        finally:
            os.close(fd)


class Uploads:
    """The push side of a RegistryClient: the same endpoints, session and token cache."""

    def __init__(self, endpoints: Endpoints, transport: Transport, authorizer: Authorizer,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self._endpoints = endpoints
        self._transport = transport
        self._auth = authorizer
        self.chunk_size = chunk_size
        # (endpoint, repository path, digest) -> the upload URL of an unfinished session.
        self._sessions: dict[tuple[str, str, str], yarl.URL] = {}

    def endpoint(self, domain: str) -> Endpoint:
        """Where pushes to registry `domain` go: the first endpoint that may push (the
        registry itself, unless a hosts.toml names another)."""
        return self._endpoints.all(domain, PUSH)[0]

    def _call(self, ep: Endpoint, ref: Reference, creds: Credentials | None, what: str,
              sources: Sequence[str] = ()) -> _Call:
        scopes = (f"repository:{ref.path}:pull,push",
                  *(f"repository:{source}:pull" for source in sources))
        return _Call(ep, ref, creds, scopes, self._transport.attempts(f"{ep}: push {what}"),
                     what)

    # -- blobs -----------------------------------------------------------------------------

    async def push_blob(self, ep: Endpoint, ref: Reference, blob: Blob,
                        creds: Credentials | None, *, mount_from: Sequence[str] = (),
                        progress: Progress = lambda _: None) -> Uploaded:
        """Make `blob` part of `ref`'s repository on `ep`, sending only what it lacks."""
        call = self._call(ep, ref, creds, f"blob {blob.digest} to {ref.repository}")
        if await self._exists(call, blob.digest):
            return Uploaded("exists")
        key = (ep.name, ref.path, blob.digest)
        session = await self._resume(call, key)
        resumed = session.offset if session is not None else 0
        if session is None and mount_from:
            source = mount_from[0]
            mount = self._call(ep, ref, creds, call.what, sources=[source])
            mounted, session = await self._mount(mount, blob.digest, source)
            if mounted:
                return Uploaded("mounted", mounted_from=source)
        if session is None:
            session = await self._start(call)
        progress(session.offset)
        await self._upload(call, key, blob, session, progress)
        return Uploaded("uploaded", resumed_from=resumed)

    async def _exists(self, call: _Call, digest: str) -> bool:
        resp = await self._send(call, "HEAD", call.ep.url(call.ref, "blobs", digest))
        resp.release()
        if resp.status in (200, 301, 302, 303, 307, 308):
            return True  # a redirect leads to the blob's storage: the blob is there
        if resp.status == 404:
            return False
        raise call.refused(resp, "HEAD", b"")

    async def _start(self, call: _Call) -> _Session:
        url = yarl.URL(f"{call.ep.base}/{call.ref.path}/blobs/uploads/", encoded=True)
        resp = await self._send(call, "POST", url, headers={"Content-Length": "0"})
        body = await read_error(resp)
        if resp.status != 202:
            raise call.refused(resp, "POST upload", body)
        return self._session(call, resp, url, 0)

    async def _mount(self, call: _Call, digest: str,
                     source: str) -> tuple[bool, _Session | None]:
        """(mounted, or the upload session the registry opened instead)."""
        try:
            url = yarl.URL(f"{call.ep.base}/{call.ref.path}/blobs/uploads/"
                           f"?mount={digest}&from={source}", encoded=True)
            resp = await self._send(call, "POST", url, headers={"Content-Length": "0"})
            body = await read_error(resp)
            if resp.status == 201:
                return True, None
            if resp.status == 202:
                return False, self._session(call, resp, url, 0)
            log.info("registry refused a mount; uploading instead", what=call.what,
                     source=source, status=resp.status, error=registry_errors(body))
        except FailedPrecondition as exc:
            # Say, no pull access to the source: a plain upload may still be allowed.
            log.info("mount not allowed; uploading instead", what=call.what, source=source,
                     error=exc.message)
        return False, None

    async def _resume(self, call: _Call, key: tuple[str, str, str]) -> _Session | None:
        """The state of an upload session an earlier push left, if the registry keeps it."""
        location = self._sessions.get(key)
        if location is None:
            return None
        try:
            session = await self._status(call, _Session(location, 0))
        except _Gone:
            session = None
        if session is None:
            self._sessions.pop(key, None)
        else:
            log.info("resuming an upload", what=call.what, offset=session.offset)
        return session

    async def _status(self, call: _Call, session: _Session) -> _Session | None:
        """What the registry holds of `session` (GET: 204 with Range); None when its answer
        cannot be trusted, so the caller starts a new session."""
        resp = await self._send(call, "GET", session.location)
        body = await read_error(resp)
        if resp.status == 404:
            await _gone(call)
        if resp.status not in (200, 204):
            raise call.refused(resp, "GET upload status", body)
        match = _RANGE_RE.match(resp.headers.get("Range", "").strip())
        # No Range, or "0-0", which distribution answers for 0 bytes and for 1 byte alike.
        if match is None or int(match.group(1)) != 0 or int(match.group(2)) == 0:
            return None
        return self._session(call, resp, session.location, int(match.group(2)) + 1)

    def _session(self, call: _Call, resp: aiohttp.ClientResponse, url: yarl.URL,
                 offset: int) -> _Session:
        location = resp.headers.get("Location")
        if not location:
            if resp.status == 202 and resp.method == "POST":
                raise FailedPrecondition(f"{call.ep}: upload of {call.what}: the registry "
                                         "opened an upload session without a Location")
            return _Session(url, offset)
        target = url.join(yarl.URL(location, encoded=True))
        if target.scheme not in ("http", "https") or not target.host:
            raise FailedPrecondition(f"{call.ep}: upload of {call.what}: unusable upload "
                                     f"location {location!r}")
        return _Session(target, offset)

    async def _upload(self, call: _Call, key: tuple[str, str, str], blob: Blob,
                      session: _Session, progress: Progress) -> None:
        """Send what the registry lacks of `blob` and commit it (each broken request was
        counted in `call.attempts`, so this ends)."""
        chunked = blob.size > self.chunk_size or session.offset > 0
        current: _Session | None = session
        while True:
            try:
                if current is None:
                    current = await self._start(call)
                    progress(0)
                if chunked:
                    closing = await self._chunks(call, key, blob, current, progress)
                    if closing is None:
                        log.info("registry refused chunks; uploading in one request",
                                 what=call.what)
                        chunked, current = False, None
                        continue
                    done = await self._put(call, blob, closing, None)
                else:
                    done = await self._put(call, blob, current,
                                           _Body(blob, 0, blob.size, progress))
            except _Gone:
                done, current = False, None
            if done or await self._exists(call, blob.digest):
                self._sessions.pop(key, None)
                progress(blob.size)
                return
            # A broken close: the session, if the registry still has it all, is closed
            # again; a monolithic upload starts over (what reached the session is unknown).
            current = await self._still_open(call, current) if chunked else None

    async def _chunks(self, call: _Call, key: tuple[str, str, str], blob: Blob,
                      session: _Session, progress: Progress) -> _Session | None:
        """PATCH the rest of `blob` from `session.offset`; the session to close, or None
        when the registry refuses chunks (then nothing was sent)."""
        while session.offset < blob.size:
            self._remember(key, session.location)
            start = session.offset
            end = min(start + self.chunk_size, blob.size)
            try:
                resp = await self._send(call, "PATCH", session.location, headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{start}-{end - 1}",
                    "Content-Length": str(end - start)},
                    body=_Body(blob, start, end - start, progress), resend=False)
            except _Interrupted:
                status = await self._status(call, session)
                if status is None:
                    raise _Gone from None
                session = status
                progress(session.offset)
                continue
            body = await read_error(resp)
            if resp.status == 202:
                session = self._after_chunk(call, resp, session, end, blob.size)
            elif resp.status in _NO_CHUNKS and start == 0:
                return None
            elif resp.status == 416:
                # Out of step with the registry: ask where it stands.
                await call.attempts.failed(f"PATCH at {start}: HTTP 416")
                status = await self._status(call, session)
                if status is None:
                    raise _Gone
                session = status
            else:
                raise call.refused(resp, "PATCH", body)
            progress(session.offset)
        return session

    def _after_chunk(self, call: _Call, resp: aiohttp.ClientResponse, session: _Session,
                     end: int, size: int) -> _Session:
        match = _RANGE_RE.match(resp.headers.get("Range", "").strip())
        offset = int(match.group(2)) + 1 if match else end
        if offset > size:
            raise Invalid(f"{call.ep}: upload of {call.what}: the registry claims {offset} "
                          f"bytes of a {size}-byte blob")
        return self._session(call, resp, session.location, offset)

    async def _put(self, call: _Call, blob: Blob, session: _Session,
                   body: _Body | None) -> bool:
        """Close the session with the digest (and `body`, for a monolithic upload): True
        once the registry has the blob, False when the request broke."""
        raw = str(session.location)
        # Appended by hand: the session's own query (distribution's signed `_state`) must
        # reach the registry byte for byte.
        url = yarl.URL(f"{raw}{'&' if session.location.raw_query_string else '?'}"
                       f"digest={blob.digest}", encoded=True)
        length = body.length if body is not None else 0
        try:
            resp = await self._send(call, "PUT", url, headers={
                "Content-Type": "application/octet-stream", "Content-Length": str(length)},
                body=body, resend=False)
        except _Interrupted:
            return False
        text = await read_error(resp)
        if resp.status in (201, 204):
            return True
        if resp.status == 404:
            await _gone(call)
        raise call.refused(resp, "PUT", text)

    async def _still_open(self, call: _Call, session: _Session | None) -> _Session | None:
        if session is None:
            return None
        try:
            return await self._status(call, session)
        except _Gone:
            return None

    def _remember(self, key: tuple[str, str, str], location: yarl.URL) -> None:
        if key not in self._sessions and len(self._sessions) >= MAX_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))
        self._sessions[key] = location

    # -- manifests -------------------------------------------------------------------------

    async def push_manifest(self, ep: Endpoint, ref: Reference, reference: str,
                            media_type: str, body: bytes, digest: str,
                            creds: Credentials | None) -> None:
        """PUT the manifest `body` (exactly these bytes: its digest is its name) as
        `reference` (a tag or its digest) of `ref`'s repository."""
        shown = f"manifest {digest}" if reference == digest else (
            f"manifest {digest} as {ref.repository}:{reference}")
        call = self._call(ep, ref, creds, shown)
        url = ep.url(ref, "manifests", reference)
        resp = await self._send(call, "PUT", url, headers={"Content-Type": media_type},
                                body=lambda: body)
        text = await read_error(resp)
        if resp.status not in (200, 201, 202, 204):
            raise call.refused(resp, "PUT", text)
        echoed = resp.headers.get("Docker-Content-Digest", "")
        if echoed and echoed != digest:
            raise Invalid(f"{ep}: PUT {call.what}: the registry stored it as {echoed}")

    # -- requests --------------------------------------------------------------------------

    async def _send(self, call: _Call, method: str, url: yarl.URL, *,
                    headers: dict[str, str] | None = None,
                    body: _Body | Callable[[], Any] | None = None,
                    resend: bool = True) -> aiohttp.ClientResponse:
        """`method url` with auth; a response that is not 401/403/429/5xx (the caller reads
        and releases it). 429, 5xx and broken connections count as attempts and are sent
        again when `resend`, else raised as _Interrupted."""
        session = await self._transport.session()
        auth = self._auth.request(call.ep, call.ref, call.creds, call.scopes)
        while True:
            request_headers = {**self._transport.headers, **dict(call.ep.headers),
                               **(headers or {})}
            sent = auth.header()
            # The registry's Authorization never leaves its origin (an upload URL may).
            if sent is not None and url.origin() == call.ep.base.origin():
                request_headers["Authorization"] = sent
            data = body.data() if isinstance(body, _Body) else (body() if body else None)
            try:
                resp = await session.request(method, url, headers=request_headers, data=data,
                                             ssl=call.ep.tls,
                                             timeout=self._transport.timeout_for(call.ep),
                                             allow_redirects=False)
            except aiohttp.ClientSSLError as exc:
                raise FailedPrecondition(f"{call.ep}: TLS failed: {exc}") from None
            except TRANSIENT_ERRORS as exc:
                count_request(call.ep.host, "upload", "error")
                await self._failed(call, f"{method}: {describe(exc)}", None, resend)
                continue
            count_request(call.ep.host, "upload", resp.status)
            if resp.status not in (401, 403) and not transient_status(resp.status):
                return resp
            text = await read_error(resp)
            if resp.status == 401 and await auth.renew(
                    resp.headers.getall("WWW-Authenticate", []), sent, text, call.attempts):
                continue
            if resp.status in (401, 403):
                raise call.denied(resp, text)
            await self._failed(call, f"{method}: HTTP {resp.status} "
                               f"{registry_errors(text) or resp.reason}",
                               parse_retry_after(resp.headers.get("Retry-After")), resend)

    @staticmethod
    async def _failed(call: _Call, error: str, retry_after: float | None,
                      resend: bool) -> None:
        await call.attempts.failed(error, retry_after)
        if not resend:
            raise _Interrupted(error)


async def _gone(call: _Call) -> NoReturn:
    """The registry dropped the session (expired, purged): counted, so restarts end."""
    await call.attempts.failed("the registry no longer knows the upload session")
    raise _Gone


def registry_errors(body: bytes) -> str:
    """Distribution's error body as `CODE: message; ...`, else error_text's reading."""
    codes = _codes(body)
    if codes:
        return "; ".join(f"{code}: {message}" if message else code for code, message in codes)
    return error_text(body)


def _codes(body: bytes) -> list[tuple[str, str]]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    errors = doc.get("errors") if isinstance(doc, dict) else None
    out = []
    for err in errors if isinstance(errors, list) else []:
        if isinstance(err, dict) and isinstance(err.get("code"), str):
            message = err.get("message")
            out.append((err["code"][:64], " ".join(str(message or "").split())[:200]))
    return out[:4]


def _details(status: int, body: bytes) -> dict[str, str]:
    codes = _codes(body)
    details = {"http_status": str(status)}
    if codes:
        details["registry_code"] = codes[0][0]
    return details
