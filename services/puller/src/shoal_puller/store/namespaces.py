"""The node's namespaces, kept in the puller's metadata database beside the images they
scope (the `namespaces` table of store/images.py's schema): those `create` recorded, and
every namespace that holds an image name, recorded or not. Checks and changes run in one
transaction with the images they look at."""

from __future__ import annotations

import json
import sqlite3
import time

from shoal_common.errors import AlreadyExists, FailedPrecondition, NotFound
from shoal_common.messages.namespaces import NamespaceInfo
from shoal_common.sqlite import Database

NAMED_IMAGES = 10  # a refused remove names at most this many of the image names in the way


def _images(conn: sqlite3.Connection, namespace: str) -> int:
    """Images (by id: one image may have a tag and a digest name) held in `namespace`."""
    return int(conn.execute("SELECT COUNT(DISTINCT config_digest) FROM images WHERE "
                            "namespace=?", (namespace,)).fetchone()[0])


def _info(conn: sqlite3.Connection, name: str) -> NamespaceInfo | None:
    row = conn.execute("SELECT labels FROM namespaces WHERE name=?", (name,)).fetchone()
    count = _images(conn, name)
    if row is None and not count:
        return None
    return NamespaceInfo(name=name, labels=json.loads(row["labels"]) if row else {},
                         created=row is not None, images=count)


class NamespaceStore:
    def __init__(self, db: Database) -> None:
        self.db = db  # the image store's: namespaces are checked against its images

    async def list(self, always: tuple[str, ...] = ()) -> list[NamespaceInfo]:
        """Every recorded namespace, every one holding images, and `always`, by name."""

        def q(conn: sqlite3.Connection) -> list[NamespaceInfo]:
            names = {r[0] for r in conn.execute("SELECT name FROM namespaces")}
            names |= {r[0] for r in conn.execute("SELECT DISTINCT namespace FROM images")}
            out = []
            for name in sorted(names | set(always)):
                out.append(_info(conn, name) or NamespaceInfo(name=name))
            return out

        return await self.db.run(q)

    async def get(self, name: str) -> NamespaceInfo | None:
        return await self.db.run(lambda conn: _info(conn, name))

    async def create(self, name: str, labels: dict[str, str]) -> tuple[NamespaceInfo, bool]:
        """Record `name`; (its info, whether this call recorded it). A namespace recorded
        with other labels is refused: a repeat of a create must not change what it made."""

        def tx(conn: sqlite3.Connection) -> tuple[NamespaceInfo, bool]:
            row = conn.execute("SELECT labels FROM namespaces WHERE name=?",
                               (name,)).fetchone()
            if row is not None:
                have = json.loads(row["labels"])
                if labels and labels != have:
                    raise AlreadyExists(f"namespace {name!r} exists with other labels: "
                                        f"{have}")
            else:
                conn.execute("INSERT INTO namespaces VALUES (?,?,?)",
                             (name, json.dumps(labels, sort_keys=True), time.time()))
            info = _info(conn, name)
            assert info is not None  # recorded above, or already
            return info, row is None

        return await self.db.transaction(tx)

    async def remove(self, name: str) -> None:
        """Forget `name`, refused while it holds an image name (naming some)."""

        def tx(conn: sqlite3.Connection) -> None:
            count = _images(conn, name)
            if count:
                total = conn.execute("SELECT COUNT(*) FROM images WHERE namespace=?",
                                     (name,)).fetchone()[0]
                names = [r[0] for r in conn.execute(
                    "SELECT name FROM images WHERE namespace=? ORDER BY name LIMIT ?",
                    (name, NAMED_IMAGES))]
                more = f" and {total - len(names)} more" if total > len(names) else ""
                raise FailedPrecondition(
                    f"namespace {name!r} holds {count} image{'s' * (count != 1)}: "
                    f"{', '.join(names)}{more} (remove them first: shoal -n {name} rmi ...)")
            gone = conn.execute("DELETE FROM namespaces WHERE name=?", (name,)).rowcount
            if not gone:
                raise NotFound(f"namespace {name!r} not found (never created, and it holds "
                               "no image)")

        await self.db.transaction(tx)
