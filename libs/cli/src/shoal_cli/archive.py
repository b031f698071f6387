"""Reading an image archive for `shoal image import`, member by member, never extracting it.

An archive is read in two passes. The first (`scan`) checks every member before reading
it: a name that is absolute or climbs out with `..`, a hard link, a device, FIFO or sparse
file, a name seen twice, a size past the end of the file are each refused, naming the
member. A symbolic link is only an alias of another file of the archive (skopeo's docker-
archive and `docker save` link each `<id>/layer.tar` to the layer's blob); one to an
absolute path, out of the archive, or to anything but a file is refused; a compressed
archive (gzip, bzip2, xz) is inflated on the fly and refused once it expands past
`max_expanded` (a bomb costs CPU time, never disk). Every file is hashed, small ones are
kept in memory (the documents: index.json, manifest.json, manifests, configs), and
`layouts.plan_import` reads the layout from them, so each digest is checked before the
puller is sent a byte. The second pass (`stream_members`) reads the large blobs that must
be sent. The puller checks everything again: it trusts no client.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import lzma
import posixpath
import tarfile
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

MAX_MEMBERS = 100_000
MAX_NAME = 4096
KEEP_ONE = 8 << 20  # a member this small is kept in memory...
KEEP_ALL = 256 << 20  # ...while all kept members stay under this
# A compressed archive may expand to this many times its size, or to EXPAND_FLOOR,
# whichever is more: an image's layers are compressed already, so a real archive expands
# little (an uncompressed `docker save`, 2-4 times); a bomb expands a thousandfold.
EXPAND_RATIO = 200
EXPAND_FLOOR = 1 << 30
READ = 1 << 20
HEAD = 8  # bytes of each member kept to sniff a layer's compression

_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class ArchiveError(Exception):
    """The archive is refused; the message says why, naming the member."""


@dataclass
class Member:
    name: str  # normalised: no "./", no trailing "/"
    size: int
    digest: str  # sha256 of its bytes
    head: bytes  # its first HEAD bytes
    data: bytes | None  # all of it, when small enough to keep


@dataclass
class Contents:
    path: Path
    members: dict[str, Member]
    compression: str  # "" for a plain tar


class _Bounded(io.RawIOBase):
    """Reads `inner`, refusing to give more than `limit` bytes in all."""

    def __init__(self, inner: BinaryIO, limit: int, what: str) -> None:
        super().__init__()
        self.inner, self.limit, self.what, self.total = inner, limit, what, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.inner.read(len(buffer))
        self.total += len(data)
        if self.total > self.limit:
            raise ArchiveError(f"the {self.what} archive expands past {self.limit} bytes: "
                               "refused as a decompression bomb")
        buffer[:len(data)] = data
        return len(data)


@contextlib.contextmanager
def _tar_stream(path: Path, max_expanded: int | None
                ) -> Iterator[tuple[BinaryIO, str, int, Callable[[], int]]]:
    """(the tar's bytes, the compression or "", the bytes the tar may have, a function
    reading the stream to its end and giving its length)."""
    try:
        fh = open(path, "rb")  # closed below, after the wrapper
    except OSError as exc:
        raise ArchiveError(f"cannot read {path}: {exc.strerror}") from None
    with fh:
        size = path.stat().st_size
        head = fh.read(8)
        fh.seek(0)
        if head.startswith(_ZSTD_MAGIC):
            raise ArchiveError(f"{path} is zstd-compressed: decompress it first "
                               "(zstd -d), or use gzip")
        kind = next((k for magic, k in _COMPRESSED if head.startswith(magic)), "")
        if not kind:
            yield fh, "", size, lambda: size
            return
        limit = max_expanded if max_expanded is not None else max(
            EXPAND_FLOOR, EXPAND_RATIO * size)
        inner: BinaryIO = (cast(BinaryIO, gzip.GzipFile(fileobj=fh, mode="rb"))
                           if kind == "gzip" else
                           cast(BinaryIO, bz2.BZ2File(fh)) if kind == "bzip2" else
                           cast(BinaryIO, lzma.LZMAFile(fh)))
        bounded = _Bounded(inner, limit, kind)
        stream = cast(BinaryIO, io.BufferedReader(bounded, READ))

        def length() -> int:
            while stream.read(READ):
                pass
            return bounded.total

        yield stream, kind, limit, length


def member_name(raw: str) -> str:
    """The normalised name of a member, or ArchiveError if it is one no archive of images
    has (absolute, climbing out, control characters)."""
    if not raw or len(raw) > MAX_NAME or any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise ArchiveError(f"archive member {raw[:200]!r}: empty, over {MAX_NAME} "
                           "characters, or with control characters in its name")
    if raw.startswith("/"):
        raise ArchiveError(f"archive member {raw!r} has an absolute name")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"archive member {raw!r} climbs out of the archive (\"..\")")
    return "/".join(parts)


def _kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return f"a symbolic link (to {info.linkname!r})"
    if info.islnk():
        return f"a hard link (to {info.linkname!r})"
    if info.ischr() or info.isblk():
        return "a device"
    if info.isfifo():
        return "a FIFO"
    if info.issparse():
        return "a sparse file"
    return f"of tar type {info.type!r}"


def _check(info: tarfile.TarInfo, seen: set[str], plain_size: int | None,
           limit: int) -> str:
    name = member_name(info.name)
    if name in seen:
        raise ArchiveError(f"archive member {info.name!r} appears twice (a reader would "
                           "take one copy, another reader the other)")
    seen.add(name)
    if info.isdir() or info.issym():
        return name
    if not info.isfile() or info.issparse():
        raise ArchiveError(f"archive member {info.name!r} is {_kind(info)}: an image "
                           "archive holds only files and directories")
    end = info.offset_data + info.size
    if plain_size is not None and end > plain_size:
        raise ArchiveError(f"archive member {info.name!r} says it is {info.size} bytes, "
                           f"but the archive ends {plain_size - info.offset_data} bytes after "
                           "its start (truncated, or a forged size)")
    if end > limit:
        raise ArchiveError(f"archive member {info.name!r} says it is {info.size} bytes: the "
                           f"archive would expand past {limit} bytes, refused as a "
                           "decompression bomb")
    return name


def _link_target(info: tarfile.TarInfo, name: str) -> str:
    """The archive path a symbolic link member names, or ArchiveError if it leaves it."""
    if info.linkname.startswith("/"):
        raise ArchiveError(f"archive member {info.name!r} is a symbolic link to the absolute "
                           f"path {info.linkname!r}: only links within the archive are read")
    target = posixpath.normpath(posixpath.join(posixpath.dirname(name), info.linkname))
    if target == ".." or target.startswith("../"):
        raise ArchiveError(f"archive member {info.name!r} is a symbolic link to "
                           f"{info.linkname!r}, which climbs out of the archive")
    return target


def _resolve_links(members: dict[str, Member], links: dict[str, str]) -> None:
    """Each link becomes another name of the file it leads to (through at most 8 links)."""
    for name, target in links.items():
        for _ in range(8):
            if target not in links:
                break
            target = links[target]
        if target not in members:
            raise ArchiveError(f"archive member {name!r} is a symbolic link to {target!r}, "
                               "which is not a file of the archive")
        members[name] = members[target]


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, name: str,
                 kept: int) -> Member:
    reader = tar.extractfile(info)
    assert reader is not None  # a regular file
    keep = info.size <= KEEP_ONE and kept + info.size <= KEEP_ALL
    hasher, parts, head = hashlib.sha256(), [], b""
    while chunk := reader.read(READ):
        hasher.update(chunk)
        if len(head) < HEAD:
            head = (head + chunk)[:HEAD]
        if keep:
            parts.append(chunk)
    return Member(name, info.size, f"sha256:{hasher.hexdigest()}", head,
                  b"".join(parts) if keep else None)


def scan(path: Path, max_expanded: int | None = None) -> Contents:
    """Check every member of the archive at `path`, hash each file, keep the small ones."""
    members: dict[str, Member] = {}
    links: dict[str, str] = {}
    seen: set[str] = set()
    kept = 0
    with _tar_stream(path, max_expanded) as (stream, kind, limit, length):
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for count, info in enumerate(tar):
                    if count >= MAX_MEMBERS:
                        raise ArchiveError(f"the archive has more than {MAX_MEMBERS} members")
                    name = _check(info, seen, None if kind else limit, limit)
                    if info.issym():
                        links[name] = _link_target(info, name)
                    elif info.isfile():
                        members[name] = member = _read_member(tar, info, name, kept)
                        kept += len(member.data or b"")
                # tarfile takes the end of the file for the end of the archive; every
                # writer ends one with two zero blocks, so an archive cut between two
                # members lacks them.
                if length() < tar.offset + 2 * tarfile.BLOCKSIZE:
                    raise ArchiveError(f"{path} is truncated: it ends after "
                                       f"{len(members)} files, without the end-of-archive "
                                       "blocks")
        except tarfile.TarError as exc:
            raise ArchiveError(f"{path} is not a tar archive, or a broken one: {exc}") from None
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise ArchiveError(f"{path}: the {kind or 'tar'} stream is corrupt: {exc}") from None
    if not members:
        raise ArchiveError(f"{path} holds no files")
    _resolve_links(members, links)
    return Contents(path, members, kind)


def stream_members(path: Path, wanted: set[str], max_expanded: int | None = None
                   ) -> Generator[tuple[str, bytes], None, None]:
    """The second pass: (member name, chunk) for each member in `wanted`, in archive order;
    an empty chunk ends a member. The archive is checked again as it is read (it could
    have changed since `scan`)."""
    seen: set[str] = set()
    with _tar_stream(path, max_expanded) as (stream, kind, limit, _):
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for info in tar:
                    name = _check(info, seen, None if kind else limit, limit)
                    if name not in wanted or not info.isfile():
                        continue
                    reader = tar.extractfile(info)
                    assert reader is not None
                    while chunk := reader.read(READ):
                        yield name, chunk
                    yield name, b""
        except tarfile.TarError as exc:
            raise ArchiveError(f"{path} is not a tar archive, or a broken one: {exc}") from None
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise ArchiveError(f"{path}: the {kind or 'tar'} stream is corrupt: {exc}") from None
