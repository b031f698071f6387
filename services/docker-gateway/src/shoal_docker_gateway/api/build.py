"""`docker build` (classic builder) and `docker builder prune`: POST /build streams the
build's JSON progress lines; the work is domain/build/."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
from typing import Any

from aiohttp import web
from shoal_common.messages.images import RegistryAuth

from shoal_docker_gateway.api.images import JsonLines
from shoal_docker_gateway.api.routes import Routes, json_response, query_bool, query_json
from shoal_docker_gateway.domain import images_pull
from shoal_docker_gateway.domain.backend import backend_of
from shoal_docker_gateway.domain.build import builder
from shoal_docker_gateway.domain.build.run import RunSpec
from shoal_docker_gateway.domain.images_refs import HUB, Ref, parse
from shoal_docker_gateway.errors import BadParameter, Unsupported

routes = Routes()

MAX_TEXT = 4096
_PLATFORM_RE = re.compile(r"\A[a-z0-9_]+/[a-z0-9_]+(?:/[a-z0-9_]+)?\Z")
_NETWORK_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
_TARGET_RE = re.compile(r"\A[A-Za-z][A-Za-z0-9_.-]{0,127}\Z")
_HUB_KEYS = ("index.docker.io", "registry-1.docker.io", "docker.io")
# Accepted and without effect here: the CLI sends them on every build.
_IGNORED_BOOLS = ("rm", "forcerm")


def _text(request: web.Request, name: str, default: str = "") -> str:
    value = request.query.get(name, default)
    if len(value) > MAX_TEXT or any(ord(c) < 32 for c in value):
        raise BadParameter(f"invalid {name}: {value[:100]!r}")
    return value


def _str_map(request: web.Request, name: str, nulls: bool) -> dict[str, Any]:
    raw = query_json(request, name)
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
            isinstance(k, str) and (isinstance(v, str) or (nulls and v is None))
            for k, v in raw.items()):
        raise BadParameter(f"invalid {name}: expected a JSON object of strings")
    return raw


def _tags(request: web.Request) -> list[Ref]:
    tags = []
    for text in request.query.getall("t", []):
        if not text:
            continue
        ref = parse(text, "tag")
        if ref.digest:
            raise BadParameter(f"invalid tag {text!r}: a build's name cannot be a digest")
        tags.append(ref)
    return tags


def _unsupported(request: web.Request) -> None:
    query = request.query
    if query.get("version", "1") not in ("", "1"):
        raise Unsupported("BuildKit (version=2) is not supported by Shoal: build with "
                          "DOCKER_BUILDKIT=0 (the classic builder)")
    if query.get("remote"):
        raise Unsupported("a remote build context (git repository or URL) is not "
                          "supported by Shoal: send the context in the request")
    if query_bool(request, "squash"):
        raise Unsupported("--squash is not supported by Shoal")
    for name in ("extrahosts", "outputs"):
        if query.get(name):
            raise Unsupported(f"build option {name} is not supported by Shoal")
    if query.get("isolation", "default") not in ("", "default"):
        raise Unsupported("build option isolation is not supported by Shoal")


def _int(request: web.Request, name: str) -> int:
    value = request.query.get(name, "")
    if not value:
        return 0
    if not value.lstrip("-").isdigit() or int(value) < -1:
        raise BadParameter(f"invalid value for {name}: {value!r}")
    return max(int(value), 0)


def _run_spec(request: web.Request) -> RunSpec:
    network = _text(request, "networkmode")
    if network and not _NETWORK_RE.match(network):
        raise BadParameter(f"invalid networkmode {network!r}")
    if network.startswith("container"):
        raise Unsupported("--network container:... is not supported for builds by Shoal")
    return RunSpec([], {}, network=network, memory=_int(request, "memory"),
                   cpu_shares=_int(request, "cpushares"),
                   cpu_period=_int(request, "cpuperiod"), cpu_quota=_int(request, "cpuquota"),
                   cpuset_cpus=_text(request, "cpusetcpus"),
                   cpuset_mems=_text(request, "cpusetmems"))


def registry_auths(header: str) -> dict[str, RegistryAuth]:
    """X-Registry-Config (base64 JSON: registry -> Docker AuthConfig) by registry host;
    like dockerd, a header that does not decode means no credentials."""
    if not header:
        return {}
    try:
        text = header.strip()
        doc = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    out: dict[str, RegistryAuth] = {}
    for key, value in doc.items():
        if not isinstance(key, str) or not isinstance(value, dict):
            continue
        encoded = base64.urlsafe_b64encode(json.dumps(value).encode()).decode()
        auth = images_pull.registry_auth(encoded)
        host = key.split("://", 1)[-1].split("/", 1)[0]
        if auth is not None and host:
            out[HUB if host in _HUB_KEYS else host] = auth
    return out


def options_of(request: web.Request) -> builder.BuildOptions:
    """The query and headers of POST /build, checked (a 400 or 501 before anything)."""
    _unsupported(request)
    for name in _IGNORED_BOOLS:
        query_bool(request, name)
    target = _text(request, "target")
    if target and not _TARGET_RE.match(target):
        raise BadParameter(f"invalid target {target!r}")
    platform = _text(request, "platform")
    if platform and not _PLATFORM_RE.match(platform):
        raise BadParameter(f"invalid platform {platform!r}: expected os/arch[/variant]")
    dockerfile = _text(request, "dockerfile", "Dockerfile") or "Dockerfile"
    with contextlib.suppress(BadParameter):
        query_json(request, "cachefrom")  # the classic builder's cache is the node's own
    return builder.BuildOptions(
        tags=_tags(request), dockerfile=dockerfile,
        build_args=_str_map(request, "buildargs", nulls=True),
        labels=_str_map(request, "labels", nulls=False),
        nocache=query_bool(request, "nocache"), quiet=query_bool(request, "q"),
        target=target, pull=query_bool(request, "pull"), platform=platform,
        auths=registry_auths(request.headers.get("X-Registry-Config", "")),
        run=_run_spec(request))


@routes.post("/build")
async def build(request: web.Request) -> web.StreamResponse:
    options = options_of(request)
    stream = JsonLines(request)
    try:
        await builder.build(backend_of(request), options, request.content, stream.send)
    except Exception as exc:
        if not stream.started:
            raise
        if not isinstance(exc, ConnectionResetError):
            with contextlib.suppress(ConnectionResetError):
                await stream.send(builder.error_message(exc))
    return await stream.finish()


@routes.post("/build/prune")
async def prune(request: web.Request) -> web.Response:
    query_bool(request, "all")
    return json_response(await builder.prune(backend_of(request)))
