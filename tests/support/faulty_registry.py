"""Test servers for the registry client: a fault-injecting front for the real registry, a
token server, and a blob-storage stand-in that redirects land on.

`FaultyRegistry(upstream)` proxies to the real `docker-registry` and applies scripted
rules first (fail with a status, cut or stall a body after N bytes, ignore Range, redirect,
tamper with a body); `gate` puts an auth check in front of /v2/. Every request is recorded
with its headers so tests can assert on what the client sent.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
import ssl
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import aiohttp
from aiohttp import web
from shoal_puller.registry import RegistryClient

from support.images import Image, Index

_PROXIED_HEADERS = ("Content-Type", "Docker-Content-Digest", "Content-Range", "Location",
                    "Accept-Ranges", "Docker-Distribution-Api-Version", "WWW-Authenticate",
                    "Retry-After", "Range", "Docker-Upload-UUID")
# Request headers passed on: what a pull sends, and what uploads (pushes) need.
_FORWARDED_HEADERS = ("Accept", "Range", "Content-Type", "Content-Range")


# After this many body bytes, await the callable's result before sending the rest.
Stall = tuple[int, Callable[[], Awaitable[object]]]


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]


async def serve_locally(handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                        ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """An aiohttp app passing every request to `handler`, on 127.0.0.1 at a free port
    (optionally TLS): its runner (cleanup() stops it) and its port."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    # A short shutdown timeout: stalled handlers are cancelled, not waited for.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
    return runner, runner.addresses[0][1]


