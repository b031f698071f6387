"""Docker's view of the puller's images in namespace `moby`: lookups by name, id or id
prefix; `docker images` summaries with filters; inspect and history from the image config.
Image ids are `sha256:<config digest>`, as Docker's are. Tag, rmi and prune are in
images_names.py."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from typing import Any

from shoal_common.errors import ErrorCode, ShoalError
from shoal_common.messages.images import ImageGetRequest, ImageInfo, ImageListRequest

from shoal_docker_gateway.domain.backend import Backend
from shoal_docker_gateway.domain.images_refs import familiar, looks_like_id, parse, split_name
from shoal_docker_gateway.errors import BadParameter, no_such_image

ZERO_TIME = "0001-01-01T00:00:00Z"
_FRACTION = re.compile(r"(\.\d{1,6})\d*")


def display_ref(ref: str) -> str:
    """How Docker names `ref` in an error: normalised and familiar when it is a name."""
    if looks_like_id(ref):
        return ref
    try:
        return parse(ref).familiar
    except BadParameter:
        return ref


async def find(backend: Backend, ref: str, with_config: bool = False) -> ImageInfo:
    """The image `ref` names (a name, `sha256:<id>`, or an unambiguous id prefix); 404 "No
    such image" otherwise. The puller normalises names and falls back to id prefixes."""
    if not looks_like_id(ref):
        parse(ref)  # a 400 in Docker's words before the puller is asked
    try:
        return await backend.clients.images.get(ImageGetRequest(ref=ref,
                                                                with_config=with_config))
    except ShoalError as exc:
        if exc.code == ErrorCode.NOT_FOUND:
            raise no_such_image(display_ref(ref)) from None
        raise


async def list_all(backend: Backend, with_config: bool = True) -> list[ImageInfo]:
    reply = await backend.clients.images.list_images(ImageListRequest(with_config=with_config))
    return reply.images


def config_of(info: ImageInfo) -> dict[str, Any]:
    """The image config as a JSON object ({} when not fetched or not an object)."""
    try:
        doc = json.loads(info.config) if info.config else {}
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def parse_time(text: Any) -> float:
    """An RFC 3339 time (nanoseconds allowed) as Unix seconds; 0 when absent or bad."""
    if not isinstance(text, str) or not text:
        return 0.0
    try:
        when = datetime.fromisoformat(_FRACTION.sub(r"\1", text.replace("Z", "+00:00")))
    except ValueError:
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def rfc3339(seconds: float) -> str:
    if seconds <= 0:
        return ZERO_TIME
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def created_of(info: ImageInfo, config: dict[str, Any]) -> float:
    """When the image was made (its config's `created`), else when it came to this node."""
    return parse_time(config.get("created")) or info.created


def labels_of(config: dict[str, Any]) -> dict[str, str]:
    inner = config.get("config")
    labels = inner.get("Labels") if isinstance(inner, dict) else None
    if not isinstance(labels, dict):
        return {}
    return {str(k): str(v) for k, v in labels.items()}


def repo_tags(info: ImageInfo) -> list[str]:
    return [familiar(n) for n in info.repo_tags]


def repo_digests(info: ImageInfo) -> list[str]:
    return [familiar(n) for n in info.repo_digests]


def summary(info: ImageInfo, names: list[str] | None = None) -> dict[str, Any]:
    """One entry of GET /images/json. Size is the content as stored (compressed layers):
    the store keeps no uncompressed size."""
    config = config_of(info)
    names = [familiar(n) for n in info.names] if names is None else names
    tags = [n for n in names if "@" not in n]
    digests = [n for n in names if "@" in n]
    if not tags and not digests:
        tags, digests = ["<none>:<none>"], ["<none>@<none>"]
    return {"Id": info.id, "ParentId": "", "RepoTags": tags, "RepoDigests": digests,
            "Created": int(created_of(info, config)), "Size": info.size,
            "SharedSize": -1, "VirtualSize": info.size, "Labels": labels_of(config),
            "Containers": -1}


# -- filters -----------------------------------------------------------------------------

def parse_filters(raw: Any, allowed: tuple[str, ...]) -> dict[str, list[str]]:
    """Docker's `filters` query: {"key": {"value": true}} or {"key": ["value"]}."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadParameter("invalid filters: expected a JSON object")
    out: dict[str, list[str]] = {}
    for key, values in raw.items():
        if key not in allowed:
            raise BadParameter(f"invalid filter '{key}'")
        if isinstance(values, dict):
            items = [v for v, on in values.items() if on is True]
        elif isinstance(values, list):
            items = values
        else:
            raise BadParameter(f"invalid filter '{key}': expected a list or an object")
        if not all(isinstance(v, str) for v in items):
            raise BadParameter(f"invalid filter '{key}': values must be strings")
        out[key] = list(items)
    return out


def _glob(pattern: str) -> re.Pattern[str]:
    """Go's path.Match: `*` and `?` stay within one path component."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end]
            out += "[" + ("^" + body[1:] if body.startswith("^") else re.escape(body)) + "]"
            i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(rf"\A{out}\Z")


