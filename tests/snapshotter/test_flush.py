"""Unpacked layers committed before their files are flushed (domain.flush): one background
syncfs for a burst of commits, clearing only the marks of rows committed before it began;
torn layers of an earlier boot removed with everything built on them. The process-level
run (kill -9, restart, re-unpack over the bus) is in test_snapshotter_service.py."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from shoal_common.messages.snapshots import SnapshotRemoved
from shoal_snapshotter.domain import flush
from shoal_snapshotter.domain.flush import boot_id
from shoal_snapshotter.store import metadata as md
from snapshotter_support import NS, Domain, eventually, open_domain
from support.images import LayerBuilder

pytestmark = pytest.mark.usefixtures("root")  # mounts


@pytest.fixture
async def domain(tmp_path: Path) -> AsyncIterator[Domain]:
    async with open_domain(tmp_path / "state", "overlayfs", flush_delay=0.3) as d:
        yield d


async def marks(d: Domain) -> dict[str, str]:
    def query(conn: sqlite3.Connection) -> dict[str, str]:
        return dict(conn.execute("SELECT key, unsynced_boot FROM snapshots ORDER BY id"))
    return await d.db.run(query)


async def test_a_burst_of_commits_is_flushed_once_after_the_last(
        domain: Domain, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real = flush.syncfs
    monkeypatch.setattr(flush, "syncfs", lambda path: (calls.append(Path(path)), real(path)))
    layers = [LayerBuilder().file(f"f{i}", f"{i}").build() for i in range(3)]
    reply = await domain.unpack("img", layers)
    chains = list(await marks(domain))
    assert reply.unpacked == 3 and chains[-1] == reply.chain_id
    # Committed and usable at once, marked with this boot until the flush.
    assert await marks(domain) == dict.fromkeys(chains, boot_id())
    assert (await domain.tree_of(reply.chain_id))["f2"]["sha256"]
    await eventually(lambda: calls, what="the flush")
    assert await marks(domain) == dict.fromkeys(chains, "")
    assert calls == [domain.snapshots.snap_root]
    await asyncio.sleep(0.5)
    assert len(calls) == 1  # nothing left to flush: no second syncfs


async def test_a_commit_during_the_syncfs_stays_marked(
        domain: Domain, monkeypatch: pytest.MonkeyPatch) -> None:
    first = LayerBuilder().file("a", "a").build()
    await domain.unpack("one", [first])
    in_syncfs, release = threading.Event(), threading.Event()

    def slow_syncfs(path: str | Path) -> None:
        in_syncfs.set()
        release.wait(10)

    monkeypatch.setattr(flush, "syncfs", slow_syncfs)
    flushing = asyncio.create_task(domain.flusher.flush())
    await asyncio.to_thread(in_syncfs.wait, 10)
    # Committed while that syncfs runs: not covered by it.
    second = LayerBuilder().file("b", "b").build()
    reply = await domain.unpack("two", [second])
    release.set()
    assert await flushing == 1
    assert await marks(domain) == {first.diff_id: "", reply.chain_id: boot_id()}


async def test_torn_layers_of_an_earlier_boot_go_with_everything_on_them(
        domain: Domain) -> None:
    layers = [LayerBuilder().file(f"f{i}", f"{i}").build() for i in range(3)]
    reply = await domain.unpack("img", layers)
    chains = list(await marks(domain))
    await domain.snapshots.prepare("rootfs", chains[-1], {})
    await domain.snapshots.view("peek", chains[1], {})
    other = await domain.unpack("other", [layers[0], LayerBuilder().file("o", "o").build()])
    await domain.flusher.flush()
    await domain.db.transaction(lambda c: c.execute(
        "UPDATE snapshots SET unsynced_boot = 'earlier' WHERE key = ?", (chains[1],)))
    dirs = {key: domain.snapshots.snap_dir((await domain.snapshots.get(key)).id)
            for key in (chains[1], chains[2], "rootfs", "peek")}

    removed = await domain.snapshots.remove_torn(boot_id(), NS)
    assert sorted(removed) == sorted([chains[1], chains[2], "rootfs", "peek"])
    assert list(await marks(domain)) == [chains[0], other.chain_id]
    assert not any(p.exists() for p in dirs.values())
    assert sorted(e.key for e, _ in domain.events if isinstance(e, SnapshotRemoved)) == \
        sorted(chains[1:])
    # Nothing else is torn now; the image's next unpack makes the removed layers again.
    assert await domain.snapshots.remove_torn(boot_id(), NS) == []
    again = await domain.unpack("img", layers)
    assert (again.chain_id, again.unpacked) == (reply.chain_id, 2)
    assert (await domain.tree_of(reply.chain_id))["f1"]["sha256"]


async def test_metadata_marks_survive_the_migration(tmp_path: Path) -> None:
    # A database made by the first schema (before the marks): its rows read as flushed.
    db_path = tmp_path / "state" / "metadata.db"
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path)
    conn.executescript(md.MIGRATIONS[0] + ";PRAGMA user_version=1")
    conn.execute("INSERT INTO snapshots(key, kind, created, updated) "
                 "VALUES ('sha256:old', 'committed', 0, 0)")
    conn.commit()
    conn.close()
    async with open_domain(tmp_path / "state", "overlayfs") as d:
        assert await marks(d) == {"sha256:old": ""}
