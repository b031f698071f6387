"""`shoal pull` (with a progress bar per layer, like `docker pull`), `shoal images`,
`shoal rmi` — the puller over the bus."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TextIO, TypeVar

from shoal_common import codec, subjects
from shoal_common.bus import Bus
from shoal_common.clients import ImagesClient
from shoal_common.config import Config
from shoal_common.errors import ShoalError
from shoal_common.messages.images import (
    ImageListRequest,
    ImageRemoveRequest,
    LayerProgress,
    PullProgress,
    PullRequest,
    RegistryAuth,
    TransferProgress,
)
from shoal_common.messages.push import PushProgress

PULL_TIMEOUT = 3600.0
LABELS = {"waiting": "Waiting", "downloading": "Downloading", "exists": "Already exists",
          "done": "Pull complete"}


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1000
    return f"{n:.1f}GB"


class ProgressView:
    """Redraws one line per layer on a terminal; elsewhere prints state changes only."""

    labels = LABELS  # what each layer state is shown as
    moving = "downloading"  # the state shown with a bar

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.drawn = 0
        self.last: dict[str, str] = {}

    def line(self, p: LayerProgress) -> str:
        short = p.digest.removeprefix("sha256:")[:12]
        if p.state == self.moving and p.total:
            width = 30
            filled = int(width * p.done / p.total)
            bar = "=" * max(filled - 1, 0) + (">" if filled else "") + " " * (width - filled)
            return (f"{short}: {self.labels[self.moving]} [{bar}] "
                    f"{human(p.done)}/{human(p.total)}")
        return f"{short}: {self.labels.get(p.state, p.state)}"

    def update(self, event: TransferProgress) -> None:
        lines = [self.line(p) for p in event.layers]
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            if self.drawn:
                self.out.write(f"\x1b[{self.drawn}F")
            for text in lines:
                self.out.write(f"\x1b[2K{text[:width]}\n")
            self.drawn = len(lines)
        else:
            for p, text in zip(event.layers, lines, strict=True):
                if self.last.get(p.digest) != p.state:
                    self.last[p.digest] = p.state
                    self.out.write(text + "\n")
        self.out.flush()


def registry_auth(user: str) -> RegistryAuth | None:
    """`--user NAME:PASSWORD` as a request's auth (None when it was not given)."""
    if not user:
        return None
    username, _, password = user.partition(":")
    return RegistryAuth(username=username, password=password)


Progress = TypeVar("Progress", PullProgress, PushProgress)


@contextlib.asynccontextmanager
async def showing(bus: Bus, config: Config, namespace: str, event: type[Progress],
                  mine: Callable[[Progress], bool], view: ProgressView) -> AsyncIterator[None]:
    """While the block runs, `view` shows each progress event that is `mine`."""
    async def on_progress(msg: object) -> None:
        progress = codec.decode(msg.data, event)  # type: ignore[attr-defined]
        if mine(progress):
            view.update(progress)

    sub = await bus.nc.subscribe(subjects.event(config.node_id, namespace, event.TOPIC),
                                 cb=on_progress)
    try:
        yield
    finally:
        await asyncio.sleep(0.1)  # let the final progress event land
        await sub.unsubscribe()


async def pull(config: Config, bus: Bus, ref: str, namespace: str, user: str) -> int:
    pull_id = uuid.uuid4().hex
    try:
        async with showing(bus, config, namespace, PullProgress,
                           lambda e: e.pull_id == pull_id, ProgressView(sys.stdout)):
            reply = await ImagesClient(bus, namespace=namespace).pull(
                PullRequest(ref=ref, pull_id=pull_id, auth=registry_auth(user)),
                timeout=PULL_TIMEOUT)
    except ShoalError as exc:
        print(f"shoal pull: {exc.message}", file=sys.stderr)
        return 1
    image = reply.image
    print(f"Digest: {image.target_digest}")
    print(f"Image:  {image.id}")
    for name in image.repo_tags:
        print(f"Name:   {name}")
    return 0


async def images(bus: Bus, namespace: str, quiet: bool) -> int:
    reply = await ImagesClient(bus, namespace=namespace).list_images(ImageListRequest())
    if quiet:
        for info in reply.images:
            print(info.id)
        return 0
    print(f"{'IMAGE':<50} {'TAG':<16} {'IMAGE ID':<14} {'SIZE':>9}")
    for info in reply.images:
        tags = info.repo_tags or [f"{d.split('@')[0]}:<none>" for d in info.repo_digests[:1]]
        for name in tags:
            repo, _, tag = name.rpartition(":")
            print(f"{repo:<50} {tag:<16} {info.id.removeprefix('sha256:')[:12]:<14} "
                  f"{human(info.size):>9}")
    return 0


async def rmi(bus: Bus, namespace: str, refs: list[str]) -> int:
    code = 0
    for ref in refs:
        try:
            reply = await ImagesClient(bus, namespace=namespace).remove(
                ImageRemoveRequest(ref=ref))
        except ShoalError as exc:
            print(f"shoal rmi: {ref}: {exc.message}", file=sys.stderr)
            code = 1
            continue
        for name in reply.removed_names:
            print(f"Untagged: {name}")
        for digest in reply.deleted_blobs:
            print(f"Deleted: {digest}")
    return code
