"""Image names the way Docker writes them: `busybox` is `docker.io/library/busybox:latest`
as the puller stores it, and is shown back as `busybox:latest`; a name with a registry
host keeps it. The puller parses every name again (its word is final); this is what the
gateway needs to answer in Docker's words before asking it anything."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shoal_docker_gateway.errors import BadParameter

HUB = "docker.io"
_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io")
_TAG_RE = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
_DIGEST_RE = re.compile(r"\Asha256:[a-f0-9]{64}\Z")
_COMPONENT_RE = re.compile(r"\A[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_HOST_RE = re.compile(
    r"\A(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?\Z")
_HEX_RE = re.compile(r"\A(?:sha256:)?[a-f0-9]{1,64}\Z")
MAX_REF = 512


@dataclass(frozen=True)
class Ref:
    repository: str  # canonical: host/path
    tag: str = ""
    digest: str = ""

    def __str__(self) -> str:
        """The canonical name, as the puller stores it."""
        return self.repository + (f":{self.tag}" if self.tag else "") + \
            (f"@{self.digest}" if self.digest else "")

    @property
    def familiar(self) -> str:
        return familiar(str(self))


def looks_like_id(text: str) -> bool:
    """`sha256:<hex>` or bare hex: what Docker tries as an image id (prefix)."""
    return bool(_HEX_RE.match(text))


def parse(text: str, what: str = "image reference", default_tag: bool = True) -> Ref:
    """A Docker-style reference, normalised; BadParameter naming `what` when it is not one."""
    if not text or len(text) > MAX_REF or any(c.isspace() or ord(c) < 32 for c in text):
        raise BadParameter(f"invalid reference format: {what} {text[:100]!r}")
    name, _, digest = text.partition("@")
    if digest and not _DIGEST_RE.match(digest):
        raise BadParameter(f"invalid reference format: {what} {text!r} (bad digest)")
    tag = ""
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG_RE.match(tag):
            raise BadParameter(f"invalid reference format: {what} {text!r} (bad tag {tag!r})")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host, path = first, rest
        if not _HOST_RE.match(host):
            raise BadParameter(f"invalid reference format: {what} {text!r} (bad host)")
    else:
        host, path = HUB, name
    if host in _HUB_ALIASES:
        host = HUB
    if host == HUB and "/" not in path:
        path = f"library/{path}"
    if not path or any(not _COMPONENT_RE.match(c) for c in path.split("/")):
        lower = "" if path == path.lower() else ": repository name must be lowercase"
        raise BadParameter(f"invalid reference format{lower}: {what} {text!r}")
    if not tag and not digest and default_tag:
        tag = "latest"
    return Ref(f"{host}/{path}", tag, digest)


def familiar(name: str) -> str:
    """`docker.io/library/busybox:1` -> `busybox:1`; `docker.io/u/x` -> `u/x`."""
    if name.startswith(f"{HUB}/library/"):
        rest = name[len(HUB) + 9:]
        if "/" not in rest.split("@", 1)[0]:
            return rest
    return name.removeprefix(f"{HUB}/")


def split_name(name: str) -> tuple[str, str, str]:
    """(repository, tag, digest) of a stored name (canonical)."""
    repo, _, digest = name.partition("@")
    slash, colon = repo.rfind("/"), repo.rfind(":")
    tag = ""
    if colon > slash:
        repo, tag = repo[:colon], repo[colon + 1:]
    return repo, tag, digest


def is_tag(text: str) -> bool:
    return bool(_TAG_RE.match(text))
