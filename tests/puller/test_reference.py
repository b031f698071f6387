"""Image reference parsing and normalisation (kubelet/containerd rules)."""

from __future__ import annotations

import pytest
from shoal_common.errors import ErrorCode, Invalid
from shoal_puller.registry.reference import Reference, is_digest, parse_reference

D = "sha256:" + "ab" * 32

VALID: list[tuple[str, str, str, str | None, str | None, str]] = [
    # text, domain, path, tag, digest, canonical
    ("busybox", "docker.io", "library/busybox", "latest", None,
     "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", None,
     "docker.io/library/busybox:1.36"),
    ("user/img", "docker.io", "user/img", "latest", None, "docker.io/user/img:latest"),
    ("user/img:v2", "docker.io", "user/img", "v2", None, "docker.io/user/img:v2"),
    (f"busybox@{D}", "docker.io", "library/busybox", None, D,
     f"docker.io/library/busybox@{D}"),
    (f"busybox:1.36@{D}", "docker.io", "library/busybox", "1.36", D,
     f"docker.io/library/busybox:1.36@{D}"),
    ("docker.io/library/busybox:latest", "docker.io", "library/busybox", "latest", None,
     "docker.io/library/busybox:latest"),
    ("docker.io/busybox", "docker.io", "library/busybox", "latest", None,
     "docker.io/library/busybox:latest"),
    ("index.docker.io/busybox", "docker.io", "library/busybox", "latest", None,
     "docker.io/library/busybox:latest"),
    ("index.docker.io/user/img:1", "docker.io", "user/img", "1", None,
     "docker.io/user/img:1"),
    ("localhost:5000/x:1", "localhost:5000", "x", "1", None, "localhost:5000/x:1"),
    ("localhost/x", "localhost", "x", "latest", None, "localhost/x:latest"),
    ("127.0.0.1:5000/a/b", "127.0.0.1:5000", "a/b", "latest", None,
     "127.0.0.1:5000/a/b:latest"),
    (f"127.0.0.1:5000/a/b@{D}", "127.0.0.1:5000", "a/b", None, D,
     f"127.0.0.1:5000/a/b@{D}"),
    ("registry.k8s.io/pause:3.9", "registry.k8s.io", "pause", "3.9", None,
     "registry.k8s.io/pause:3.9"),
    ("quay.io/org/sub/deep/img:tag_1.0-rc", "quay.io", "org/sub/deep/img", "tag_1.0-rc",
     None, "quay.io/org/sub/deep/img:tag_1.0-rc"),
    ("Example.COM/img", "Example.COM", "img", "latest", None, "Example.COM/img:latest"),
    ("[::1]:5000/img:v1", "[::1]:5000", "img", "v1", None, "[::1]:5000/img:v1"),
    ("a__b/c-d---e/f.g", "docker.io", "a__b/c-d---e/f.g", "latest", None,
     "docker.io/a__b/c-d---e/f.g:latest"),
    # "localhost:5000" without a path is the Hub image "localhost" with tag 5000.
    ("localhost:5000", "docker.io", "library/localhost", "5000", None,
     "docker.io/library/localhost:5000"),
    ("busybox:Latest_TAG", "docker.io", "library/busybox", "Latest_TAG", None,
     "docker.io/library/busybox:Latest_TAG"),
]


@pytest.mark.parametrize(("text", "domain", "path", "tag", "digest", "canonical"), VALID)
def test_parse_valid(text: str, domain: str, path: str, tag: str | None, digest: str | None,
                     canonical: str) -> None:
    ref = parse_reference(text)
    assert ref == Reference(domain, path, tag, digest)
    assert str(ref) == canonical
    assert ref.repository == f"{domain}/{path}"
    assert ref.object == (digest or tag)
    # The canonical form parses back to the same reference.
    assert parse_reference(canonical) == ref


INVALID: list[tuple[str, str]] = [
    ("", "empty"),
    ("Busybox", "must be lowercase"),
    ("docker.io/User/img", "must be lowercase"),
    ("localhost:5000/Img:1", "must be lowercase"),
    ("busybox:", "tag ''"),
    ("busybox:-bad", "tag '-bad'"),
    ("busybox:" + "t" * 129, "1-128"),
    ("busybox@sha256:abc", "is not sha256:<64 hex>"),
    ("busybox@md5:" + "a" * 32, "is not sha256"),
    (f"busybox@{D.upper()}", "is not sha256"),
    ("busybox@", "empty digest"),
    ("a//b", "empty path component"),
    ("a/b/", "empty path component"),
    ("host.io/", "no repository path"),
    ("-leading/dash", "path component '-leading'"),
    ("a/b_/c", "path component 'b_'"),
    ("a b", "whitespace"),
    (" busybox", "whitespace"),
    ("ab" * 32, "image id"),
    (":tag", "no repository name"),
    ("bad_host.io:5000/x", "registry host"),
    ("host.io:99999999/x", "registry host"),
    ("x/" + "a" * 260, "longer than 255"),
]


@pytest.mark.parametrize(("text", "why"), INVALID)
def test_parse_invalid(text: str, why: str) -> None:
    with pytest.raises(Invalid) as info:
        parse_reference(text)
    err = info.value
    assert err.code == ErrorCode.INVALID
    assert repr(text) in err.message, "the message quotes the reference"
    assert why in err.message


def test_with_digest_and_is_digest() -> None:
    ref = parse_reference("quay.io/a/b:1").with_digest(D)
    assert str(ref) == f"quay.io/a/b:1@{D}"
    assert ref.object == D
    assert is_digest(D)
    assert is_digest("sha512:" + "0" * 128)
    assert not is_digest("sha512:" + "0" * 64)
    assert not is_digest("latest")
