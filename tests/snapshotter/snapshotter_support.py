"""Helpers for the snapshotter tests: layers as LayerInfo, a content store stand-in (in
process, or served on the bus as the puller would), the snapshotter's domain without
processes, tree fingerprints, mounting the mounts a snapshotter returns the way the
executor will."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import subprocess
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard
from shoal_common.bus import Bus, RequestContext, Router
from shoal_common.config import Config, load_config
from shoal_common.errors import NotFound
from shoal_common.messages import Event
from shoal_common.messages.images import (
    ContentInfo,
    ContentInfoRequest,
    ContentReadReply,
    ContentReadRequest,
    LayerInfo,
)
from shoal_common.messages.snapshots import Mount
from shoal_common.oci import chain_ids
from shoal_common.sqlite import Database
from shoal_snapshotter.domain import mounts as sysmount
from shoal_snapshotter.domain.drivers import choose_driver
from shoal_snapshotter.domain.flush import Flusher, boot_id
from shoal_snapshotter.domain.images import Images
from shoal_snapshotter.domain.layers import PROCESS_MIN_BYTES, Unpacker
from shoal_snapshotter.domain.locks import ChainLocks
from shoal_snapshotter.domain.snapshots import Snapshots
from shoal_snapshotter.store import metadata as md
from support.images import Layer, LayerBuilder, sha256_digest
from support.processes import Node
from support.waiting import eventually  # noqa: F401  (the tests import it from here)

OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
NS = "k8s.io"
# Every way a layer gets applied, as (name, driver, unpack workers, process_min_bytes):
# overlayfs in parallel (each layer alone, in worker processes), overlayfs one layer after
# another onto a mounted overlay (in threads), and native (in threads).
UNPACK_PATHS = (("parallel", "overlayfs", 4, 0),
                ("sequential", "overlayfs", 1, PROCESS_MIN_BYTES),
                ("native", "native", 4, PROCESS_MIN_BYTES))


def node_config(node: Node) -> Config:
    return load_config(env={}, flags={
        "node_id": node.node_id, "nats.url": node.nats_url,
        "state_root": str(node.state_root), "run_root": str(node.run_root)})


def zstd_layer(builder: LayerBuilder) -> Layer:
    tar = builder.tar_bytes()
    blob = zstandard.ZstdCompressor(level=3).compress(tar)
    return Layer(tar=tar, blob=blob, media_type=OCI_LAYER_ZSTD, diff_id=sha256_digest(tar),
                 digest=sha256_digest(blob), size=len(blob))


def layer_infos(layers: Sequence[Layer]) -> list[LayerInfo]:
    chains = chain_ids([layer.diff_id for layer in layers])
    return [LayerInfo(digest=layer.digest, diff_id=layer.diff_id, chain_id=chain,
                      size=layer.size, media_type=layer.media_type)
            for layer, chain in zip(layers, chains, strict=True)]


class FakeContent:
    """Blobs by digest, read like the puller's content store; counts what is read. `delay`
    (seconds per read) makes an unpack slow enough to be caught in the middle."""

    def __init__(self, layers: Sequence[Layer] = (), *, files: Path | None = None) -> None:
        self.blobs: dict[str, bytes] = {}
        self.reads: Counter[str] = Counter()
        self.delay = 0.0
        # With `files`, each blob is also a file there, named in `info` as the puller names
        # its blob files (for the snapshotter's local read); None: no path, bus reads only.
        self.files = files
        self.add(*layers)

    def add(self, *layers: Layer) -> None:
        for layer in layers:
            self.blobs[layer.digest] = layer.blob
            if self.files is not None:
                self.path(layer.digest).parent.mkdir(parents=True, exist_ok=True)
                self.path(layer.digest).write_bytes(layer.blob)

    def path(self, digest: str) -> Path:
        assert self.files is not None
        return self.files / "blobs" / "sha256" / digest.split(":")[1]

    def _blob(self, digest: str) -> bytes:
        try:
            return self.blobs[digest]
        except KeyError:
            raise NotFound(f"content {digest} not found") from None

    async def size(self, digest: str) -> int:
        return len(self._blob(digest))

    async def info(self, digest: str) -> ContentInfo:
        return ContentInfo(digest=digest, size=await self.size(digest),
                           path=str(self.path(digest)) if self.files is not None else "")

    async def read(self, digest: str, offset: int, size: int) -> bytes:
        blob = self._blob(digest)
        self.reads[digest] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return blob[offset:offset + size]

    def full_reads(self, layer: Layer, chunk: int = 512 * 1024) -> float:
        """How many times the whole blob was read."""
        return self.reads[layer.digest] / max(1, -(-layer.size // chunk))


@contextlib.asynccontextmanager
async def serve_content(node: Node, content: FakeContent) -> AsyncIterator[Bus]:
    """Answer images.content.info/read on the test's node, standing in for the puller."""
    router: Router[FakeContent] = Router()

    @router.command("content.info")
    async def info(ctx: RequestContext[FakeContent], req: ContentInfoRequest) -> ContentInfo:
        return await ctx.app.info(req.digest)

    @router.command("content.read")
    async def read(ctx: RequestContext[FakeContent], req: ContentReadRequest) -> ContentReadReply:
        data = await ctx.app.read(req.digest, req.offset, req.size)
        return ContentReadReply(data=data, total=await ctx.app.size(req.digest))

    bus = Bus(node_config(node), service="images", replica="fake-puller")
    await bus.connect(wait=10)
    await bus.serve(router, content)
    try:
        yield bus
    finally:
        await bus.stop_serving(1.0)
        await bus.close()


