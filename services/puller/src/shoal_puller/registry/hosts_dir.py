"""containerd's registry host configuration: `services.puller.config_path`, a directory
holding per registry `<host>/hosts.toml` (or Docker's certificate files), read as
containerd reads it (its docs/hosts.md), except that a malformed file is refused, naming
the file and the key, where containerd logs it and falls back to the certificate files.

Directories, first found wins: `<host>_<port>_`, then `<host>:<port>` (or `<host>` for a
registry without a port), then `_default`. In one: `hosts.toml`, or when there is none (or
an empty one) Docker's pattern: `*.crt` CAs, `*.cert` client certificates with the `*.key`
of the same name. The tree, and its re-reading, is hosts_tree.py's; how the endpoints are
then tried is endpoints.py's.
"""

from __future__ import annotations

import os
import posixpath
import re
import ssl
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog
import yarl

log = structlog.get_logger("shoal.puller.registry")

HOSTS_FILE = "hosts.toml"
DEFAULT_DIR = "_default"
CAPABILITIES = ("pull", "resolve", "push")
ALL_CAPABILITIES = frozenset(CAPABILITIES)

_ENTRY_KEYS = frozenset({"capabilities", "ca", "client", "skip_verify", "header",
                         "override_path", "dial_timeout"})
_ROOT_KEYS = _ENTRY_KEYS | {"server", "host"}
# Keys of newer containerd releases that Shoal does not do: refused by name, not ignored.
_UNSUPPORTED = {"proxy": "not supported by Shoal (the puller connects to registries "
                         "directly); remove it or route with the network instead"}
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_DURATION_PART = r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)"
_DURATION_RE = re.compile(rf"^(?:{_DURATION_PART})+$")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
                 "m": 60.0, "h": 3600.0}


class HostsError(Exception):
    """A host directory that cannot be used; the message names the file and the key."""

    def __init__(self, file: Path | str, key: str, why: str) -> None:
        self.file = Path(file)
        self.key = key
        self.why = why
        super().__init__(f"{file}: {key}: {why}" if key else f"{file}: {why}")


@dataclass(frozen=True)
class HostEntry:
    """One endpoint of a host directory: a `[host."URL"]` table, or the server (the
    file's top level)."""

    table: str  # its keys' prefix in messages: 'host."https://m"', or "" for the top level
    url: yarl.URL | None  # the API root, e.g. https://m/v2; None: the registry itself
    name: str  # as written, scheme added: "https://m/prefix" ("" for the registry itself)
    capabilities: frozenset[str]
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str], ...] = ()  # (certificate, key); key "": in the certificate
    skip_verify: bool | None = None
    headers: tuple[tuple[str, str], ...] = ()
    dial_timeout: float | None = None
    tls: ssl.SSLContext | None = field(default=None, compare=False)  # made by with_tls()

    @property
    def explicit_tls(self) -> bool:
        """containerd's test: any of ca, client, skip_verify set (even skip_verify = false)."""
        return bool(self.ca or self.client) or self.skip_verify is not None


@dataclass(frozen=True)
class HostDir:
    directory: Path
    source: Path  # its hosts.toml, or the directory itself when its certificate files count
    entries: tuple[HostEntry, ...]  # the [host] tables in file order, then the server
    files: tuple[str, ...]  # every file it reads, to notice a change

    @property
    def is_default(self) -> bool:
        return self.directory.name == DEFAULT_DIR


# --------------------------------------------------------------------------- parsing