def matching_names(info: ImageInfo, patterns: list[str]) -> list[str] | None:
    """The familiar names of `info` a `reference` filter keeps (None: the image is out)."""
    globs = [_glob(p) for p in patterns]
    names = [familiar(n) for n in info.names]
    kept = []
    for name in names:
        repo = split_name(name)[0]
        if any(g.match(name) or g.match(repo) for g in globs):
            kept.append(name)
    return kept or None


def label_match(labels: dict[str, str], wanted: list[str]) -> bool:
    for item in wanted:
        key, eq, value = item.partition("=")
        if key not in labels or (eq and labels[key] != value):
            return False
    return True


def until_seconds(text: str) -> float:
    """A `until`/`before` time: Unix seconds, RFC 3339, or a Go duration ago (10m, 2h)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m|h)", text)
    if match:
        scale = {"s": 1, "m": 60, "h": 3600}[match.group(2)]
        return time.time() - float(match.group(1)) * scale
    try:
        return float(text)
    except ValueError:
        pass
    seconds = parse_time(text)
    if not seconds:
        raise BadParameter(f"invalid filter 'until': {text!r} is not a time or duration")
    return seconds


async def select(backend: Backend, filters: dict[str, list[str]]) -> list[dict[str, Any]]:
    """GET /images/json: every image (of namespace moby) the filters keep."""
    infos = await list_all(backend)
    bounds: dict[str, float] = {}
    for key in ("before", "since"):
        for ref in filters.get(key, []):
            info = await find(backend, ref, with_config=True)
            bounds[key] = created_of(info, config_of(info))
    dangling = filters.get("dangling", [])
    if any(v not in ("true", "false", "1", "0") for v in dangling):
        raise BadParameter(f"invalid filter 'dangling={dangling[0]}'")
    out = []
    for info in infos:
        config = config_of(info)
        created = created_of(info, config)
        if dangling and (not info.repo_tags) != (dangling[0] in ("true", "1")):
            continue
        if "label" in filters and not label_match(labels_of(config), filters["label"]):
            continue
        if "before" in bounds and created >= bounds["before"]:
            continue
        if "since" in bounds and created <= bounds["since"]:
            continue
        names = None
        if filters.get("reference"):
            names = matching_names(info, filters["reference"])
            if names is None:
                continue
        out.append(summary(info, names))
    out.sort(key=lambda s: s["Created"], reverse=True)
    return out


# -- inspect and history -----------------------------------------------------------------

_CONFIG_DEFAULTS: dict[str, Any] = {
    "Hostname": "", "Domainname": "", "User": "", "AttachStdin": False, "AttachStdout": False,
    "AttachStderr": False, "Tty": False, "OpenStdin": False, "StdinOnce": False, "Env": None,
    "Cmd": None, "Image": "", "Volumes": None, "WorkingDir": "", "Entrypoint": None,
    "OnBuild": None, "Labels": None,
}


def container_config(config: dict[str, Any]) -> dict[str, Any]:
    """The image config's `config`, in the shape Docker's inspect gives it."""
    inner = config.get("config")
    return {**_CONFIG_DEFAULTS, **(inner if isinstance(inner, dict) else {})}


def inspect(info: ImageInfo) -> dict[str, Any]:
    config = config_of(info)
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    body: dict[str, Any] = {
        "Id": info.id, "RepoTags": repo_tags(info), "RepoDigests": repo_digests(info),
        "Parent": "", "Comment": str(config.get("comment", "")),
        "Created": config.get("created") or rfc3339(info.created),
        "Container": str(config.get("container", "")),
        "ContainerConfig": container_config({"config": config.get("container_config")}),
        "DockerVersion": str(config.get("docker_version", "")),
        "Author": str(config.get("author", "")), "Config": container_config(config),
        "Architecture": str(config.get("architecture", "")), "Os": str(config.get("os", "")),
        "Size": info.size, "VirtualSize": info.size,
        "GraphDriver": {"Name": "overlayfs", "Data": None},
        "RootFS": {"Type": "layers",
                   "Layers": diff_ids if isinstance(diff_ids, list) else
                   [layer.diff_id for layer in info.layers]},
        "Metadata": {"LastTagTime": ZERO_TIME},
    }
    if config.get("variant"):
        body["Variant"] = str(config["variant"])
    return body


def history(info: ImageInfo) -> list[dict[str, Any]]:
    """GET /images/{name}/history, newest first. A layer's size is its stored (compressed)
    size; steps before the top one show `<missing>`, as for any pulled image."""
    config = config_of(info)
    steps = config.get("history")
    if not isinstance(steps, list) or not steps:
        steps = [{"created": config.get("created", "")} for _ in info.layers] or [{}]
    layers = list(info.layers)
    out = []
    for step in steps:
        step = step if isinstance(step, dict) else {}
        size = 0
        if not step.get("empty_layer") and layers:
            size = layers.pop(0).size
        out.append({"Id": "<missing>", "Created": int(parse_time(step.get("created"))),
                    "CreatedBy": str(step.get("created_by", "")), "Tags": None,
                    "Size": size, "Comment": str(step.get("comment", ""))})
    out.reverse()
    out[0]["Id"] = info.id
    out[0]["Tags"] = repo_tags(info) or None
    return out