# -- trees --------------------------------------------------------------------------------

def _record(path: Path, st: os.stat_result) -> dict[str, Any]:
    rec: dict[str, Any] = {"type": stat.S_IFMT(st.st_mode), "mode": oct(stat.S_IMODE(st.st_mode)),
                           "uid": st.st_uid, "gid": st.st_gid}
    if stat.S_ISREG(st.st_mode):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        rec["sha256"] = h.hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        rec["target"] = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    rec["xattrs"] = {k: os.getxattr(path, k, follow_symlinks=False).hex()
                     for k in sorted(os.listxattr(path, follow_symlinks=False))
                     if not k.startswith("trusted.overlay.")}
    return rec


def tree(root: Path) -> dict[str, dict[str, Any]]:
    """Every path below root (not following symlinks) -> type, mode, owner, content hash,
    symlink target, device numbers, xattrs, and which earlier path it is a hardlink of."""
    out = {".": _record(root, os.lstat(root))}
    first_path: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            rec = _record(p, st)
            if not stat.S_ISDIR(st.st_mode):
                rec["link_of"] = first_path.setdefault((st.st_dev, st.st_ino), rel)
            out[rel] = rec
    return out


def tree_digest(root: Path) -> str:
    return hashlib.sha256(repr(sorted(tree(root).items())).encode()).hexdigest()


def mounted_paths(under: Path) -> list[str]:
    base = os.path.realpath(under)
    with open("/proc/self/mountinfo") as fh:
        return [line.split()[4] for line in fh
                if line.split()[4] == base or line.split()[4].startswith(base + "/")]


@contextlib.contextmanager
def mounted(mounts: list[Mount], target: Path) -> Iterator[Path]:
    """Mount what the snapshotter returned the way the executor will (mount(8)), and always
    unmount, lazily if busy, so a failing test leaves nothing mounted."""
    target.mkdir(parents=True, exist_ok=True)
    done = 0
    try:
        for m in mounts:
            argv = ["mount", "-o", ",".join(m.options), m.source, str(target)]
            if m.type != "bind":
                argv[1:1] = ["-t", m.type]
            subprocess.run(argv, check=True, capture_output=True)
            done += 1
        yield target
    finally:
        for _ in range(done):
            if subprocess.run(["umount", str(target)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(target)], capture_output=True)


def workers_alive(root: Path) -> list[int]:
    """Layer apply worker processes writing under `root`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"shoal_snapshotter.unpack.worker" in argv and any(
                    a.startswith(bytes(root)) for a in argv):
                found.append(int(pid))
    return found


# -- the domain without processes ---------------------------------------------------------

@dataclass
class Domain:
    root: Path
    db: Database
    snapshots: Snapshots
    unpacker: Unpacker
    images: Images
    locks: ChainLocks
    flusher: Flusher
    events: list[tuple[Event, str]] = field(default_factory=list)

    async def unpack(self, name: str, layers: list[Layer], content: FakeContent | None = None,
                     **kw: Any) -> Any:
        content = content or FakeContent(layers)
        return await self.images.unpack(NS, name, layer_infos(layers), content, **kw)

    async def tree_of(self, chain: str, *, links: bool = True) -> dict[str, Any]:
        """The file tree a container would see on top of `chain` (through a view mount)."""
        key = f"view-{uuid.uuid4().hex[:8]}"
        mounts = await self.snapshots.view(key, chain, {})
        try:
            with mounted(mounts, self.root.parent / f"mnt-{key}") as target:
                found = tree(target)
        finally:
            await self.snapshots.remove(key, NS)
        if not links:
            for rec in found.values():
                rec.pop("link_of", None)
        return found

    def committed(self, event_type: type[Event]) -> list[str]:
        return [e.key for e, _ in self.events if isinstance(e, event_type)]  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def open_domain(root: Path, driver: str, *, workers: int = 4,
                      process_min_bytes: int = PROCESS_MIN_BYTES,
                      flush_delay: float = 0.05) -> AsyncIterator[Domain]:
    root.mkdir(parents=True, exist_ok=True)
    db = Database(root / "metadata.db", md.MIGRATIONS)
    await db.open()
    events: list[tuple[Event, str]] = []

    async def publish(event: Event, namespace: str) -> None:
        events.append((event, namespace))

    snapshots = Snapshots(db, choose_driver(driver, root, None, False), root, publish)
    assert snapshots.driver.name == driver
    locks = ChainLocks(root / "locks")
    flusher = Flusher(db, snapshots.snap_root, boot_id(), delay=flush_delay, max_wait=10.0)
    await flusher.start()
    unpacker = Unpacker(snapshots, locks, flusher, workers=workers,
                        process_min_bytes=process_min_bytes)
    try:
        yield Domain(root, db, snapshots, unpacker, Images(snapshots, unpacker), locks,
                     flusher, events)
    finally:
        unpacker.close()
        await flusher.close()
        await db.close()
        with contextlib.suppress(OSError):
            sysmount.unmount_all_under(root.parent)
