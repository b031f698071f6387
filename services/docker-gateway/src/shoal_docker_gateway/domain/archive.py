"""`docker cp`: stat, read and write paths inside a container's root filesystem.

The root is the container's overlay as the executor mounted it on the host at container
create (`<bundle>/rootfs`, kept until the CRI container is removed), so running, created and
exited containers are served alike; the bundle comes from the supervisor's task (the CRI
container id is the task id). Volumes and the files the runtime binds (/etc/hosts, ...)
are not in that mount: those paths show what the rootfs holds beneath them.

A container owns its files and may plant symlinks anywhere (`/x -> /`, `../../..`), so
every lookup from the root is openat2(RESOLVE_IN_ROOT): symlinks and `..` resolve against
the container's root, never the host's, and no lookup crosses into another mount or
follows a /proc magic link. Below a looked-up object, entries are opened one component at
a time relative to their directory without following symlinks, files are read through an
O_PATH descriptor whose type was checked first (a FIFO or device swapped in never gets
opened), and metadata is set on descriptors or with AT_SYMLINK_NOFOLLOW. Extraction
follows Docker's rules (entries may not climb out of the destination, a directory and a
non-directory replace each other unless noOverwriteDirNonDir, owners from the archive or
the container's user with copyUIDGID, modes including setuid as given) except that device
nodes are skipped, as Docker does in a user namespace, and extended attributes are not
written."""

from __future__ import annotations

import base64
import ctypes
import errno
import io
import json
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

import structlog
from shoal_common.errors import ErrorCode, ShoalError
from shoal_common.messages.monitor import TaskIdRequest

from shoal_docker_gateway.domain.backend import Backend
from shoal_docker_gateway.errors import BadParameter, Conflict, DockerError, NotFound
from shoal_docker_gateway.store.containers import ContainerRecord

log = structlog.get_logger("shoal.docker")

STAT_HEADER = "X-Docker-Container-Path-Stat"
MAX_PATH = 4096
MAX_LINKS = 255  # symlinks followed in one lookup (Linux's limit)
MAX_DEPTH = 1024  # directory levels archived below the requested one
MAX_ID_FILE = 4 * 1024 * 1024  # /etc/passwd, /etc/group read for copyUIDGID
CHUNK = 256 * 1024

# openat2(2): the syscall number is the same on every architecture since Linux 5.6.
_SYS_OPENAT2 = 437
_RESOLVE_NO_XDEV, _RESOLVE_NO_MAGICLINKS, _RESOLVE_NO_SYMLINKS = 0x01, 0x02, 0x04
_RESOLVE_BENEATH, _RESOLVE_IN_ROOT = 0x08, 0x10
IN_ROOT = _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS | _RESOLVE_NO_XDEV
ONE_NAME = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS | _RESOLVE_NO_XDEV


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    raw = os.fsencode(path)
    for _ in range(100):  # EAGAIN: a rename raced a RESOLVE_IN_ROOT lookup; try again
        fd = _syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(raw),
                      ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.EINTR, errno.EAGAIN):
            raise OSError(err, os.strerror(err), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


class Forbidden(DockerError):
    status = 403


# -- container paths ---------------------------------------------------------------------

@dataclass(frozen=True)
class CPath:
    """A path in the container as Docker reads it: made absolute and cleaned lexically;
    a trailing `/` or `/.` asks for the last component to be followed too."""

    text: str  # as the client sent it (for messages)
    parts: tuple[str, ...]
    follow: bool
    name: str  # the stat name and the archive's top entry: the last component, `.` or `/`


def parse_path(text: str) -> CPath:
    if not text:
        raise BadParameter("bad parameter: path cannot be empty")
    if "\0" in text or len(text.encode(errors="surrogateescape")) > MAX_PATH:
        raise BadParameter(f"invalid path {text[:200]!r}")
    parts: list[str] = []
    for p in text.split("/"):
        if p == "..":
            if parts:
                parts.pop()
        elif p not in ("", "."):
            parts.append(p)
    dot = text == "." or text.endswith("/.")
    name = "/" if not parts else "." if dot else parts[-1]
    return CPath(text, tuple(parts), dot or text.endswith("/") or not parts, name)


def _relative_parts(name: str, what: str) -> list[str]:
    """A tar entry's name (or hard link target) as components below the destination;
    climbing above it is refused, as Docker does."""
    parts: list[str] = []
    for p in name.split("/"):
        if p == "..":
            if not parts and not name.startswith("/"):
                raise BadParameter(f"invalid tar entry: {what} {name[:200]!r} is outside "
                                   "the destination directory")
            if parts:
                parts.pop()
        elif p not in ("", "."):
            parts.append(p)
    return parts


# -- the root ----------------------------------------------------------------------------

async def rootfs(backend: Backend, rec: ContainerRecord) -> str:
    """The host path of the container's mounted root filesystem."""
    if rec.state == "creating" or not rec.cri_id:
        raise Conflict(f"container {rec.id} is being created")
    if rec.state == "removing":
        raise Conflict(f"container {rec.id} is being removed")
    try:
        task = await backend.clients.monitor.state(TaskIdRequest(id=rec.cri_id))
    except ShoalError as exc:
        if exc.code == ErrorCode.NOT_FOUND:
            raise Conflict(f"container {rec.id} has no root filesystem now") from None
        raise
    if not task.bundle or not os.path.isabs(task.bundle):
        raise Conflict(f"container {rec.id} has no root filesystem now")
    return os.path.join(task.bundle, "rootfs")


def _reopen(fd: int, flags: int) -> int:
    """A real descriptor for the object an O_PATH one names (the same inode, no lookup)."""
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC | os.O_NOCTTY)


