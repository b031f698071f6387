"""Build small OCI / Docker schema 2 images in memory and push them to a registry.

Everything is deterministic (fixed mtimes, sorted tar entries, gzip mtime=0, canonical
JSON), so the same inputs always give the same digests. Only the stdlib is used.

Typical use::

    image = busybox_image(cmd=["sleep", "3600"])
    digest = push(registry.url, "test/busybox", "latest", image)

Hostile layers for puller/snapshotter tests are made with `LayerBuilder.raw()` (any
`TarInfo`, names kept verbatim) and `LayerBuilder(sort=False)` to control entry order.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import re
import subprocess
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple, Self

Schema = Literal["oci", "docker"]
Compression = Literal["gzip", "zstd"] | None

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

ALL_MANIFEST_TYPES: tuple[str, ...] = (
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
)

# OCI layer media types and their Docker schema 2 equivalents; others pass through as-is
# so tests can push foreign/unsupported layer types.
_DOCKER_LAYER_TYPES = {OCI_LAYER_TAR: DOCKER_LAYER_TAR, OCI_LAYER_GZIP: DOCKER_LAYER_GZIP}

# 2020-09-13T12:26:40Z: non-zero so tests can tell "preserved" from "unset".
DEFAULT_MTIME = 1_600_000_000
DEFAULT_CREATED = datetime.fromtimestamp(DEFAULT_MTIME, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

BUSYBOX_PATH = Path("/bin/busybox")
CATATONIT_PATH = Path("/usr/bin/catatonit")

# Applets linked in /bin of busybox_layer(). A fixed list (not `busybox --list`) keeps
# the layer identical across hosts.
BUSYBOX_APPLETS: tuple[str, ...] = tuple(
    """
    [ cat chmod chown cp cut date dd df echo env false find grep head hostname id ip kill ln
    ls mkdir mount mv nc nslookup ps pwd readlink rm rmdir sed seq sh sleep sort stat sync
    tail tee test top touch tr true umount uname wc wget whoami xargs yes
    """.split()
)

BUSYBOX_PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "app:x:1000:1000:app:/home/app:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
# `app` is also in `users` so tests can check supplementary groups from /etc/group.
BUSYBOX_GROUP = "root:x:0:\nusers:x:100:app\napp:x:1000:\nnobody:x:65534:\n"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes; digests are computed over exactly these bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class Layer:
    """One layer: `tar` is the uncompressed tar, `blob` the bytes stored in the registry
    (gzip of `tar`, or `tar` itself for uncompressed media types)."""

    tar: bytes
    blob: bytes
    media_type: str
    diff_id: str
    digest: str
    size: int

    @classmethod
    def from_tar(
        cls, tar: bytes, *, compression: Compression = "gzip", media_type: str | None = None
    ) -> Layer:
        """Wrap tar bytes. `media_type` overrides the OCI type implied by `compression`."""
        if compression == "gzip":
            blob = gzip.compress(tar, compresslevel=6, mtime=0)
            default_type = OCI_LAYER_GZIP
        elif compression == "zstd":
            import zstandard  # only needed for zstd layers

            blob = zstandard.ZstdCompressor(level=3).compress(tar)
            default_type = OCI_LAYER_TAR + "+zstd"
        elif compression is None:
            blob = tar
            default_type = OCI_LAYER_TAR
        else:
            raise ValueError(f"unsupported compression {compression!r}")
        return cls(
            tar=tar,
            blob=blob,
            media_type=media_type or default_type,
            diff_id=sha256_digest(tar),
            digest=sha256_digest(blob),
            size=len(blob),
        )

    @property
    def compressed(self) -> bytes:
        return self.blob

    def descriptor(self, schema: Schema = "oci") -> dict[str, Any]:
        media_type = self.media_type
        if schema == "docker":
            media_type = _DOCKER_LAYER_TYPES.get(media_type, media_type)
        return {"mediaType": media_type, "digest": self.digest, "size": self.size}

    def members(self) -> list[tarfile.TarInfo]:
        with tarfile.open(fileobj=io.BytesIO(self.tar), mode="r:") as tf:
            return tf.getmembers()

    def names(self) -> list[str]:
        return [m.name for m in self.members()]


def _norm(name: str) -> str:
    # Convenience methods take "/bin/sh"-style paths; layers conventionally store them
    # relative. Use LayerBuilder.raw() to keep an absolute name.
    name = name.lstrip("/")
    while name.startswith("./"):
        name = name[2:]
    return name


class LayerBuilder:
    """Collects tar entries and renders them into a deterministic `Layer`.

    Entries are sorted by name when rendered (stable, so same-name entries keep their
    order); pass `sort=False` to keep insertion order, e.g. for hostile orderings.
    """

    def __init__(self, *, mtime: int = DEFAULT_MTIME, sort: bool = True) -> None:
        self.mtime = mtime
        self.sort = sort
        self._entries: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def _add(
        self,
        name: str,
        type_: bytes,
        *,
        mode: int,
        uid: int,
        gid: int,
        mtime: int | None = None,
        xattrs: Mapping[str, str] | None = None,
        data: bytes | None = None,
        linkname: str = "",
        device: tuple[int, int] = (0, 0),
    ) -> Self:
        """One entry of `type_`; `data` for a regular file, `linkname` for a link,
        `device` (major, minor) for a device."""
        info = tarfile.TarInfo(_norm(name))
        info.type = type_
        info.mode = mode
        info.uid = uid
        info.gid = gid
        info.uname = info.gname = ""
        info.mtime = self.mtime if mtime is None else mtime
        if xattrs:
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        if data is not None:
            info.size = len(data)
        info.linkname = linkname
        info.devmajor, info.devminor = device
        self._entries.append((info, data))
        return self

    def file(
        self,
        name: str,
        content: bytes | str = b"",
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime: int | None = None,
        xattrs: Mapping[str, str] | None = None,
    ) -> Self:
        data = content.encode() if isinstance(content, str) else content
        return self._add(name, tarfile.REGTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime,
                         xattrs=xattrs, data=data)

    def host_file(
        self, name: str, src: Path | str, *, mode: int | None = None, uid: int = 0, gid: int = 0
    ) -> Self:
        """Copy a host file's content (following symlinks); mode defaults to the host's."""
        path = Path(src)
        perm = path.stat().st_mode & 0o7777 if mode is None else mode
        return self.file(name, path.read_bytes(), mode=perm, uid=uid, gid=gid)

    def dir(
        self,
        name: str,
        *,
        mode: int = 0o755,
        uid: int = 0,
        gid: int = 0,
        mtime: int | None = None,
        xattrs: Mapping[str, str] | None = None,
    ) -> Self:
        return self._add(name, tarfile.DIRTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime,
                         xattrs=xattrs)

    def symlink(
        self, name: str, target: str, *, uid: int = 0, gid: int = 0, mtime: int | None = None
    ) -> Self:
        """`target` is stored verbatim (may be relative, absolute or escaping)."""
        return self._add(name, tarfile.SYMTYPE, mode=0o777, uid=uid, gid=gid, mtime=mtime,
                         linkname=target)

    def hardlink(
        self,
        name: str,
        target: str,
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime: int | None = None,
    ) -> Self:
        """`target` is an archive path (normalised like `name`); it must precede the link
        in the rendered order for well-formed layers."""
        return self._add(name, tarfile.LNKTYPE, mode=mode, uid=uid, gid=gid, mtime=mtime,
                         linkname=_norm(target))

    def char_device(
        self, name: str, major: int, minor: int, *, mode: int = 0o666, uid: int = 0, gid: int = 0
    ) -> Self:
        return self._add(name, tarfile.CHRTYPE, mode=mode, uid=uid, gid=gid,
                         device=(major, minor))

    def block_device(
        self, name: str, major: int, minor: int, *, mode: int = 0o660, uid: int = 0, gid: int = 0
    ) -> Self:
        return self._add(name, tarfile.BLKTYPE, mode=mode, uid=uid, gid=gid,
                         device=(major, minor))

    def fifo(self, name: str, *, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Self:
        return self._add(name, tarfile.FIFOTYPE, mode=mode, uid=uid, gid=gid)

    def whiteout(self, path: str) -> Self:
        """Delete `path` from lower layers (AUFS-style `.wh.<name>` marker)."""
        parent, _, base = _norm(path).rstrip("/").rpartition("/")
        return self.file(f"{parent}/.wh.{base}" if parent else f".wh.{base}")

    def opaque(self, directory: str) -> Self:
        """Hide all lower-layer contents of `directory` (`.wh..wh..opq` marker)."""
        d = _norm(directory).rstrip("/")
        return self.file(f"{d}/.wh..wh..opq" if d else ".wh..wh..opq")

    def raw(self, info: tarfile.TarInfo, data: bytes | None = None) -> Self:
        """Add an arbitrary entry verbatim (absolute or `../` names, odd types, custom
        `pax_headers`). For regular files with `data`, `info.size` is set to match."""
        info = copy.copy(info)
        if data is not None and info.isreg():
            info.size = len(data)
        self._entries.append((info, data))
        return self

    def tar_bytes(self) -> bytes:
        entries = self._entries
        if self.sort:
            entries = sorted(entries, key=lambda e: e[0].name)
        buf = io.BytesIO()
        # PAX so long names and xattr records work; plain entries get no extra header.
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for info, data in entries:
                tf.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()

    def build(self, *, compression: Compression = "gzip", media_type: str | None = None) -> Layer:
        return Layer.from_tar(self.tar_bytes(), compression=compression, media_type=media_type)


# ----------------------------------------------------------------- host binaries


def elf_interpreter(path: Path | str) -> str | None:
    """The PT_INTERP of an ELF file (its dynamic loader), or None if statically linked."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if ident[:4] != b"\x7fELF":
            raise ValueError(f"{path} is not an ELF file")
        is64 = ident[4] == 2
        order: Literal["little", "big"] = "little" if ident[5] == 1 else "big"

        def num(off: int, size: int) -> int:
            return int.from_bytes(ident[off : off + size], order)

        phoff, phentsize, phnum = (
            (num(32, 8), num(54, 2), num(56, 2)) if is64 else (num(28, 4), num(42, 2), num(44, 2))
        )
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            ph = f.read(phentsize)
            if int.from_bytes(ph[:4], order) != 3:  # PT_INTERP
                continue
            off, size = (
                (int.from_bytes(ph[8:16], order), int.from_bytes(ph[32:40], order))
                if is64
                else (int.from_bytes(ph[4:8], order), int.from_bytes(ph[16:20], order))
            )
            f.seek(off)
            return f.read(size).rstrip(b"\0").decode()
    return None


def shared_libraries(path: Path | str) -> list[str]:
    """Absolute paths of the libraries (and loader) `ldd` reports for a dynamic binary."""
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True).stdout
    libs: list[str] = []
    for line in out.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)", line)
        if m and m.group(1) not in libs:
            libs.append(m.group(1))
    return libs


