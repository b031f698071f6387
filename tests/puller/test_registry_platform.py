"""Platform parsing, the host's platform, and choosing a manifest from an index."""

from __future__ import annotations

import platform as stdlib_platform
from typing import Any

import pytest
from shoal_common.errors import Invalid, NotFound
from shoal_puller.registry.platform import Platform, select_manifest


@pytest.mark.parametrize(("machine", "expected"), [
    ("x86_64", Platform("linux", "amd64")),
    ("aarch64", Platform("linux", "arm64", "v8")),
    ("armv7l", Platform("linux", "arm", "v7")),
    ("riscv64", Platform("linux", "riscv64")),
])
def test_host(monkeypatch: pytest.MonkeyPatch, machine: str, expected: Platform) -> None:
    monkeypatch.setattr(stdlib_platform, "machine", lambda: machine)
    assert Platform.host() == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("linux/arm64/v8", Platform("linux", "arm64", "v8")),
    ("linux/amd64", Platform("linux", "amd64")),
    ("linux/aarch64", Platform("linux", "arm64", "v8")),
    ("Linux/ARM/v6", Platform("linux", "arm", "v6")),
])
def test_parse(text: str, expected: Platform) -> None:
    assert Platform.parse(text) == expected


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "linux/amd64/v8/x", ""])
def test_parse_invalid(text: str) -> None:
    with pytest.raises(Invalid, match="os/architecture"):
        Platform.parse(text)


def _desc(name: str, **platform: str) -> dict[str, Any]:
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": f"sha256:{name}", "size": 1, "platform": platform}


INDEX = {"manifests": [
    _desc("amd64", os="linux", architecture="amd64"),
    _desc("arm64", os="linux", architecture="arm64", variant="v8"),
    _desc("armv6", os="linux", architecture="arm", variant="v6"),
    _desc("armv7", os="linux", architecture="arm", variant="v7"),
    _desc("attestation", os="unknown", architecture="unknown"),
    {"mediaType": "x", "digest": "sha256:noplatform", "size": 1},
]}


@pytest.mark.parametrize(("want", "digest"), [
    ("linux/amd64", "amd64"),
    ("linux/arm64/v8", "arm64"),
    ("linux/arm64", "arm64"),  # no variant asked: arm64 means v8
    ("linux/arm/v7", "armv7"),
    ("linux/arm", "armv7"),  # arm alone means v7
    ("linux/arm/v8", "armv7"),  # an arm v8 CPU runs v7 images, the best available
    ("linux/arm/v6", "armv6"),
])
def test_select(want: str, digest: str) -> None:
    assert select_manifest(INDEX, Platform.parse(want))["digest"] == f"sha256:{digest}"


def test_select_arm64_without_variant_in_index() -> None:
    index = {"manifests": [_desc("a", os="linux", architecture="arm64")]}
    assert select_manifest(index, Platform("linux", "arm64", "v8"))["digest"] == "sha256:a"


def test_select_amd64_variant_fallback() -> None:
    index = {"manifests": [_desc("v1", os="linux", architecture="amd64"),
                           _desc("v3", os="linux", architecture="amd64", variant="v3")]}
    assert select_manifest(index, Platform.parse("linux/amd64/v3"))["digest"] == "sha256:v3"
    assert select_manifest(index, Platform.parse("linux/amd64/v2"))["digest"] == "sha256:v1"
    assert select_manifest(index, Platform.parse("linux/amd64"))["digest"] == "sha256:v1"


def test_select_no_match_lists_platforms() -> None:
    with pytest.raises(NotFound) as info:
        select_manifest(INDEX, Platform.parse("linux/riscv64"), source="docker.io/x/y:1")
    message = info.value.message
    assert message.startswith("docker.io/x/y:1: no image for platform linux/riscv64")
    assert "linux/amd64, linux/arm64/v8, linux/arm/v6, linux/arm/v7" in message
    assert "unknown" not in message
    with pytest.raises(NotFound, match="arm/v5"):
        select_manifest(INDEX, Platform.parse("linux/arm/v5"))
    with pytest.raises(NotFound, match="available: none"):
        select_manifest({"manifests": []}, Platform.parse("linux/amd64"))


def test_select_not_an_index() -> None:
    with pytest.raises(Invalid, match="not an image index"):
        select_manifest({"layers": []}, Platform.parse("linux/amd64"))