class _Server:
    """An aiohttp app on 127.0.0.1 with a free port, optionally TLS, recording requests."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.requests: list[Seen] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._refusals = 0  # see refuse()
        self._refusal = (0, "")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}"

    def seen(self, pattern: str) -> list[Seen]:
        return [r for r in self.requests if re.search(pattern, r.path)]

    def refuse(self, times: int, status: int, text: str) -> None:
        """Answer the next `times` requests with `status` and `text`, then handle again."""
        self._refusals = times
        self._refusal = (status, text)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(Seen(request.method, request.path,
                                  request.rel_url.raw_query_string, dict(request.headers)))
        if self._refusals:
            self._refusals -= 1
            status, text = self._refusal
            return web.Response(status=status, text=text)
        return await self.handle(request)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def start(self) -> Self:
        self._runner, self.port = await serve_locally(self._dispatch, self.ssl_context)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()


Action = Callable[[web.Request, str], Awaitable[web.StreamResponse]]
Gate = Callable[[web.Request], web.StreamResponse | None]


@dataclass
class Rule:
    pattern: re.Pattern[str]
    action: Action
    times: int | None  # None: every matching request


class FaultyRegistry(_Server):
    """Proxy to `upstream` (the real registry) with scripted faults; `prefix` mounts the API
    under a path, as mirrors sometimes are (`http://host/prefix/v2/...`)."""

    def __init__(self, upstream: str | None = None, *, prefix: str = "",
                 ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(ssl_context)
        self.upstream = upstream.rstrip("/") if upstream else None
        self.prefix = prefix.rstrip("/")
        self.rules: list[Rule] = []
        self.gate: Gate | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return super().url + self.prefix

    async def stop(self) -> None:
        await super().stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ----------------------------------------------------------------- scripting

    def add(self, pattern: str, action: Action, times: int | None = 1) -> None:
        self.rules.append(Rule(re.compile(pattern), action, times))

    def respond(self, pattern: str, status: int, *, times: int | None = 1,
                headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        async def action(request: web.Request, path: str) -> web.StreamResponse:
            return web.Response(status=status, headers=headers, body=body)
        self.add(pattern, action, times)

    def cut(self, pattern: str, after: int, *, times: int | None = 1) -> None:
        """Proxy, but drop the connection after `after` body bytes."""
        async def action(request: web.Request, path: str) -> web.StreamResponse:
            return await self.proxy(request, path, cut_after=after)
        self.add(pattern, action, times)

    def stall(self, pattern: str, after: int, seconds: float, *, times: int | None = 1) -> None:
        """Proxy, but go silent for `seconds` after `after` body bytes."""
        async def action(request: web.Request, path: str) -> web.StreamResponse:
            return await self.proxy(request, path, stall=(after, lambda: asyncio.sleep(seconds)))
        self.add(pattern, action, times)

    def hold(self, pattern: str, after: int, until: asyncio.Event, *,
             times: int | None = 1) -> None:
        """Proxy, but go silent after `after` body bytes until the test sets `until`."""
        async def action(request: web.Request, path: str) -> web.StreamResponse:
            return await self.proxy(request, path, stall=(after, until.wait))
        self.add(pattern, action, times)

    def trickle(self, pattern: str, bytes_per_second: int, *,
                times: int | None = 1) -> None:
        """Proxy, but send the body slowly (a slow registry that does make progress)."""
        async def action(request: web.Request, path: str) -> web.StreamResponse:
            return await self.proxy(request, path, rate=bytes_per_second)
        self.add(pattern, action, times)

    def ignore_range(self, pattern: str, *, times: int | None = None) -> None:
        """Proxy without the Range header: the client gets 200 and the whole blob."""
        async def action(request: web.Request, path: str) -> web.StreamResponse:
            return await self.proxy(request, path, drop_range=True)
        self.add(pattern, action, times)

    def redirect(self, pattern: str, base: str, *, times: int | None = None) -> None:
        async def action(request: web.Request, path: str) -> web.StreamResponse:
            # Set by hand: aiohttp's redirect exceptions would normalise the escaped query,
            # and pre-signed storage URLs must arrive byte for byte.
            return web.Response(status=307,
                                headers={"Location": f"{base}{path}?signature=abc%2Fdef"})
        self.add(pattern, action, times)

    def tamper(self, pattern: str, change: Callable[[bytes], bytes], *,
               times: int | None = None) -> None:
        async def action(request: web.Request, path: str) -> web.StreamResponse:
            return await self.proxy(request, path, transform=change)
        self.add(pattern, action, times)

    # ----------------------------------------------------------------- serving

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if self.prefix:
            if not path.startswith(self.prefix + "/"):
                return web.Response(status=404, text="outside the mirror prefix")
            path = path[len(self.prefix):]
        if self.gate is not None and path.startswith("/v2/"):
            refused = self.gate(request)
            if refused is not None:
                return refused
        for rule in self.rules:
            if rule.times != 0 and rule.pattern.search(path):
                if rule.times is not None:
                    rule.times -= 1
                return await rule.action(request, path)
        return await self.proxy(request, path)

    async def proxy(self, request: web.Request, path: str, *, drop_range: bool = False,
                    cut_after: int | None = None, stall: Stall | None = None,
                    transform: Callable[[bytes], bytes] | None = None,
                    rate: int | None = None) -> web.StreamResponse:
        if self.upstream is None:
            return web.json_response({"errors": [{"code": "NAME_UNKNOWN",
                                                  "message": "no upstream"}]}, status=404)
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        headers = {k: v for k, v in request.headers.items() if k in _FORWARDED_HEADERS}
        if drop_range:
            headers.pop("Range", None)
        query = request.rel_url.raw_query_string
        url = self.upstream + path + (f"?{query}" if query else "")
        sent = await request.read() if request.can_read_body else None
        async with self._session.request(request.method, url, headers=headers, data=sent,
                                         allow_redirects=False) as upstream:
            resp = web.StreamResponse(status=upstream.status)
            for name in _PROXIED_HEADERS:
                if name in upstream.headers:
                    resp.headers[name] = upstream.headers[name]
            location = resp.headers.get("Location", "")
            if location.startswith(self.upstream + "/"):
                # Upload sessions continue through this front, not around it.
                resp.headers["Location"] = self.url + location[len(self.upstream):]
            if transform is not None:
                body = transform(await upstream.read())
                resp.content_length = len(body)
                await resp.prepare(request)
                await resp.write(body)
                await resp.write_eof()
                return resp
            if upstream.content_length is not None:
                resp.content_length = upstream.content_length
            await resp.prepare(request)
            try:
                await self._relay(request, upstream, resp, cut_after, stall, rate)
            except ConnectionError:
                pass  # the client gave up on us (e.g. its read timeout during a stall)
            return resp

    @staticmethod
    async def _relay(request: web.Request, upstream: aiohttp.ClientResponse,
                     resp: web.StreamResponse, cut_after: int | None,
                     stall: Stall | None, rate: int | None = None) -> None:
        sent = 0
        async for chunk in upstream.content.iter_chunked(16 << 10 if rate is None
                                                         else max(1, rate // 10)):
            if rate is not None:
                await asyncio.sleep(len(chunk) / rate)
            if cut_after is not None and sent + len(chunk) >= cut_after:
                await resp.write(chunk[: cut_after - sent])
                # Mid-body, Content-Length promised more: the client sees a broken
                # payload, as when a real connection drops.
                assert request.transport is not None
                request.transport.abort()
                return
            if stall is not None and sent + len(chunk) >= stall[0]:
                await resp.write(chunk[: stall[0] - sent])
                await stall[1]()
                chunk = chunk[stall[0] - sent:]
                sent = stall[0]
                stall = None
            await resp.write(chunk)
            sent += len(chunk)
        await resp.write_eof()


class BlobStorage(_Server):
    """Where registries redirect blob GETs: serves `blobs[path]`; records headers."""

    def __init__(self) -> None:
        super().__init__()
        self.blobs: dict[str, bytes] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        data = self.blobs.get(request.path)
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="application/octet-stream")


@dataclass
class Grant:
    user: str | None
    scopes: frozenset[str]


class TokenServer(_Server):
    """A distribution token server: GET with optional basic auth, POST with a refresh token.

    `users` maps user -> password; `refresh_tokens` maps identity token -> user;
    `private` repositories are granted only to known users."""

    def __init__(self, *, users: dict[str, str] | None = None,
                 refresh_tokens: dict[str, str] | None = None,
                 private: set[str] | None = None, expires_in: int = 300) -> None:
        super().__init__()
        self.users = users or {}
        self.refresh_tokens = refresh_tokens or {}
        self.private = private or set()
        self.expires_in = expires_in
        self.grants: dict[str, Grant] = {}
        self.forms: list[dict[str, str]] = []  # bodies of POSTs, for assertions

    def issue(self, user: str | None, scopes: set[str]) -> str:
        token = secrets.token_urlsafe(16)
        self.grants[token] = Grant(user, frozenset(scopes))
        return token

    def _allowed(self, user: str | None, scopes: list[str]) -> set[str]:
        allowed = set()
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) == 3 and (user is not None or parts[1] not in self.private):
                allowed.add(scope)
        return allowed

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path != "/token":
            return web.Response(status=404)
        if request.method == "POST":
            form = await request.post()
            self.forms.append({k: str(v) for k, v in form.items()})
            user = self.refresh_tokens.get(str(form.get("refresh_token", "")))
            if form.get("grant_type") != "refresh_token" or user is None:
                return web.json_response({"error": "invalid_grant",
                                          "error_description": "bad refresh token"},
                                         status=401)
            token = self.issue(user, self._allowed(user, str(form.get("scope", "")).split()))
            return web.json_response({"access_token": token, "expires_in": self.expires_in})
        user: str | None = None
        auth = request.headers.get("Authorization", "")
        if auth:
            name, _, password = base64.b64decode(auth.removeprefix("Basic ")).decode() \
                .partition(":")
            if self.users.get(name) != password:
                return web.json_response({"details": "incorrect username or password"},
                                         status=401)
            user = name
        token = self.issue(user, self._allowed(user, request.query.getall("scope", [])))
        return web.json_response({"token": token, "expires_in": self.expires_in})

    def bearer_gate(self, service: str = "test-registry") -> Gate:
        """A FaultyRegistry gate: Bearer tokens from this server with pull access to the
        repository, else 401 with a challenge naming this server."""

        def gate(request: web.Request) -> web.StreamResponse | None:
            match = re.match(r"^/v2/(.+)/(manifests|blobs)/", request.path)
            scope = f"repository:{match.group(1)}:pull" if match else ""
            header = request.headers.get("Authorization", "")
            grant = self.grants.get(header.removeprefix("Bearer ")) if header.startswith(
                "Bearer ") else None
            if grant is not None and (not scope or scope in grant.scopes):
                return None
            challenge = f'Bearer realm="{self.url}/token",service="{service}"'
            if scope:
                challenge += f',scope="{scope}"'
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                status=401, headers={"WWW-Authenticate": challenge})

        return gate


def basic_gate(user: str, password: str) -> Gate:
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def gate(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("Authorization") == expected:
            return None
        return web.json_response(
            {"errors": [{"code": "UNAUTHORIZED", "message": "basic auth required"}]},
            status=401, headers={"WWW-Authenticate": 'Basic realm="test registry"'})

    return gate


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def collect(chunks: AsyncIterable[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


# ------------------------------------------------------------------ fixture types
# (here rather than in conftest.py, which test modules must not import)


@dataclass(frozen=True)
class Pushed:
    """What the `pushed` fixture put into the session registry."""

    busybox: Image  # OCI, at puller/busybox:oci; its layer is ~1 MB
    busybox_docker: Image  # Docker schema 2, at puller/busybox:docker
    index: Index  # OCI index, at puller/multi:oci
    manifest_list: Index  # Docker manifest list, at puller/multi:docker
    small: Image  # at puller/small:v1 (and puller/private:v1 for auth tests)


MakeClient = Callable[..., RegistryClient]