def add_host_binary(builder: LayerBuilder, src: Path | str, dest: str) -> LayerBuilder:
    """Add host binary `src` at `dest`; if it is dynamically linked, also add its loader
    and libraries at their host paths so it runs in an otherwise empty rootfs."""
    builder.host_file(dest, src, mode=0o755)
    interp = elf_interpreter(src)
    if interp is None:
        return builder
    files = [interp, *(lib for lib in shared_libraries(src) if lib != interp)]
    dirs = sorted({str(p) for f in files for p in Path(f).parents if str(p) != "/"})
    for d in dirs:
        builder.dir(d)
    for f in files:
        builder.host_file(f, f)  # content of the resolved file, at the path ld.so looks up
    return builder


# ------------------------------------------------------------- canned layers


def busybox_layer(
    busybox: Path | str = BUSYBOX_PATH, *, compression: Compression = "gzip"
) -> Layer:
    """A minimal userland: static /bin/busybox, applet symlinks, passwd/group, /tmp."""
    b = LayerBuilder()
    for d in ("bin", "dev", "etc", "home", "proc", "sys", "usr", "usr/bin", "var"):
        b.dir(d)
    b.dir("root", mode=0o700)
    b.dir("tmp", mode=0o1777)
    b.dir("home/app", uid=1000, gid=1000)
    add_host_binary(b, busybox, "bin/busybox")
    for applet in BUSYBOX_APPLETS:
        b.symlink(f"bin/{applet}", "busybox")  # relative: valid in any extraction root
    b.symlink("usr/bin/env", "../../bin/busybox")
    b.file("etc/passwd", BUSYBOX_PASSWD)
    b.file("etc/group", BUSYBOX_GROUP)
    return b.build(compression=compression)


