"""Platforms (os/architecture/variant) and choosing an image from an index by platform."""

from __future__ import annotations

import platform as _host
import re
from dataclasses import dataclass
from typing import Any

from shoal_common.errors import Invalid, NotFound

# What uname/Go/distro names mean in OCI terms: arch alias -> (arch, implied variant).
_ARCH_ALIASES: dict[str, tuple[str, str]] = {
    "x86_64": ("amd64", ""), "x86-64": ("amd64", ""), "amd64": ("amd64", ""),
    "aarch64": ("arm64", "v8"), "arm64": ("arm64", ""),
    "armhf": ("arm", "v7"), "armel": ("arm", "v6"),
    "armv7l": ("arm", "v7"), "armv7": ("arm", "v7"), "armv6l": ("arm", "v6"),
    "i386": ("386", ""), "i686": ("386", ""),
}
# The variant an image without one is built for, per architecture.
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7", "amd64": "v1"}
# A CPU of variant vN also runs images built for older variants, down to this one.
_OLDEST_VARIANT = {"arm64": 8, "arm": 5, "amd64": 1}
_PARSE_RE = re.compile(r"^([a-z0-9]+)/([a-z0-9_-]+)(?:/([a-z0-9.]+))?$")


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def host(cls) -> Platform:
        machine = _host.machine().lower()
        arch, variant = _ARCH_ALIASES.get(machine, (machine, ""))
        return cls("linux", arch, variant)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """`os/arch[/variant]`, e.g. `linux/arm64/v8`."""
        match = _PARSE_RE.match(text.strip().lower())
        if not match:
            raise Invalid(f"platform {text!r} is not os/architecture[/variant] "
                          "(e.g. linux/arm64/v8)")
        os_, arch, variant = match.group(1), match.group(2), match.group(3) or ""
        if not variant and arch in _ARCH_ALIASES:
            arch, variant = _ARCH_ALIASES[arch]
        return cls(os_, _ARCH_ALIASES.get(arch, (arch, ""))[0], variant)

    @classmethod
    def from_descriptor(cls, platform: dict[str, Any]) -> Platform:
        return cls(str(platform.get("os", "")), str(platform.get("architecture", "")),
                   str(platform.get("variant", "") or ""))

    def normalized(self) -> Platform:
        """Compare platforms in this form: aliases resolved, default variants filled in."""
        arch, implied = _ARCH_ALIASES.get(self.architecture.lower(),
                                          (self.architecture.lower(), ""))
        variant = (self.variant or implied).lower()
        if variant.isdigit():
            variant = f"v{variant}"
        if variant == "v8.0":
            variant = "v8"
        return Platform(self.os.lower(), arch, variant or _DEFAULT_VARIANT.get(arch, ""))

    def compatible_variants(self) -> list[str]:
        """Variants this platform runs, best first (arm/v7 runs v7, v6, v5)."""
        norm = self.normalized()
        match = re.fullmatch(r"v(\d+)", norm.variant)
        oldest = _OLDEST_VARIANT.get(norm.architecture)
        if not match or oldest is None:
            return [norm.variant]
        return [f"v{n}" for n in range(int(match.group(1)), oldest - 1, -1)]

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def select_manifest(index: dict[str, Any], want: Platform, *,
                    source: str = "image index") -> dict[str, Any]:
    """The descriptor in `index` (an OCI index or Docker manifest list) best matching `want`.

    Exact os/arch/variant first; then, for variant families, older variants the platform
    still runs. Entries without a platform are not candidates. NotFound lists what exists.
    """
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise Invalid(f"{source}: not an image index (no \"manifests\" list)")
    wanted = want.normalized()
    ranks = {v: i for i, v in enumerate(want.compatible_variants())}
    best: tuple[int, dict[str, Any]] | None = None
    available: list[str] = []
    for desc in manifests:
        plat = desc.get("platform") if isinstance(desc, dict) else None
        if not isinstance(plat, dict):
            continue
        have = Platform.from_descriptor(plat)
        if have.os != "unknown":  # attestation manifests are not images to list
            available.append(str(have))
        norm = have.normalized()
        if (norm.os, norm.architecture) != (wanted.os, wanted.architecture):
            continue
        rank = ranks.get(norm.variant)
        if rank is not None and (best is None or rank < best[0]):
            best = (rank, desc)
    if best is None:
        listed = ", ".join(dict.fromkeys(available)) or "none"
        raise NotFound(f"{source}: no image for platform {want} (available: {listed})")
    return best[1]
