"""How an endpoint is declared: `@routes.get("/containers/json")` in one module per group
(system, images, containers, ...). Docker clients put the API version first
(`/v1.41/containers/json`) or leave it out; both reach the same handler, and the version a
client asked for is `api_version(request)`."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from shoal_docker_gateway.errors import BadParameter

API_VERSION = "1.41"  # what Debian's docker.io 20.10 speaks; newer clients negotiate down
MIN_API_VERSION = "1.12"
_PREFIX = r"/{api_version:(?:v[0-9]+\.[0-9]+/)?}"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Routes:
    """A RouteTableDef whose paths accept the optional version prefix."""

    def __init__(self) -> None:
        self.table = web.RouteTableDef()

    def _add(self, method: str, path: str) -> Callable[[Handler], Handler]:
        if not path.startswith("/"):
            raise ValueError(f"route {path!r} must start with /")
        return self.table.route(method, _PREFIX + path[1:])

    def get(self, path: str) -> Callable[[Handler], Handler]:
        """GET, and HEAD with the same headers (aiohttp adds it)."""
        return self._add("GET", path)

    def post(self, path: str) -> Callable[[Handler], Handler]:
        return self._add("POST", path)

    def put(self, path: str) -> Callable[[Handler], Handler]:
        return self._add("PUT", path)

    def delete(self, path: str) -> Callable[[Handler], Handler]:
        return self._add("DELETE", path)


def api_version(request: web.Request) -> tuple[int, int]:
    """The version the client named in the path (no prefix: ours)."""
    text = request.match_info.get("api_version", "").strip("v/") or API_VERSION
    major, _, minor = text.partition(".")
    return int(major), int(minor)


JSON_TYPE = {"Content-Type": "application/json"}  # exactly: the CLI parses no other


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), status=status, headers=JSON_TYPE)


def query_bool(request: web.Request, name: str, default: bool = False) -> bool:
    """Docker's booleans in a query: 1/true/True/yes, 0/false/no/empty."""
    value = request.query.get(name)
    if value is None:
        return default
    low = value.lower()
    if low in ("1", "true", "yes"):
        return True
    if low in ("0", "false", "no", ""):
        return False
    raise BadParameter(f"invalid value for {name}: {value!r} is not a boolean")


def query_int(request: web.Request, name: str, default: int) -> int:
    value = request.query.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise BadParameter(f"invalid value for {name}: {value!r} is not an integer") from None


def query_json(request: web.Request, name: str) -> Any:
    """A JSON-encoded query parameter (`filters`, `labels`, ...); absent: None."""
    value = request.query.get(name)
    if not value:
        return None
    try:
        return json.loads(value)
    except ValueError:
        raise BadParameter(f"invalid {name}: not JSON: {value[:200]!r}") from None


MAX_JSON_BODY = 4 * 1024 * 1024


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (an empty body: {}); anything else is a 400."""
    raw = await request.content.read(MAX_JSON_BODY + 1)
    if len(raw) > MAX_JSON_BODY:
        raise BadParameter(f"request body over {MAX_JSON_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadParameter(f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise BadParameter("invalid JSON body: expected an object")
    return body
