"""The build context: the request body (a tar, maybe gzip/bzip2/xz compressed, or a bare
Dockerfile) spooled to disk and unpacked into the build's own directory, then
.dockerignore applied; and the files a COPY names in it.

The tar is untrusted. An entry's path is taken apart into components; `..` anywhere, or a
path that runs through a symlink or a file the archive made, is refused; files are
created with O_EXCL|O_NOFOLLOW, hard links must name a regular file the archive made,
devices and FIFOs are skipped; owners are not kept (COPY gives 0:0 unless --chown).
Symlinks are kept as symlinks: a COPY source is resolved inside the context (a link to
/etc/passwd means <context>/etc/passwd), and inside a copied directory a symlink is copied
as a symlink, never followed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import posixpath
import re
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import StreamReader
from shoal_common.errors import ShoalError
from shoal_common.rootfs_users import resolve_in_root

from shoal_docker_gateway.domain.build import ignore
from shoal_docker_gateway.domain.build.errors import BuildError

SPOOL_CHUNK = 1 << 20
MAX_ENTRIES = 1_000_000
MAX_DOCKERFILE = 4 << 20
_GLOB_CHARS = re.compile(r"(?<!\\)[*?\[]")


@dataclass
class WorkDir:
    """One build's files: the context, the layers it makes, an empty root for scratch."""

    root: Path

    @property
    def context(self) -> Path:
        return self.root / "context"

    @property
    def layers(self) -> Path:
        return self.root / "layers"

    @property
    def empty(self) -> Path:
        return self.root / "empty"

    def make(self) -> None:
        for path in (self.root, self.context, self.layers, self.empty):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def clean_stale(parent: Path, is_stale: Callable[[str], bool]) -> None:
    """Work directories of builds that are over (a killed gateway left them)."""
    with contextlib.suppress(FileNotFoundError):
        for old in parent.iterdir():
            if is_stale(old.name):
                shutil.rmtree(old, ignore_errors=True)


async def spool(body: StreamReader, path: Path) -> int:
    """The request body into `path` (written in a thread); its size."""
    total = 0
    with open(path, "xb") as fh:  # noqa: ASYNC230 (writes go to a thread; open is instant)
        while chunk := await body.read(SPOOL_CHUNK):
            total += len(chunk)
            await asyncio.to_thread(fh.write, chunk)
    return total


def member_path(name: str) -> str:
    """An archive entry's path, relative and normalised; `..` is refused."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BuildError(f"invalid build context: entry {name[:200]!r} leaves the context")
    return "/".join(parts)


def _parent(root: Path, rel: str) -> Path:
    """The directory `rel` goes in, made as needed; never through a symlink or a file."""
    cur = root
    for part in rel.split("/")[:-1]:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise BuildError(f"invalid build context: {rel[:200]!r} is under a symlink or a "
                             "file of the archive")
    return cur


def _clear(path: Path, keep_dir: bool) -> None:
    """Make room for a later entry of the same name (the last one wins, as in tar)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if not keep_dir:
            shutil.rmtree(path)
    else:
        os.unlink(path)


def _write_file(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> None:
    source = tar.extractfile(member)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "wb") as out:
        if source is not None:
            shutil.copyfileobj(source, out, SPOOL_CHUNK)
        os.fchmod(out.fileno(), member.mode & 0o7777)


def _link(root: Path, member: tarfile.TarInfo, path: Path) -> None:
    target_rel = member_path(member.linkname)
    target = _parent(root, target_rel) / target_rel.rsplit("/", 1)[-1] if target_rel else root
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        raise BuildError(f"invalid build context: hard link {member.name[:200]!r} names "
                         f"{member.linkname[:200]!r}, which is not a file of the archive")
    os.link(target, path, follow_symlinks=False)


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path,
                    dirs: dict[Path, float]) -> None:
    rel = member_path(member.name)
    if not rel:
        return  # the context's root itself
    path = _parent(root, rel) / rel.rsplit("/", 1)[-1]
    if member.isdir():
        _clear(path, keep_dir=True)
        if not path.is_dir():
            os.mkdir(path, 0o755)
        os.chmod(path, member.mode & 0o7777)
        dirs[path] = member.mtime
        return
    if not (member.isreg() or member.issym() or member.islnk()):
        return  # devices, FIFOs: nothing a COPY could use
    _clear(path, keep_dir=False)
    if member.isreg():
        _write_file(tar, member, path)
    elif member.issym():
        os.symlink(member.linkname, path)
    else:
        _link(root, member, path)
    os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


def extract(archive: Path, root: Path) -> None:
    """Unpack the context archive into `root` (empty); a body that is no archive is the
    Dockerfile itself (`docker build - < Dockerfile` as some clients send it)."""
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.ReadError, EOFError, OSError):
        if archive.stat().st_size > MAX_DOCKERFILE:
            raise BuildError("the build context is not a tar archive (plain, gzip, bzip2 or "
                             "xz)") from None
        shutil.copyfile(archive, root / "Dockerfile")
        return
    dirs: dict[Path, float] = {}
    try:
        with tar:
            for count, member in enumerate(tar, 1):
                if count > MAX_ENTRIES:
                    raise BuildError(f"the build context has more than {MAX_ENTRIES} entries")
                _extract_member(tar, member, root, dirs)
    except (tarfile.TarError, EOFError, OSError, OverflowError, ValueError) as exc:
        raise BuildError(f"invalid build context: {exc}") from None
    for path, mtime in sorted(dirs.items(), reverse=True):  # children first
        with contextlib.suppress(OSError, OverflowError, ValueError):
            os.utime(path, (mtime, mtime), follow_symlinks=False)