def parse_host_dir(directory: Path) -> HostDir:
    """Read one host directory (no TLS contexts made: with_tls does that)."""
    path = directory / HOSTS_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    except OSError as exc:
        raise HostsError(path, "", f"cannot read it: {exc.strerror or exc}") from None
    if not data:
        return _cert_files(directory)
    try:
        doc = tomllib.loads(data.decode())
    except UnicodeDecodeError as exc:
        raise HostsError(path, "", f"not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise HostsError(path, "", f"not valid TOML: {exc}") from None
    return _parse_doc(directory, path, doc)


def _parse_doc(directory: Path, path: Path, doc: dict[str, Any]) -> HostDir:
    _check_keys(path, "", doc, _ROOT_KEYS)
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise HostsError(path, "host", 'must be tables: [host."https://mirror.example"]')
    entries: list[HostEntry] = []
    for name, table in hosts.items():
        prefix = f'host."{name}"'
        if not isinstance(table, dict):
            raise HostsError(path, prefix, f"must be a table, not {_kind(table)}")
        _check_keys(path, prefix, table, _ENTRY_KEYS)
        entries.append(_entry(path, prefix, name, prefix, table))
    server = doc.get("server")
    if server is None:
        root = _entry(path, "", None, "", doc)
        if "capabilities" in doc:
            # containerd gives the default server every capability whatever this says.
            log.warning("hosts.toml: top-level capabilities without server are ignored, as "
                        "containerd ignores them", file=str(path))
        root = replace(root, capabilities=ALL_CAPABILITIES)
    else:
        root = _entry(path, "", server, "server", doc)
    entries.append(root)
    used = {f for e in entries for f in (*e.ca, *(p for pair in e.client for p in pair)) if f}
    return HostDir(directory, path, tuple(entries), tuple(sorted(used | {str(path)})))


def _cert_files(directory: Path) -> HostDir:
    """Docker's layout: `*.crt` trusted CAs, `*.cert` client certificates (with `*.key`)."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise HostsError(directory, "", f"cannot list it: {exc.strerror or exc}") from None
    ca: list[str] = []
    client: list[tuple[str, str]] = []
    for name in names:
        full = directory / name
        if not full.is_file():
            continue
        if name.endswith(".crt"):
            ca.append(str(full))
        elif name.endswith(".cert"):
            key = directory / f"{name.removesuffix('.cert')}.key"
            client.append((str(full), str(key) if key.is_file() else ""))
    entry = HostEntry("", None, "", ALL_CAPABILITIES, tuple(ca), tuple(client))
    files = tuple(sorted({*ca, *(p for pair in client for p in pair if p)}))
    return HostDir(directory, directory, (entry,), files)


def _entry(path: Path, prefix: str, url_text: Any, url_key: str,
           table: dict[str, Any]) -> HostEntry:
    override = _bool(path, _key(prefix, "override_path"), table.get("override_path", False))
    url, name = (None, "") if url_text is None else _url(path, url_key, url_text, override)
    skip = table.get("skip_verify")
    return HostEntry(
        table=prefix, url=url, name=name,
        capabilities=_capabilities(path, _key(prefix, "capabilities"),
                                   table.get("capabilities")),
        ca=_ca(path, _key(prefix, "ca"), table.get("ca")),
        client=_client(path, _key(prefix, "client"), table.get("client")),
        skip_verify=None if skip is None else _bool(path, _key(prefix, "skip_verify"), skip),
        headers=_headers(path, _key(prefix, "header"), table.get("header")),
        dial_timeout=_duration(path, _key(prefix, "dial_timeout"), table.get("dial_timeout")))


def _check_keys(path: Path, prefix: str, table: dict[str, Any], allowed: frozenset[str]) -> None:
    for name in table:
        if name in allowed:
            continue
        key = _key(prefix, name)
        if name in _UNSUPPORTED:
            raise HostsError(path, key, _UNSUPPORTED[name])
        if prefix and name in ("server", "host"):
            raise HostsError(path, key, f"{name} belongs at the top level of the file (hosts "
                             "do not nest, in containerd either)")
        raise HostsError(path, key, f"unknown key (hosts.toml keys: "
                         f"{', '.join(sorted(allowed))})")


def _url(path: Path, key: str, raw: Any, override_path: bool) -> tuple[yarl.URL, str]:
    """The API root of `raw` ("https://" added when it has no scheme, as containerd does) and
    its display name; "/v2" appended to the path unless it ends so or override_path."""
    if not isinstance(raw, str) or not raw:
        raise HostsError(path, key, f"must be a URL such as \"https://mirror.example\", "
                         f"not {_kind(raw)}")
    text = raw if "://" in raw else f"https://{raw}"
    try:
        url = yarl.URL(text)
        port = url.explicit_port
    except ValueError as exc:
        raise HostsError(path, key, f"{raw!r} is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise HostsError(path, key, f"{raw!r} is not an http:// or https:// URL with a host")
    if url.user is not None or url.password is not None or url.query_string or url.fragment:
        raise HostsError(path, key, f"{raw!r}: a host URL has no credentials, query or "
                         "fragment")
    if port is not None and not 0 < port < 65536:
        raise HostsError(path, key, f"{raw!r}: port {port} is out of range")
    clean = posixpath.normpath(url.path).rstrip("/") if url.path not in ("", "/") else ""
    api = clean if override_path or clean.endswith("/v2") else f"{clean}/v2"
    origin = url.with_path("").with_query(None)
    return origin.with_path(api or "/"), f"{str(origin).rstrip('/')}{clean}"


def _capabilities(path: Path, key: str, value: Any) -> frozenset[str]:
    if value is None:
        return ALL_CAPABILITIES
    if not isinstance(value, list):
        raise HostsError(path, key, f'must be a list such as ["pull", "resolve"], not '
                         f"{_kind(value)}")
    out: set[str] = set()
    for i, item in enumerate(value):
        if not isinstance(item, str) or item.lower() not in CAPABILITIES:
            raise HostsError(path, f"{key}[{i}]", f"{item!r} is not one of "
                             f"{', '.join(CAPABILITIES)}")
        out.add(item.lower())
    # As containerd: an empty list means every capability.
    return frozenset(out) or ALL_CAPABILITIES


def _file(path: Path, key: str, value: Any) -> str:
    """A file named in hosts.toml: absolute, or relative to the file's directory."""
    if not isinstance(value, str) or not value:
        raise HostsError(path, key, f"must be a file path, not {_kind(value)}")
    full = value if os.path.isabs(value) else os.path.join(path.parent, value)
    if not os.path.isfile(full):
        raise HostsError(path, key, f"{full}: no such file")
    return full


def _ca(path: Path, key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (_file(path, key, value),)
    if not isinstance(value, list):
        raise HostsError(path, key, f"must be a path or a list of paths, not {_kind(value)}")
    return tuple(_file(path, f"{key}[{i}]", item) for i, item in enumerate(value))


def _client(path: Path, key: str, value: Any) -> tuple[tuple[str, str], ...]:
    """A path (certificate and key in one file), a list of such paths, or a list of
    [certificate, key] pairs (key "" = in the certificate's file); mixed lists too."""
    if value is None:
        return ()
    if isinstance(value, str):
        return ((_file(path, key, value), ""),)
    if not isinstance(value, list):
        raise HostsError(path, key, 'must be a path, a list of paths or a list of ["cert", '
                         f'"key"] pairs, not {_kind(value)}')
    pairs: list[tuple[str, str]] = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if isinstance(item, str):
            pairs.append((_file(path, where, item), ""))
        elif isinstance(item, list) and len(item) == 2:
            cert = _file(path, f"{where}[0]", item[0])
            if not isinstance(item[1], str):
                raise HostsError(path, f"{where}[1]", f"must be a path, not {_kind(item[1])}")
            pairs.append((cert, _file(path, f"{where}[1]", item[1]) if item[1] else ""))
        else:
            raise HostsError(path, where, 'must be a path or a ["cert", "key"] pair, not '
                             f"{_kind(item)}")
    return tuple(pairs)


def _headers(path: Path, key: str, value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise HostsError(path, key, f"must be a table of header names, not {_kind(value)}")
    out: list[tuple[str, str]] = []
    for name, raw in value.items():
        where = f"{key}.{name}"
        if not _HEADER_NAME_RE.match(name):
            raise HostsError(path, where, f"{name!r} is not an HTTP header name")
        values = [raw] if isinstance(raw, str) else raw
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise HostsError(path, where, f"must be a string or a list of strings, not "
                             f"{_kind(raw)}")
        if any(c in v for v in values for c in "\r\n\0"):
            raise HostsError(path, where, "a header value may not hold CR, LF or NUL")
        if values:
            # Several values of one header are sent as one comma-separated line (RFC 9110).
            out.append((name, ", ".join(values)))
    return tuple(out)


def _duration(path: Path, key: str, value: Any) -> float | None:
    """A Go duration ("1s", "500ms", "1m30s"), as containerd parses dial_timeout."""
    if value is None:
        return None
    if not isinstance(value, str) or not _DURATION_RE.match(value):
        raise HostsError(path, key, f"{value!r} is not a duration such as \"5s\" or \"500ms\"")
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in re.findall(_DURATION_PART, value))
    if seconds <= 0:
        raise HostsError(path, key, "must be more than 0")
    return seconds


def _bool(path: Path, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise HostsError(path, key, f"must be true or false, not {_kind(value)}")
    return value


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


_KINDS = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a table"}


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    described = _KINDS.get(type(value), type(value).__name__)
    return f"{described} ({value!r})" if isinstance(value, (str, int, float)) else described


# ------------------------------------------------------------------------------- TLS


def with_tls(hd: HostDir) -> HostDir:
    """`hd` with each entry's TLS context made (files read, so bad PEM is refused here)."""
    return replace(hd, entries=tuple(replace(e, tls=_context(hd, e)) for e in hd.entries))


def _context(hd: HostDir, entry: HostEntry) -> ssl.SSLContext | None:
    if not entry.explicit_tls:
        return None

    def refuse(key: str, file: str, exc: Exception) -> HostsError:
        if hd.source == hd.directory:  # Docker's certificate files: the file is the key
            return HostsError(file, "", f"cannot load it: {exc}")
        return HostsError(hd.source, _key(entry.table, key), f"cannot load {file}: {exc}")

    # The system CAs stay trusted: ca adds to them, as in containerd.
    ctx = ssl.create_default_context()
    for i, ca in enumerate(entry.ca):
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise refuse(f"ca[{i}]", ca, exc) from None
    for i, (cert, key) in enumerate(entry.client):
        # An OpenSSL client offers one certificate: the first pair. The others are still
        # loaded into a scratch context, so a broken one is refused rather than ignored.
        target = ctx if i == 0 else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            target.load_cert_chain(cert, key or None)
        except (OSError, ssl.SSLError) as exc:
            raise refuse(f"client[{i}]", cert, exc) from None
    if entry.skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