def pause_layer(
    catatonit: Path | str = CATATONIT_PATH, *, compression: Compression = "gzip"
) -> Layer:
    """Just /catatonit (plus its libraries if the host build is dynamic)."""
    return add_host_binary(LayerBuilder(), catatonit, "catatonit").build(compression=compression)


# ----------------------------------------------------------- images and indexes


@dataclass(frozen=True)
class Manifest:
    """What an image and an index are pushed as: a manifest, its bytes and their digest."""

    manifest: dict[str, Any]
    manifest_bytes: bytes
    digest: str  # of manifest_bytes
    media_type: str
    schema: Schema

    @staticmethod
    def encoded(manifest: dict[str, Any], annotations: Mapping[str, str] | None
                ) -> tuple[dict[str, Any], bytes, str]:
        """`manifest` with `annotations` (if any), its canonical bytes and their digest."""
        if annotations:
            manifest["annotations"] = dict(annotations)
        manifest_bytes = canonical_json(manifest)
        return manifest, manifest_bytes, sha256_digest(manifest_bytes)


@dataclass(frozen=True)
class Image(Manifest):
    """A single-platform image: config blob, layer blobs and the manifest."""

    layers: tuple[Layer, ...]
    config: dict[str, Any]
    config_bytes: bytes
    config_digest: str
    config_media_type: str

    @property
    def platform(self) -> dict[str, str]:
        p = {"architecture": self.config["architecture"], "os": self.config["os"]}
        if self.config.get("variant"):
            p["variant"] = self.config["variant"]
        return p

    def blobs(self) -> list[tuple[str, bytes]]:
        """(digest, bytes) of the config and every distinct layer blob."""
        out = {self.config_digest: self.config_bytes}
        for layer in self.layers:
            out.setdefault(layer.digest, layer.blob)
        return list(out.items())

    def descriptor(self, platform: Mapping[str, Any] | None = None) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.manifest_bytes),
        }
        if platform is not None:
            desc["platform"] = dict(platform)
        return desc