class Root:
    """An open container root: every lookup stays inside it."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if os.fstat(self.fd).st_dev == os.stat(os.path.dirname(path)).st_dev:
                raise Conflict("the container's root filesystem is not mounted")
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def open(self, parts: tuple[str, ...] | list[str], flags: int, follow: bool = True) -> int:
        return openat2(self.fd, "/".join(parts) or ".", flags | (0 if follow else os.O_NOFOLLOW),
                       IN_ROOT)

    def _readlink(self, parent: list[str], name: str) -> str | None:
        try:
            fd = self.open(parent, os.O_PATH | os.O_DIRECTORY)
        except OSError:
            return None
        try:
            return os.readlink(name, dir_fd=fd)
        except OSError:
            return None  # not a link, or not there: taken as it is
        finally:
            os.close(fd)

    def resolve(self, parts: tuple[str, ...] | list[str]) -> list[str]:
        """The path with every symlink followed inside the root, lexically past what does
        not exist (Docker's FollowSymlinkInScope): its components from the root."""
        done: list[str] = []
        todo = list(parts)
        links = 0
        while todo:
            name = todo.pop(0)
            if name == "..":
                if done:
                    done.pop()
                continue
            if name in ("", "."):
                continue
            target = self._readlink(done, name)
            if target is None:
                done.append(name)
                continue
            links += 1
            if links > MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            if target.startswith("/"):
                done = []
            todo = target.split("/") + todo
        return done

    def read_small(self, parts: list[str], limit: int) -> bytes | None:
        """A small regular file's bytes (None if missing or not a regular file)."""
        try:
            fd = self.open(parts, os.O_PATH)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            rfd = _reopen(fd, os.O_RDONLY)
            with os.fdopen(rfd, "rb") as fh:
                return fh.read(limit)
        finally:
            os.close(fd)

    def ensure_dir(self, parts: list[str]) -> int:
        """An O_PATH descriptor of directory `parts`, made (0755, root) with its missing
        parents as Docker does for an entry's parent."""
        try:
            return self.open(parts, os.O_PATH | os.O_DIRECTORY)
        except FileNotFoundError:
            if not parts:
                raise
        pfd = self.ensure_dir(parts[:-1])
        try:
            try:
                os.mkdir(parts[-1], 0o700, dir_fd=pfd)
            except FileExistsError:
                pass
            else:
                fd = openat2(pfd, parts[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                             ONE_NAME)
                try:
                    os.fchmod(fd, 0o755)  # not the gateway's umask
                finally:
                    os.close(fd)
        finally:
            os.close(pfd)
        return self.open(parts, os.O_PATH | os.O_DIRECTORY)


def not_found(cp: CPath, container: str) -> NotFound:
    return NotFound(f"Could not find the file {cp.text} in container {container}")


def _os_error(exc: OSError, cp: CPath, container: str, doing: str) -> DockerError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return not_found(cp, container)
    if exc.errno == errno.EXDEV:
        return BadParameter(f"{doing} {cp.text}: the path crosses a mount point (volumes and "
                            "bind mounts are not reachable with docker cp on Shoal)")
    if exc.errno == errno.ELOOP:
        return BadParameter(f"{doing} {cp.text}: too many levels of symbolic links")
    return DockerError(f"{doing} {cp.text}: {exc.strerror or exc}")


# -- stat --------------------------------------------------------------------------------

_GO_TYPE = {stat.S_IFDIR: 1 << 31, stat.S_IFLNK: 1 << 27, stat.S_IFIFO: 1 << 25,
            stat.S_IFSOCK: 1 << 24, stat.S_IFBLK: 1 << 26, stat.S_IFCHR: (1 << 26) | (1 << 21)}


def go_mode(st_mode: int) -> int:
    """Go's os.FileMode bits for a Unix mode (what Docker's clients decode)."""
    mode = (st_mode & 0o777) | _GO_TYPE.get(stat.S_IFMT(st_mode), 0)
    for bit, go in ((stat.S_ISUID, 1 << 23), (stat.S_ISGID, 1 << 22), (stat.S_ISVTX, 1 << 20)):
        if st_mode & bit:
            mode |= go
    return mode


def go_time(ns: int) -> str:
    """RFC 3339 with nanoseconds, as Go's time.Time marshals it (UTC)."""
    seconds, frac = divmod(ns, 1_000_000_000)
    text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return text + (f".{frac:09d}".rstrip("0") if frac else "") + "Z"


@dataclass(frozen=True)
class PathStat:
    name: str
    size: int
    mode: int
    mtime: str
    link_target: str

    def header(self) -> str:
        doc = {"name": self.name, "size": self.size, "mode": self.mode, "mtime": self.mtime,
               "linkTarget": self.link_target}
        return base64.b64encode(json.dumps(doc).encode()).decode()


def _stat_of(root: Root, cp: CPath, fd: int) -> PathStat:
    st = os.fstat(fd)
    link = ""
    if stat.S_ISLNK(st.st_mode):
        link = "/" + "/".join(root.resolve(cp.parts))
    return PathStat(cp.name, st.st_size, go_mode(st.st_mode), go_time(st.st_mtime_ns), link)


def stat_path(path: str, cp: CPath, container: str) -> PathStat:
    """HEAD /containers/{id}/archive (run in a thread)."""
    try:
        with Root(path) as root:
            fd = root.open(cp.parts, os.O_PATH, follow=cp.follow)
            try:
                return _stat_of(root, cp, fd)
            finally:
                os.close(fd)
    except OSError as exc:
        raise _os_error(exc, cp, container, "stat") from None


# -- reading: GET ------------------------------------------------------------------------

class _TarOut:
    """Tar entries written to `emit` in chunks, hard links recorded once."""

    def __init__(self, emit: Callable[[bytes], None]) -> None:
        self.emit = emit
        self.buf = bytearray()
        self.inodes: dict[tuple[int, int], str] = {}

    def write(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.emit(bytes(self.buf))
            self.buf.clear()

    def header(self, info: tarfile.TarInfo) -> None:
        self.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def data(self, fd: int, size: int) -> None:
        """`size` bytes of the file (zeros if it shrank meanwhile, cut if it grew)."""
        left = size
        while left:
            piece = os.read(fd, min(CHUNK, left))
            if not piece:
                break
            self.write(piece)
            left -= len(piece)
        self.write(bytes(left))
        self.write(bytes(-size % tarfile.BLOCKSIZE))

    def close(self) -> None:
        self.write(bytes(2 * tarfile.BLOCKSIZE))
        self.flush()


def _info(name: str, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = int(st.st_mtime)
    return info


def _entry(out: _TarOut, fd: int, st: os.stat_result, name: str) -> bool:
    """One non-directory entry; False for what a tar cannot hold (sockets)."""
    info = _info(name, st)
    kind = stat.S_IFMT(st.st_mode)
    if kind == stat.S_IFREG:
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in out.inodes:
            info.type, info.linkname = tarfile.LNKTYPE, out.inodes[key]
            out.header(info)
            return True
        if st.st_nlink > 1:
            out.inodes[key] = name
        info.size = st.st_size
        out.header(info)
        rfd = _reopen(fd, os.O_RDONLY)
        try:
            out.data(rfd, st.st_size)
        finally:
            os.close(rfd)
        return True
    if kind == stat.S_IFLNK:
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink("", dir_fd=fd)
    elif kind == stat.S_IFIFO:
        info.type = tarfile.FIFOTYPE
    elif kind in (stat.S_IFCHR, stat.S_IFBLK):
        info.type = tarfile.CHRTYPE if kind == stat.S_IFCHR else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    else:
        return False
    out.header(info)
    return True


def _children(dfd: int) -> list[str]:
    listing = _reopen(dfd, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return sorted(os.listdir(listing), key=os.fsencode)
    finally:
        os.close(listing)


def _walk(out: _TarOut, top: int, name: str) -> None:
    """A directory and everything below it; `top` is an O_PATH descriptor (kept open by
    the caller). Each level holds one descriptor, so the depth is bounded."""
    out.header(_dir_info(name + "/", os.fstat(top)))
    stack: list[tuple[int, str, Iterator[str]]] = [(top, name, iter(_children(top)))]
    try:
        while stack:
            dfd, prefix, names = stack[-1]
            child = next(names, None)
            if child is None:
                stack.pop()
                if dfd != top:
                    os.close(dfd)
                continue
            try:
                cfd = openat2(dfd, child, os.O_PATH | os.O_NOFOLLOW, ONE_NAME)
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed while we walked
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                continue  # a mount inside the rootfs: not the container's layer
            st = os.fstat(cfd)
            entry = f"{prefix}/{child}"
            if stat.S_ISDIR(st.st_mode):
                if len(stack) > MAX_DEPTH:
                    os.close(cfd)
                    raise OSError(errno.ELOOP, f"directories nested over {MAX_DEPTH} deep")
                out.header(_dir_info(entry + "/", st))
                stack.append((cfd, entry, iter(_children(cfd))))
                continue
            try:
                _entry(out, cfd, st, entry)
            finally:
                os.close(cfd)
    finally:
        for dfd, _prefix, _names in stack:
            if dfd != top:
                os.close(dfd)


def _dir_info(name: str, st: os.stat_result) -> tarfile.TarInfo:
    info = _info(name, st)
    info.type = tarfile.DIRTYPE
    return info


class Source:
    """What GET archives: the object looked up (held open), its stat, and the writer."""

    def __init__(self, path: str, cp: CPath, container: str) -> None:
        self.cp = cp
        try:
            self.root = Root(path)
        except OSError as exc:
            raise _os_error(exc, cp, container, "archive") from None
        try:
            self.fd = self.root.open(cp.parts, os.O_PATH, follow=cp.follow)
            self.stat = _stat_of(self.root, cp, self.fd)
        except OSError as exc:
            self.root.__exit__()
            raise _os_error(exc, cp, container, "archive") from None
        except BaseException:
            self.root.__exit__()
            raise

    def write(self, emit: Callable[[bytes], None]) -> None:
        """The tar, its top entry named as Docker names it (run in a thread)."""
        out = _TarOut(emit)
        st = os.fstat(self.fd)
        if stat.S_ISDIR(st.st_mode):
            _walk(out, self.fd, self.cp.name)
        else:
            _entry(out, self.fd, st, self.cp.name)
        out.close()

    def close(self) -> None:
        os.close(self.fd)
        self.root.__exit__()


# -- writing: PUT ------------------------------------------------------------------------

@dataclass(frozen=True)
class ExtractOptions:
    no_overwrite_dir_non_dir: bool
    owner: tuple[int, int] | None  # copyUIDGID: the container user's ids for every entry


def _rmtree(pfd: int, name: str) -> None:
    """Remove `name` in `pfd` (a tree too) without following any symlink."""
    try:
        fd = openat2(pfd, name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, ONE_NAME)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        os.unlink(name, dir_fd=pfd)
        return
    try:
        with os.scandir(fd) as entries:
            for entry in list(entries):
                if entry.is_dir(follow_symlinks=False):
                    _rmtree(fd, entry.name)
                else:
                    os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=pfd)


def _owner(member: tarfile.TarInfo, opts: ExtractOptions) -> tuple[int, int]:
    return opts.owner if opts.owner is not None else (member.uid, member.gid)


def _times(member: tarfile.TarInfo) -> tuple[int, int]:
    ns = int(member.mtime * 1_000_000_000)
    return ns, ns


class _Extractor:
    def __init__(self, root: Root, dest: list[str], opts: ExtractOptions, shown: str) -> None:
        self.root, self.dest, self.opts, self.shown = root, dest, opts, shown
        self.dirs: list[tuple[list[str], tarfile.TarInfo]] = []
        self.skipped = 0

    def run(self, tar: tarfile.TarFile) -> None:
        for member in tar:
            rel = _relative_parts(member.name, "entry")
            if not rel:
                continue  # the destination itself: Docker leaves it as it is
            try:
                self._one(tar, self.dest + rel, member)
            except OSError as exc:
                raise _entry_error(exc, member.name) from None
        for parts, member in self.dirs:  # last: entries made inside changed their times
            try:
                fd = self.root.open(parts, os.O_RDONLY | os.O_DIRECTORY, follow=False)
            except OSError:
                continue
            try:
                os.utime(fd, ns=_times(member))
            finally:
                os.close(fd)
        if self.skipped:
            log.info("docker cp skipped device nodes", count=self.skipped, dest=self.shown)

    def _one(self, tar: tarfile.TarFile, parts: list[str], member: tarfile.TarInfo) -> None:
        if member.ischr() or member.isblk():
            self.skipped += 1
            return
        pfd = self.root.ensure_dir(parts[:-1])
        try:
            name = parts[-1]
            self._clear(pfd, name, parts, member)
            self._create(tar, pfd, parts, member)
        finally:
            os.close(pfd)

    def _clear(self, pfd: int, name: str, parts: list[str], member: tarfile.TarInfo) -> None:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        is_dir = stat.S_ISDIR(st.st_mode)
        shown = "/" + "/".join(parts)
        if self.opts.no_overwrite_dir_non_dir and is_dir and not member.isdir():
            raise BadParameter(f"cannot overwrite directory {shown!r} with non-directory "
                               f"{member.name[:200]!r}")
        if self.opts.no_overwrite_dir_non_dir and not is_dir and member.isdir():
            raise BadParameter(f"cannot overwrite non-directory {shown!r} with directory "
                               f"{member.name[:200]!r}")
        if not (is_dir and member.isdir()):
            _rmtree(pfd, name)

    def _create(self, tar: tarfile.TarFile, pfd: int, parts: list[str],
                member: tarfile.TarInfo) -> None:
        name = parts[-1]
        uid, gid = _owner(member, self.opts)
        if member.isreg():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=pfd)
            try:
                _copy(tar.extractfile(member), fd)
                os.fchown(fd, uid, gid)
                os.fchmod(fd, member.mode & 0o7777)  # after chown, which clears setuid
                os.utime(fd, ns=_times(member))
            finally:
                os.close(fd)
        elif member.isdir():
            self._directory(pfd, parts, member, uid, gid)
        elif member.issym():
            os.symlink(member.linkname, name, dir_fd=pfd)
            os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
            os.utime(name, ns=_times(member), dir_fd=pfd, follow_symlinks=False)
        elif member.islnk():
            target = self.dest + _relative_parts(member.linkname, "hard link target")
            if not target:
                raise BadParameter(f"invalid hard link {member.name[:200]!r}")
            tfd = self.root.open(target[:-1], os.O_PATH | os.O_DIRECTORY)
            try:
                os.link(target[-1], name, src_dir_fd=tfd, dst_dir_fd=pfd,
                        follow_symlinks=False)
            finally:
                os.close(tfd)
        elif member.isfifo():
            os.mkfifo(name, 0o600, dir_fd=pfd)
            self._fifo_meta(pfd, name, member, uid, gid)
        # anything else (sockets, unknown types) is not extracted, as Docker does

    def _directory(self, pfd: int, parts: list[str], member: tarfile.TarInfo, uid: int,
                   gid: int) -> None:
        name = parts[-1]
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            pass  # a directory already (_clear made sure): its metadata is replaced
        fd = openat2(pfd, name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, ONE_NAME)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, member.mode & 0o7777)
        finally:
            os.close(fd)
        self.dirs.append((parts, member))

    def _fifo_meta(self, pfd: int, name: str, member: tarfile.TarInfo, uid: int,
                   gid: int) -> None:
        fd = openat2(pfd, name, os.O_PATH | os.O_NOFOLLOW, ONE_NAME)
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                return  # swapped by the container meanwhile: left as it is
            os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
            os.chmod(f"/proc/self/fd/{fd}", member.mode & 0o7777)  # that inode, a FIFO
            os.utime(name, ns=_times(member), dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(fd)


def _entry_error(exc: OSError, entry: str) -> DockerError:
    shown = entry[:200]
    if exc.errno in (errno.EXDEV, errno.ELOOP, errno.ENOTDIR, errno.ENOENT, errno.EEXIST):
        return BadParameter(f"extracting {shown!r}: {exc.strerror}")
    return DockerError(f"extracting {shown!r}: {exc.strerror or exc}")


def _copy(src: IO[bytes] | None, fd: int) -> None:
    if src is None:
        return
    while True:
        piece = src.read(CHUNK)
        if not piece:
            return
        view = memoryview(piece)
        while view:
            view = view[os.write(fd, view):]


def extract(path: str, cp: CPath, container: str, body: IO[bytes],
            opts: ExtractOptions) -> None:
    """PUT /containers/{id}/archive (run in a thread): the tar in `body` (plain, gzip,
    bzip2 or xz) extracted into directory `cp`."""
    try:
        with Root(path) as root:
            dest = root.resolve(cp.parts)
            try:
                dfd = root.open(dest, os.O_PATH)
            except OSError as exc:
                raise _os_error(exc, cp, container, "extract to") from None
            try:
                if not stat.S_ISDIR(os.fstat(dfd).st_mode):
                    raise BadParameter("extraction point is not a directory")
            finally:
                os.close(dfd)
            try:
                with tarfile.open(fileobj=body, mode="r|*", encoding="utf-8",
                                  errors="surrogateescape") as tar:
                    _Extractor(root, dest, opts, cp.text).run(tar)
            except (tarfile.TarError, EOFError, UnicodeError) as exc:
                raise BadParameter(f"invalid tar archive: {exc}") from None
    except OSError as exc:
        raise _os_error(exc, cp, container, "extract to") from None


# -- copyUIDGID: the container user's ids ------------------------------------------------

def _id_entry(data: bytes | None, key: str) -> list[str] | None:
    """The passwd/group line whose name or numeric id is `key`."""
    for raw in (data or b"").decode(errors="replace").splitlines():
        fields = raw.split(":")
        if len(fields) >= 4 and (fields[0] == key or fields[2] == key):
            return fields
    return None


def _number(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadParameter(f"unable to find {what} {text[:64]}: no matching entries") from None
    if not 0 <= value < 2**32 - 1:
        raise BadParameter(f"invalid {what} id {text[:64]}")
    return value


def user_ids(path: str, user: str) -> tuple[int, int]:
    """The uid and gid of the container's `User` (name or id, `user:group`), read from
    its /etc/passwd and /etc/group (run in a thread)."""
    name, _, group = user.partition(":")
    with Root(path) as root:
        passwd = root.read_small(["etc", "passwd"], MAX_ID_FILE)
        entry = _id_entry(passwd, name or "0")
        uid = _number(entry[2], "user") if entry else _number(name or "0", "user")
        gid = _number(entry[3], "group") if entry else 0
        if group:
            gentry = _id_entry(root.read_small(["etc", "group"], MAX_ID_FILE), group)
            gid = _number(gentry[2], "group") if gentry else _number(group, "group")
    return uid, gid


class BodyReader(io.RawIOBase):
    """A blocking file over an async byte source, for tarfile in a worker thread."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._read(len(buffer))
        buffer[:len(data)] = data
        return len(data)
