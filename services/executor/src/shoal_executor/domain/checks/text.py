"""What every input check shares: how a refusal names its field, and the text rules.

A refusal is `Invalid("<field>: <why>")`, the field spelled as in the CRI's own messages
(`PodSandboxConfig.dns_config.servers[0]`), so the gateway's INVALID_ARGUMENT tells the
caller exactly what to fix. A hostile value may be a megabyte of escape codes: messages show
it escaped and cut short."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from shoal_common.errors import Invalid

MAX_SHOWN = 160  # enough for a path in Shoal's roots
MAX_PATH = 4096  # PATH_MAX
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
# An RFC 1123 label; `_` also where host resolv.conf search domains may carry it.
_LABEL = re.compile(r"\A[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_LABEL_UNDERSCORE = re.compile(r"\A[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
MAX_DNS_NAME = 253
MAX_ID = 2**32 - 2  # uid/gid: (uid_t)-1 means "unchanged" to the kernel


def shown(value: str) -> str:
    """`value` for a message: quoted with escapes, at most MAX_SHOWN characters of it."""
    return repr(value[:MAX_SHOWN]) + ("..." if len(value) > MAX_SHOWN else "")


def enum_name(enum: Any, value: int) -> str:
    """A protobuf enum value's name, or the number for one the schema does not know."""
    return str(enum.Name(value)) if value in enum.values() else str(value)


def refuse(field: str, why: str) -> Invalid:
    return Invalid(f"{field}: {why}")


def check_text(field: str, value: str, max_len: int, *, spaces: bool = True) -> None:
    """No control characters (no line of a file can be injected), `spaces`: whether blanks
    are allowed, at most `max_len` characters."""
    if len(value) > max_len:
        raise refuse(field, f"longer than {max_len} characters")
    if (_CONTROL if spaces else _CONTROL_OR_SPACE).search(value):
        what = "control characters" if spaces else "whitespace or control characters"
        raise refuse(field, f"{shown(value)} contains {what}")


def check_no_nul(field: str, value: str, max_len: int = MAX_PATH) -> None:
    """What reaches execve(2), mount(2) or stat(2): a NUL would cut it (Python refuses it)."""
    if len(value) > max_len:
        raise refuse(field, f"longer than {max_len} characters")
    if "\0" in value:
        raise refuse(field, f"{shown(value)} contains a NUL character")


def check_abs_path(field: str, value: str) -> None:
    check_no_nul(field, value)
    if not value.startswith("/"):
        raise refuse(field, f"{shown(value)} is not an absolute path")


def check_id(field: str, value: int) -> None:
    if not 0 <= value <= MAX_ID:
        raise refuse(field, f"{value} is not a user or group id (0-{MAX_ID})")


def check_ip(field: str, value: str, *, scoped: bool = False) -> None:
    """An IPv4 or IPv6 address; `scoped`: an IPv6 zone (`fe80::1%eth0`) is allowed (in
    resolv.conf; iptables takes none)."""
    check_text(field, value, 64, spaces=False)
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise refuse(field, f"{shown(value)} is not an IP address") from None
    if not scoped and "%" in value:
        raise refuse(field, f"{shown(value)}: an address with a zone is not allowed here")
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None \
            and not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", addr.scope_id):
        raise refuse(field, f"{shown(value)}: the zone is not an interface name")


def check_dns_name(field: str, value: str, *, underscore: bool = False) -> None:
    """Dot-separated RFC 1123 labels, each at most 63 characters, at most 253 in all; one
    trailing dot (fully qualified) is allowed."""
    name = value[:-1] if value.endswith(".") else value
    if len(name) > MAX_DNS_NAME:
        raise refuse(field, f"longer than {MAX_DNS_NAME} characters")
    check_text(field, value, MAX_DNS_NAME + 1, spaces=False)
    if not name:
        raise refuse(field, "empty")
    label = _LABEL_UNDERSCORE if underscore else _LABEL
    for part in name.split("."):
        if not label.match(part):
            raise refuse(field, f"{shown(value)} is not a DNS name: label {shown(part)} "
                         "must be 1-63 letters, digits or '-', not starting or ending "
                         "with '-'")