@dataclass(frozen=True)
class Index(Manifest):
    """A multi-platform OCI index or Docker manifest list over `images`."""

    images: tuple[Image, ...]


def image_from_config(
    layers: Sequence[Layer],
    config: Mapping[str, Any],
    *,
    schema: Schema = "oci",
    annotations: Mapping[str, str] | None = None,
) -> Image:
    """Wrap a config used verbatim (no rootfs/history filled in), e.g. to craft configs
    whose diff_ids do not match the layers."""
    config_bytes = canonical_json(config)
    config_media_type = OCI_CONFIG if schema == "oci" else DOCKER_CONFIG
    media_type = OCI_MANIFEST if schema == "oci" else DOCKER_MANIFEST
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": config_media_type,
            "digest": sha256_digest(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [layer.descriptor(schema) for layer in layers],
    }
    manifest, manifest_bytes, digest = Manifest.encoded(manifest, annotations)
    return Image(
        layers=tuple(layers),
        config=dict(config),
        config_bytes=config_bytes,
        config_digest=sha256_digest(config_bytes),
        config_media_type=config_media_type,
        manifest=manifest,
        manifest_bytes=manifest_bytes,
        digest=digest,
        media_type=media_type,
        schema=schema,
    )


def build_image(
    layers: Sequence[Layer],
    *,
    entrypoint: Sequence[str] | None = None,
    cmd: Sequence[str] | None = None,
    env: Mapping[str, str] | Sequence[str] | None = None,
    working_dir: str | None = None,
    user: str | None = None,
    labels: Mapping[str, str] | None = None,
    stop_signal: str | None = None,
    exposed_ports: Iterable[str | int] | None = None,
    volumes: Iterable[str] | None = None,
    architecture: str = "amd64",
    os: str = "linux",
    variant: str | None = None,
    schema: Schema = "oci",
    annotations: Mapping[str, str] | None = None,
    created: str = DEFAULT_CREATED,
) -> Image:
    """Build the image config (rootfs.diff_ids, history) and manifest for `layers`.

    `env` is a mapping or "K=V" strings; `exposed_ports` items like 80 or "53/udp".
    `schema="docker"` emits Docker schema 2 media types instead of OCI ones.
    """
    runtime: dict[str, Any] = {}
    if entrypoint is not None:
        runtime["Entrypoint"] = list(entrypoint)
    if cmd is not None:
        runtime["Cmd"] = list(cmd)
    if env is not None:
        runtime["Env"] = (
            [f"{k}={v}" for k, v in env.items()] if isinstance(env, Mapping) else list(env)
        )
    if working_dir is not None:
        runtime["WorkingDir"] = working_dir
    if user is not None:
        runtime["User"] = user
    if labels is not None:
        runtime["Labels"] = dict(labels)
    if stop_signal is not None:
        runtime["StopSignal"] = stop_signal
    if exposed_ports is not None:
        runtime["ExposedPorts"] = {
            (f"{p}/tcp" if isinstance(p, int) else p): {} for p in exposed_ports
        }
    if volumes is not None:
        runtime["Volumes"] = {v: {} for v in volumes}
    config: dict[str, Any] = {
        "architecture": architecture,
        "os": os,
        "created": created,
        "config": runtime,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [
            {"created": created, "created_by": f"shoal test support: layer {i}"}
            for i in range(len(layers))
        ],
    }
    if variant is not None:
        config["variant"] = variant
    return image_from_config(layers, config, schema=schema, annotations=annotations)


