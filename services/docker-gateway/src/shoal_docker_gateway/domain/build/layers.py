"""Layers a build makes: gzip'd tars written to the build's directory, hashed as they are
written (the digest of the blob and the diff ID of the tar inside), and the COPY/ADD
layers made straight from the context (or another image's tree) without running anything.

A COPY destination is resolved in the image's own tree (a view of its layers), symlinks
followed inside it, so the layer names the real directories (`/bin/x` lands in
`usr/bin/x` where /bin is a link): the snapshotter refuses a layer entry that runs
through a lower layer's symlink. Directories the destination needs and the image lacks
are made 0755 (owned by --chown's ids); files keep their mode and time; owners are 0:0
unless --chown. ADD unpacks a local tar (plain, gzip, bzip2 or xz, sniffed) into the
destination, keeping the archive's owners."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import posixpath
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from shoal_common.errors import ShoalError
from shoal_common.rootfs_users import read_in_root, resolve_in_root

from shoal_docker_gateway.domain.build.context import Source, member_path, walk
from shoal_docker_gateway.domain.build.errors import BuildError

DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


class _Hashing:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)

    def flush(self) -> None:
        pass


@dataclass(frozen=True)
class NewLayer:
    path: Path
    digest: str  # of the gzip'd blob
    diff_id: str  # of the tar
    size: int
    entries: int
    media_type: str = DOCKER_GZIP


class LayerWriter:
    """A PAX tar, gzip'd (no name or time in the gzip header: the same tree gives the same
    blob), written to `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "xb")
        self._compressed = _Hashing(self._file)
        self._gzip = gzip.GzipFile(filename="", mode="wb", fileobj=self._compressed,
                                   mtime=0, compresslevel=6)
        self._plain = _Hashing(self._gzip)  # type: ignore[arg-type]
        self._tar = tarfile.open(fileobj=self._plain, mode="w|",  # type: ignore[call-overload]
                                 format=tarfile.PAX_FORMAT)
        self.entries = 0
        self.written: set[str] = set()

    def add(self, info: tarfile.TarInfo, data: IO[bytes] | None = None) -> None:
        self._tar.addfile(info, data)
        self.entries += 1
        self.written.add(info.name.rstrip("/"))

    def close(self) -> NewLayer:
        self._tar.close()
        self._gzip.close()
        self._file.close()
        return NewLayer(self.path, f"sha256:{self._compressed.hash.hexdigest()}",
                        f"sha256:{self._plain.hash.hexdigest()}", self._compressed.size,
                        self.entries)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._file.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def write_layer(path: Path, fill: Callable[[LayerWriter], None]) -> NewLayer:
    """A layer of what `fill` adds (removed if it fails)."""
    writer = LayerWriter(path)
    try:
        fill(writer)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def tar_entry(name: str, st: os.stat_result, *, uid: int | None = None,
              gid: int | None = None, linkname: str = "") -> tarfile.TarInfo:
    """A layer entry for `name` with the metadata of `st` (owners overridden if given)."""
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid = st.st_uid if uid is None else uid
    info.gid = st.st_gid if gid is None else gid
    info.mtime = int(st.st_mtime)
    info.uname = info.gname = ""
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, linkname
    elif linkname:
        info.type, info.linkname = tarfile.LNKTYPE, linkname
    elif stat.S_ISREG(st.st_mode):
        info.type, info.size = tarfile.REGTYPE, st.st_size
    else:
        kinds = {stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE,
                 stat.S_IFIFO: tarfile.FIFOTYPE}
        info.type = kinds.get(stat.S_IFMT(st.st_mode), tarfile.FIFOTYPE)
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    return info


def dir_entry(name: str, uid: int, gid: int, mode: int = 0o755, mtime: int = 0
              ) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = tarfile.DIRTYPE, mode, uid, gid, mtime
    info.uname = info.gname = ""
    return info


def whiteout_entry(name: str) -> tarfile.TarInfo:
    """An OCI whiteout: `dir/.wh.<name>` hides `dir/<name>` of the layers below."""
    parent, _, base = name.rpartition("/")
    info = tarfile.TarInfo(f"{parent}/{WHITEOUT}{base}" if parent else f"{WHITEOUT}{base}")
    info.type, info.mode, info.uname, info.gname = tarfile.REGTYPE, 0o644, "", ""
    return info


def open_file(path: Path) -> IO[bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    return os.fdopen(fd, "rb")


def add_file(writer: LayerWriter, info: tarfile.TarInfo, host: Path) -> None:
    if info.type != tarfile.REGTYPE:
        writer.add(info)
        return
    with open_file(host) as fh:
        if os.fstat(fh.fileno()).st_size != info.size:
            raise BuildError(f"{host.name} changed size while it was copied")
        writer.add(info, fh)


# -- --chown -----------------------------------------------------------------------------


def _lookup(root: Path, file: str, name: str, what: str) -> int:
    text = read_in_root(str(root), file) or ""
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == name and fields[2].isdigit():
            return int(fields[2])
    raise BuildError(f"unable to convert uid/gid chown string to host mapping: can't find "
                     f"{what} with name {name}: no matching entries in {what} file")


def chown_ids(root: Path, spec: str) -> tuple[int, int]:
    """--chown=USER[:GROUP] as ids (names looked up in the image's /etc/passwd and
    /etc/group; a group left out is the user's own text, as dockerd reads it)."""
    user, _, group = spec.partition(":")
    group = group or user
    if not user:
        raise BuildError(f"invalid --chown value {spec!r}")
    try:
        uid = int(user) if user.isdigit() else _lookup(root, "/etc/passwd", user, "uid")
        gid = int(group) if group.isdigit() else _lookup(root, "/etc/group", group, "gid")
    except ShoalError as exc:
        raise BuildError(f"--chown={spec}: {exc}") from None
    return uid, gid


# -- COPY and ADD ------------------------------------------------------------------------


@dataclass(frozen=True)
class CopyPlan:
    sources: list[Source]
    dest: str  # absolute, in the image
    dest_is_dir: bool  # ends with / (or several sources)
    ids: tuple[int, int]  # owners of what is copied and of directories made
    unpack_archives: bool  # ADD


def _in_image(root: Path, path: str) -> str:
    """`path` (absolute in the image) resolved in the image's tree: the layer path."""
    try:
        host = resolve_in_root(str(root), path)
    except ShoalError as exc:
        raise BuildError(str(exc)) from None
    rel = os.path.relpath(host, root)
    return "" if rel == "." else rel


def _exists(root: Path, rel: str) -> os.stat_result | None:
    try:
        return os.lstat(root / rel) if rel else os.lstat(root)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _ensure_dir(writer: LayerWriter, root: Path, rel: str, ids: tuple[int, int]) -> None:
    """Directories from the image's root down to `rel` that the image lacks."""
    parts = [p for p in rel.split("/") if p]
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        if prefix in writer.written:
            continue
        st = _exists(root, prefix)
        if st is None:
            writer.add(dir_entry(prefix, *ids))
        elif not stat.S_ISDIR(st.st_mode):
            raise BuildError(f"cannot copy to /{prefix}: it is not a directory in the image")


def _copy_tree(writer: LayerWriter, source: Path, target: str, ids: tuple[int, int]) -> None:
    links: dict[tuple[int, int], str] = {}
    for rel, st in walk(source):
        name = f"{target}/{rel}" if target else rel
        _check_name(name)
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or
                stat.S_ISLNK(st.st_mode)):
            continue
        host = source / rel
        first = ""
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            first = links.setdefault((st.st_dev, st.st_ino), name)
            first = "" if first == name else first
        link = os.readlink(host) if stat.S_ISLNK(st.st_mode) else first
        add_file(writer, tar_entry(name, st, uid=ids[0], gid=ids[1], linkname=link), host)


def _check_name(name: str) -> None:
    if name.rsplit("/", 1)[-1].startswith(WHITEOUT):
        raise BuildError(f"cannot copy {name!r}: a name starting with {WHITEOUT} means a "
                         "deletion in an image layer")


def is_archive(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*") as tar:
            return tar.next() is not None
    except (tarfile.TarError, EOFError, OSError, ValueError):
        return False


def _unpack_archive(writer: LayerWriter, archive: Path, target: str) -> None:
    """ADD of a local archive: its entries under `target`, with their own owners."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                rel = member_path(member.name)
                if not rel:
                    continue
                name = f"{target}/{rel}" if target else rel
                _check_name(name)
                member.name = name
                member.uname = member.gname = ""
                if member.islnk():
                    link = member_path(member.linkname)
                    member.linkname = f"{target}/{link}" if target else link
                member.pax_headers = {}
                data = tar.extractfile(member) if member.isreg() else None
                writer.add(member, data)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BuildError(f"ADD failed: unpacking {archive.name}: {exc}") from None


def write_copy(writer: LayerWriter, plan: CopyPlan, root: Path) -> None:
    """The layer of a COPY/ADD onto the image whose tree is `root`."""
    ids = plan.ids
    dest_rel = _in_image(root, plan.dest)
    dest_st = _exists(root, dest_rel)
    into_dir = plan.dest_is_dir or (dest_st is not None and stat.S_ISDIR(dest_st.st_mode))
    for source in plan.sources:
        if source.is_dir or (plan.unpack_archives and is_archive(source.host)):
            _ensure_dir(writer, root, dest_rel, ids)
            if source.is_dir:
                _copy_tree(writer, source.host, dest_rel, ids)
            else:
                _unpack_archive(writer, source.host, dest_rel)
            continue
        if into_dir:
            _ensure_dir(writer, root, dest_rel, ids)
            name = posixpath.join(dest_rel, source.name) if dest_rel else source.name
        else:
            _ensure_dir(writer, root, posixpath.dirname(dest_rel), ids)
            name = dest_rel
        _check_name(name)
        st = os.lstat(source.host)
        link = os.readlink(source.host) if stat.S_ISLNK(st.st_mode) else ""
        add_file(writer, tar_entry(name, st, uid=ids[0], gid=ids[1], linkname=link),
                 source.host)


def workdir_layer(path: Path, root: Path, target: str) -> NewLayer | None:
    """The layer that makes WORKDIR `target` (None: the image has that directory)."""
    rel = _in_image(root, target)
    st = _exists(root, rel)
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise BuildError(f"cannot make WORKDIR {target}: it is not a directory in the "
                             "image")
        return None
    return write_layer(path, lambda w: _ensure_dir(w, root, rel, (0, 0)))
