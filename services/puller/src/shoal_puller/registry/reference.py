"""Image references, normalised the way kubelet and containerd do.

`busybox` means `docker.io/library/busybox:latest`; the rules are those of
docker/distribution's ParseNormalizedNamed (first path component is a registry only when it
looks like a host), with a default `latest` tag when neither tag nor digest is given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shoal_common.errors import Invalid

DOCKER_HUB = "docker.io"
# Names the Hub is also known by; references using them mean the same images.
_HUB_ALIASES = frozenset({"index.docker.io", "registry-1.docker.io"})
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255  # domain/path, as in distribution

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]{{1,5}})?$")
_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
# Only algorithms we can verify; the hex length is fixed by the algorithm.
DIGEST_HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}
_DIGEST_RE = re.compile(r"^(sha256|sha384|sha512):([a-f0-9]+)$")
_IMAGE_ID_RE = re.compile(r"^[a-f0-9]{64}$")


def is_digest(text: str) -> bool:
    """True for `sha256:<64 lowercase hex>` (and sha384/sha512 with their lengths)."""
    match = _DIGEST_RE.match(text)
    return match is not None and len(match.group(2)) == DIGEST_HEX_LENGTH[match.group(1)]


def is_tag(text: str) -> bool:
    return bool(_TAG_RE.match(text))


@dataclass(frozen=True)
class Reference:
    """A normalised reference: `domain/path[:tag][@digest]`; at least one of tag/digest."""

    domain: str
    path: str
    tag: str | None
    digest: str | None

    @property
    def repository(self) -> str:
        return f"{self.domain}/{self.path}"

    @property
    def object(self) -> str:
        """What to ask the registry's manifests endpoint for: the digest wins over a tag."""
        obj = self.digest or self.tag
        assert obj is not None, "parse_reference always sets a tag or a digest"
        return obj

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.domain, self.path, self.tag, digest)

    def __str__(self) -> str:
        text = self.repository
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    # A first component is a registry only if it cannot be a Hub user: it has a dot or a
    # port, or is localhost. (distribution also treats an uppercase one as a host; we
    # refuse it instead, with the lowercase message below.)
    if sep and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, rest
    else:
        domain, path = DOCKER_HUB, name
    if domain in _HUB_ALIASES:
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return domain, path


def parse_reference(text: str) -> Reference:
    """Parse and normalise an image reference; raise Invalid saying what is wrong."""
    _check_text(text)
    name, at, digest = text.partition("@")
    if at:
        _check_digest(text, digest)
    name, tag = _split_tag(text, name)
    domain, path = _split_domain(name)
    _check_name(text, domain, path)
    if tag is None and not at:
        tag = DEFAULT_TAG
    return Reference(domain=domain, path=path, tag=tag, digest=digest or None)


# The checks in the order parse_reference applies them: the first problem is the one named.

def _invalid(text: str, why: str) -> Invalid:
    return Invalid(f"invalid image reference {text!r}: {why}")


def _check_text(text: str) -> None:
    if not text:
        raise _invalid(text, "empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise _invalid(text, "contains whitespace")
    if _IMAGE_ID_RE.match(text):
        # An image id, not a name; kubelet hands those to the runtime only for local images.
        raise _invalid(text, "a 64-character hex string is an image id, not a repository name")


def _check_digest(text: str, digest: str) -> None:
    if not digest:
        raise _invalid(text, "empty digest after '@'")
    if not is_digest(digest):
        raise _invalid(text, f"digest {digest!r} is not sha256:<64 hex> (or sha384/sha512)")


def _split_tag(text: str, name: str) -> tuple[str, str | None]:
    """`name` (the reference before any '@') as (repository name, tag or None)."""
    tag: str | None = None
    # A ':' after the last '/' starts the tag; one before it is a registry port.
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG_RE.match(tag):
            raise _invalid(text, f"tag {tag!r} must be 1-128 of [A-Za-z0-9_.-], not starting "
                           "with '.' or '-'")
    if not name:
        raise _invalid(text, "no repository name")
    return name, tag


def _check_name(text: str, domain: str, path: str) -> None:
    if not _DOMAIN_RE.match(domain):
        raise _invalid(text, f"registry host {domain!r} is not a valid host[:port]")
    if not path:
        raise _invalid(text, "no repository path after the registry host")
    if path != path.lower():
        raise _invalid(text, "repository name must be lowercase")
    for component in path.split("/"):
        if not component:
            raise _invalid(text, "empty path component (doubled or trailing '/')")
        if not _PATH_COMPONENT_RE.match(component):
            raise _invalid(text, f"path component {component!r} must be lowercase letters and "
                           "digits separated by '.', '_', '__' or '-'")
    if len(domain) + 1 + len(path) > MAX_NAME_LENGTH:
        raise _invalid(text, f"repository name longer than {MAX_NAME_LENGTH} characters")