def build_index(
    images: Iterable[Image | tuple[Image, Mapping[str, Any]]],
    *,
    schema: Schema | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Index:
    """An index over images; each may carry an explicit platform dict, otherwise the
    platform comes from its config. `schema` defaults to "docker" (manifest list) when
    every child is a Docker manifest, else "oci"."""
    pairs = [(i, dict(i.platform)) if isinstance(i, Image) else (i[0], dict(i[1])) for i in images]
    if schema is None:
        schema = "docker" if pairs and all(i.schema == "docker" for i, _ in pairs) else "oci"
    media_type = OCI_INDEX if schema == "oci" else DOCKER_MANIFEST_LIST
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [img.descriptor(platform) for img, platform in pairs],
    }
    manifest, manifest_bytes, digest = Manifest.encoded(manifest, annotations)
    return Index(images=tuple(img for img, _ in pairs), manifest=manifest,
                 manifest_bytes=manifest_bytes, digest=digest, media_type=media_type,
                 schema=schema)


def busybox_image(*, compression: Compression = "gzip", **kw: Any) -> Image:
    """Busybox image; defaults Env PATH=... and Cmd ["sh"], overridable via `kw`
    (any `build_image` keyword)."""
    kw.setdefault("env", {"PATH": DEFAULT_PATH})
    kw.setdefault("cmd", ["sh"])
    return build_image([busybox_layer(compression=compression)], **kw)


def pause_image(*, compression: Compression = "gzip", **kw: Any) -> Image:
    """Pause image: catatonit as a pause process (`-P`)."""
    kw.setdefault("entrypoint", ["/catatonit", "-P"])
    return build_image([pause_layer(compression=compression)], **kw)


# ------------------------------------------------------------ registry client


class RegistryHTTPError(RuntimeError):
    """A registry request answered with an unexpected status."""

    def __init__(self, method: str, url: str, status: int, body: bytes) -> None:
        self.method = method
        self.url = url
        self.status = status
        self.body = body
        text = body.decode(errors="replace")[:2000]
        super().__init__(f"{method} {url} -> HTTP {status}: {text}")


class Response(NamedTuple):
    status: int
    headers: Mapping[str, str]
    body: bytes


class FetchedManifest(NamedTuple):
    body: bytes
    media_type: str
    digest: str | None  # Docker-Content-Digest header