def apply_dockerignore(root: Path) -> None:
    try:
        text = (root / ".dockerignore").read_text(errors="replace") \
            if (root / ".dockerignore").is_file() and \
            not (root / ".dockerignore").is_symlink() else ""
    except OSError:
        text = ""
    patterns = ignore.parse(text)
    if not patterns:
        return
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        base = Path(dirpath)
        for name in [*filenames, *dirnames]:
            path = base / name
            rel = path.relative_to(root).as_posix()
            if not ignore.excluded(patterns, rel):
                continue
            if path.is_symlink() or not path.is_dir():
                path.unlink()
            else:
                with contextlib.suppress(OSError):  # not empty: something was re-included
                    path.rmdir()


def read_dockerfile(root: Path, name: str) -> bytes:
    """The Dockerfile the `dockerfile` parameter names (resolved inside the context)."""
    rel = posixpath.normpath(name or "Dockerfile")
    if rel.startswith("/"):
        rel = rel.lstrip("/")
    if rel == ".." or rel.startswith("../"):
        raise BuildError(f"the Dockerfile ({name}) must be within the build context")
    candidates = [rel] if name and name != "Dockerfile" else ["Dockerfile", "dockerfile"]
    for candidate in candidates:
        try:
            host = resolve_in_root(str(root), candidate)
        except ShoalError as exc:
            raise BuildError(f"Cannot locate specified Dockerfile: {name}: {exc}") from None
        with contextlib.suppress(OSError):
            fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as fh:
                if stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    data = fh.read(MAX_DOCKERFILE + 1)
                    if len(data) > MAX_DOCKERFILE:
                        raise BuildError(f"the Dockerfile is over {MAX_DOCKERFILE} bytes")
                    return data
    raise BuildError(f"Cannot locate specified Dockerfile: {name or 'Dockerfile'}")


# -- COPY sources ------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    host: Path  # where it is, resolved inside its root
    name: str  # the name a file takes when copied into a directory
    is_dir: bool


def walk(top: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Everything under directory `top` (relative paths, parents first, names sorted),
    never following a symlink."""
    try:
        entries = sorted(os.scandir(top), key=lambda e: e.name)
    except (NotADirectoryError, FileNotFoundError, PermissionError):
        return
    for entry in entries:
        st = entry.stat(follow_symlinks=False)
        yield entry.name, st
        if stat.S_ISDIR(st.st_mode):
            for rel, inner in walk(Path(entry.path)):
                yield f"{entry.name}/{rel}", inner


def _glob(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match: `*` and `?` within one component, `[...]` classes, `\\`."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        elif c == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end]
            out += "[" + ("^" + body[1:] if body.startswith("^") else body) + "]"
            i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(rf"\A{out}\Z", re.S)


def _relative(pattern: str, what: str) -> str:
    rel = posixpath.normpath(pattern)
    if rel == ".." or rel.startswith("../"):
        raise BuildError(f"{what} failed: forbidden path outside the build context: "
                         f"{pattern} ()")
    rel = rel.lstrip("/")
    return "" if rel == "." else rel


def _resolve(root: Path, rel: str) -> Path:
    try:
        return Path(resolve_in_root(str(root), rel))
    except ShoalError as exc:
        raise BuildError(str(exc)) from None


def sources(root: Path, patterns: list[str], what: str) -> list[Source]:
    """What COPY/ADD `patterns` name under `root` (the context, or another image's tree)."""
    found: list[Source] = []
    for pattern in patterns:
        rel = _relative(pattern, what)
        if _GLOB_CHARS.search(rel):
            regex = _glob(rel)
            matched = [Source(_resolve(root, path), path.rsplit("/", 1)[-1],
                              stat.S_ISDIR(st.st_mode))
                       for path, st in walk(root) if regex.match(path)]
            if not matched:
                raise BuildError(f"{what} failed: no source files were specified")
            found += matched
            continue
        host = _resolve(root, rel)
        try:
            st = os.lstat(host)
        except OSError:
            raise BuildError(f"{what} failed: file not found in build context or excluded "
                             f"by .dockerignore: stat {pattern}: file does not exist") from None
        found.append(Source(host, rel.rsplit("/", 1)[-1] if rel else "",
                            stat.S_ISDIR(st.st_mode)))
    return found


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        while chunk := fh.read(SPOOL_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _entry_line(rel: str, st: os.stat_result, host: Path) -> str:
    kind = stat.S_IFMT(st.st_mode)
    if stat.S_ISREG(st.st_mode):
        extra = _file_digest(host)
    elif stat.S_ISLNK(st.st_mode):
        extra = os.readlink(host)
    else:
        extra = ""
    return f"{rel}\0{kind:o}\0{stat.S_IMODE(st.st_mode):o}\0{extra}\n"


def digest_sources(found: list[Source]) -> str:
    """The cache's view of what a COPY takes: each file's path, type, mode and content (or
    link target); times and owners are not in it, as in dockerd."""
    total = hashlib.sha256()
    for source in found:
        total.update(f"{source.name}\0{source.is_dir}\n".encode(errors="surrogateescape"))
        if source.is_dir:
            for rel, st in walk(source.host):
                line = _entry_line(rel, st, source.host / rel)
                total.update(line.encode(errors="surrogateescape"))
        else:
            st = os.lstat(source.host)
            total.update(_entry_line("", st, source.host).encode(errors="surrogateescape"))
    return total.hexdigest()