# Never route loopback requests through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def request(
    method: str,
    url: str,
    *,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    allow: Iterable[int] = (),
    timeout: float = 60.0,
) -> Response:
    """One HTTP request; raises RegistryHTTPError unless 2xx or in `allow`."""
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return Response(resp.status, dict(resp.headers.items()), resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read() if exc.fp is not None else b""
        if exc.code in set(allow):
            return Response(exc.code, dict(exc.headers.items()), body)
        raise RegistryHTTPError(method, url, exc.code, body) from None


def _base(registry_url: str, repository: str) -> str:
    return f"{registry_url.rstrip('/')}/v2/{repository}"


def blob_exists(
    registry_url: str, repository: str, digest: str, *, headers: Mapping[str, str] | None = None
) -> bool:
    resp = request(
        "HEAD", f"{_base(registry_url, repository)}/blobs/{digest}", headers=headers, allow=(404,)
    )
    return resp.status == 200


def push_blob(
    registry_url: str,
    repository: str,
    digest: str,
    data: bytes,
    *,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Monolithic upload (POST to open a session, PUT the bytes), skipped if present."""
    if blob_exists(registry_url, repository, digest, headers=headers):
        return
    start = request(
        "POST", f"{_base(registry_url, repository)}/blobs/uploads/", data=b"", headers=headers
    )
    location = start.headers.get("Location")
    if not location:
        raise RegistryHTTPError(
            "POST",
            f"{repository} blob upload",
            start.status,
            b"no Location header in upload response",
        )
    # Location may be relative or absolute and usually already carries a state query.
    upload = urllib.parse.urljoin(registry_url.rstrip("/") + "/", location)
    sep = "&" if urllib.parse.urlsplit(upload).query else "?"
    put_url = f"{upload}{sep}digest={urllib.parse.quote(digest, safe='')}"
    request(
        "PUT",
        put_url,
        data=data,
        headers={**(headers or {}), "Content-Type": "application/octet-stream"},
    )


def push_manifest(
    registry_url: str,
    repository: str,
    reference: str,
    body: bytes,
    media_type: str,
    *,
    headers: Mapping[str, str] | None = None,
) -> str:
    """PUT a manifest under a tag or digest; returns the registry's digest for it."""
    resp = request(
        "PUT",
        f"{_base(registry_url, repository)}/manifests/{reference}",
        data=body,
        headers={**(headers or {}), "Content-Type": media_type},
    )
    return resp.headers.get("Docker-Content-Digest") or sha256_digest(body)


def push(
    registry_url: str,
    repository: str,
    tag: str | None,
    image: Image | Index,
    *,
    headers: Mapping[str, str] | None = None,
) -> str:
    """Push an image (blobs, then manifest) or an index (each child by digest, then the
    index) under `tag`, or by digest only when `tag` is None. Returns the top manifest
    digest. `headers` (e.g. Authorization) are sent on every request."""
    if isinstance(image, Index):
        for child in image.images:
            push(registry_url, repository, None, child, headers=headers)
    else:
        for digest, data in image.blobs():
            push_blob(registry_url, repository, digest, data, headers=headers)
    digest = push_manifest(
        registry_url,
        repository,
        tag or image.digest,
        image.manifest_bytes,
        image.media_type,
        headers=headers,
    )
    if digest != image.digest:
        raise RuntimeError(
            f"registry computed {digest} for a manifest that hashes to {image.digest}"
        )
    return digest


def fetch_manifest(
    registry_url: str,
    repository: str,
    reference: str,
    *,
    accept: Iterable[str] = ALL_MANIFEST_TYPES,
    headers: Mapping[str, str] | None = None,
) -> FetchedManifest:
    resp = request(
        "GET",
        f"{_base(registry_url, repository)}/manifests/{reference}",
        headers={**(headers or {}), "Accept": ", ".join(accept)},
    )
    ctype = resp.headers.get("Content-Type", "").split(";")[0].strip()
    return FetchedManifest(resp.body, ctype, resp.headers.get("Docker-Content-Digest"))


def fetch_blob(
    registry_url: str, repository: str, digest: str, *, headers: Mapping[str, str] | None = None
) -> bytes:
    return request("GET", f"{_base(registry_url, repository)}/blobs/{digest}", headers=headers).body


def delete_manifest(
    registry_url: str, repository: str, digest: str, *, headers: Mapping[str, str] | None = None
) -> None:
    request("DELETE", f"{_base(registry_url, repository)}/manifests/{digest}", headers=headers)
