"""Image records in SQLite: names → target/manifest/config digests, layers with chain IDs,
which blobs each name keeps alive, and leases that protect the blobs of in-flight pulls from
garbage collection."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from shoal_common.errors import Invalid, NotFound
from shoal_common.messages.images import ImageInfo, LayerInfo
from shoal_common.sqlite import Database

MIGRATIONS = ["""
CREATE TABLE manifests(
    digest TEXT PRIMARY KEY,
    media_type TEXT NOT NULL,
    config_digest TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE layers(
    manifest_digest TEXT NOT NULL REFERENCES manifests(digest) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    digest TEXT NOT NULL,
    diff_id TEXT NOT NULL,
    chain_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    media_type TEXT NOT NULL,
    PRIMARY KEY(manifest_digest, idx)
);
CREATE TABLE images(
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    target_digest TEXT NOT NULL,
    target_media_type TEXT NOT NULL,
    manifest_digest TEXT NOT NULL REFERENCES manifests(digest),
    config_digest TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY(namespace, name)
);
CREATE INDEX images_by_config ON images(namespace, config_digest);
CREATE TABLE image_blobs(
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY(namespace, name, digest),
    FOREIGN KEY(namespace, name) REFERENCES images(namespace, name) ON DELETE CASCADE
);
CREATE INDEX image_blobs_by_digest ON image_blobs(digest);
CREATE TABLE leases(
    id TEXT NOT NULL,
    digest TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY(id, digest)
);
CREATE INDEX leases_by_digest ON leases(digest)
""",
    # v2: namespaces made by `shoal namespaces create` (store/namespaces.py); one that holds
    # images exists without a row.
    """
CREATE TABLE namespaces(
    name TEXT PRIMARY KEY,
    labels TEXT NOT NULL,
    created REAL NOT NULL
)
"""]


@dataclass
class ManifestRecord:
    digest: str
    media_type: str
    config_digest: str
    size: int  # manifest + config + layers, as stored
    layers: list[LayerInfo]


@dataclass
class NameChange:
    name: str
    created: bool  # False: the name existed and now points elsewhere (or again the same)
    changed: bool


@dataclass
class GcResult:
    unreferenced: list[str] = field(default_factory=list)


def is_digest_name(name: str) -> bool:
    return "@sha256:" in name and ":" not in name.split("@", 1)[0].rsplit("/", 1)[-1]


class ImageStore:
    def __init__(self, path: Path) -> None:
        self.db = Database(path, MIGRATIONS)

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    # -- writes ----------------------------------------------------------------------------

    async def put(self, namespace: str, names: list[str], target_digest: str,
                  target_media_type: str, manifest: ManifestRecord,
                  blobs: list[str]) -> list[NameChange]:
        """Point `names` at an image whose blobs are all committed, in one transaction."""

        def tx(conn: sqlite3.Connection) -> list[NameChange]:
            now = time.time()
            conn.execute("INSERT OR IGNORE INTO manifests VALUES (?,?,?,?)",
                         (manifest.digest, manifest.media_type, manifest.config_digest,
                          manifest.size))
            conn.executemany("INSERT OR IGNORE INTO layers VALUES (?,?,?,?,?,?,?)", [
                (manifest.digest, i, layer.digest, layer.diff_id, layer.chain_id, layer.size,
                 layer.media_type) for i, layer in enumerate(manifest.layers)])
            changes = []
            for name in names:
                row = conn.execute("SELECT target_digest, manifest_digest FROM images "
                                   "WHERE namespace=? AND name=?", (namespace, name)).fetchone()
                if row is None:
                    conn.execute("INSERT INTO images VALUES (?,?,?,?,?,?,?,?)",
                                 (namespace, name, target_digest, target_media_type,
                                  manifest.digest, manifest.config_digest, now, now))
                    changes.append(NameChange(name, created=True, changed=True))
                else:
                    changed = (row["target_digest"], row["manifest_digest"]) != (
                        target_digest, manifest.digest)
                    conn.execute("UPDATE images SET target_digest=?, target_media_type=?, "
                                 "manifest_digest=?, config_digest=?, updated=? "
                                 "WHERE namespace=? AND name=?",
                                 (target_digest, target_media_type, manifest.digest,
                                  manifest.config_digest, now, namespace, name))
                    conn.execute("DELETE FROM image_blobs WHERE namespace=? AND name=?",
                                 (namespace, name))
                    changes.append(NameChange(name, created=False, changed=changed))
                conn.executemany("INSERT OR IGNORE INTO image_blobs VALUES (?,?,?)",
                                 [(namespace, name, d) for d in blobs])
            return changes

        return await self.db.transaction(tx)

    async def remove(self, namespace: str, config_digest: str) -> list[str]:
        """Remove every name of the image; returns the names removed."""

        def tx(conn: sqlite3.Connection) -> list[str]:
            names = [r["name"] for r in conn.execute(
                "SELECT name FROM images WHERE namespace=? AND config_digest=? ORDER BY name",
                (namespace, config_digest))]
            conn.execute("DELETE FROM images WHERE namespace=? AND config_digest=?",
                         (namespace, config_digest))
            conn.execute("DELETE FROM manifests WHERE digest NOT IN "
                         "(SELECT manifest_digest FROM images)")
            return names

        return await self.db.transaction(tx)

    async def lease(self, lease_id: str, digests: list[str], ttl: float) -> None:
        """Protect `digests` from GC until the lease is dropped or expires (a crashed pull
        must not pin blobs forever)."""
        expires = time.time() + ttl
        await self.db.transaction(lambda conn: conn.executemany(
            "INSERT OR REPLACE INTO leases VALUES (?,?,?)",
            [(lease_id, d, expires) for d in digests]))

    async def drop_lease(self, lease_id: str) -> None:
        await self.db.transaction(
            lambda conn: conn.execute("DELETE FROM leases WHERE id=?", (lease_id,)))

    async def leased(self, lease_id: str, digest: str) -> bool:
        """`digest` is held by the live lease `lease_id`."""
        row = await self.db.run(lambda conn: conn.execute(
            "SELECT 1 FROM leases WHERE id=? AND digest=? AND expires >= ?",
            (lease_id, digest, time.time())).fetchone())
        return row is not None

    async def lease_digests(self, lease_id: str) -> list[str]:
        """Every digest the lease `lease_id` holds (expired or not)."""
        rows = await self.db.run(lambda conn: conn.execute(
            "SELECT digest FROM leases WHERE id=? ORDER BY digest", (lease_id,)).fetchall())
        return [str(r["digest"]) for r in rows]

    async def renew_lease(self, lease_id: str, ttl: float) -> None:
        """Hold every digest of the lease for `ttl` more seconds from now."""
        await self.db.transaction(lambda conn: conn.execute(
            "UPDATE leases SET expires=? WHERE id=?", (time.time() + ttl, lease_id)))

    async def unreferenced(self, candidates: list[str]) -> list[str]:
        """Of `candidates`, the blobs no image name references and no live lease holds."""

        def tx(conn: sqlite3.Connection) -> list[str]:
            conn.execute("DELETE FROM leases WHERE expires < ?", (time.time(),))
            out = []
            for digest in candidates:
                if conn.execute("SELECT 1 FROM image_blobs WHERE digest=? UNION ALL "
                                "SELECT 1 FROM leases WHERE digest=? LIMIT 1",
                                (digest, digest)).fetchone() is None:
                    out.append(digest)
            return out

        return await self.db.transaction(tx)

    # -- reads -----------------------------------------------------------------------------

    async def resolve(self, namespace: str, ref: str) -> str:
        """The config digest (image id) that `ref` names: an exact name, a full id
        (`sha256:<hex>` or bare hex) or an unambiguous id prefix (at least 3 characters)."""

        def q(conn: sqlite3.Connection) -> str:
            row = conn.execute("SELECT config_digest FROM images WHERE namespace=? AND name=?",
                               (namespace, ref)).fetchone()
            if row:
                return str(row["config_digest"])
            prefix = ref.removeprefix("sha256:")
            if len(prefix) >= 3 and all(c in "0123456789abcdef" for c in prefix):
                rows = conn.execute("SELECT DISTINCT config_digest FROM images "
                                    "WHERE namespace=? AND config_digest LIKE ?",
                                    (namespace, f"sha256:{prefix}%")).fetchall()
                if len(rows) == 1:
                    return str(rows[0]["config_digest"])
                if len(rows) > 1:
                    raise Invalid(f"image id prefix {ref!r} is ambiguous ({len(rows)} images)")
            raise NotFound(f"image {ref!r} not found")

        return await self.db.run(q)

    async def target_of(self, namespace: str, name: str) -> tuple[str, str] | None:
        """(target digest, its media type) of the name `name`, if it exists."""

        def q(conn: sqlite3.Connection) -> tuple[str, str] | None:
            row = conn.execute("SELECT target_digest, target_media_type FROM images "
                               "WHERE namespace=? AND name=?", (namespace, name)).fetchone()
            return None if row is None else (str(row[0]), str(row[1]))

        return await self.db.run(q)

    async def info(self, namespace: str, config_digest: str) -> ImageInfo:
        images = await self._infos(namespace, "config_digest=?", (config_digest,))
        if not images:
            raise NotFound(f"image {config_digest} not found")
        return images[0]

    async def list_images(self, namespace: str, names: list[str] | None = None) -> list[ImageInfo]:
        if names is None:
            return await self._infos(namespace, "1", ())
        marks = ",".join("?" * len(names))
        return await self._infos(
            namespace, f"config_digest IN (SELECT config_digest FROM images WHERE namespace=? "
            f"AND name IN ({marks}))", (namespace, *names))

    async def _infos(self, namespace: str, where: str,
                     args: tuple[str, ...]) -> list[ImageInfo]:
        def q(conn: sqlite3.Connection) -> list[ImageInfo]:
            rows = conn.execute(
                # `where` is one of this module's constant fragments; values are bound.
                f"SELECT * FROM images WHERE namespace=? AND {where} "
                "ORDER BY config_digest, name", (namespace, *args)).fetchall()
            by_id: dict[str, list[sqlite3.Row]] = {}
            for row in rows:
                by_id.setdefault(row["config_digest"], []).append(row)
            out = []
            for config_digest, group in by_id.items():
                first = max(group, key=lambda r: r["updated"])
                manifest = conn.execute("SELECT * FROM manifests WHERE digest=?",
                                        (first["manifest_digest"],)).fetchone()
                layers = [LayerInfo(digest=r["digest"], diff_id=r["diff_id"],
                                    chain_id=r["chain_id"], size=r["size"],
                                    media_type=r["media_type"])
                          for r in conn.execute("SELECT * FROM layers WHERE manifest_digest=? "
                                                "ORDER BY idx", (first["manifest_digest"],))]
                names = [r["name"] for r in group]
                out.append(ImageInfo(
                    id=config_digest, names=names,
                    repo_tags=[n for n in names if not is_digest_name(n)],
                    repo_digests=[n for n in names if is_digest_name(n)],
                    size=manifest["size"], target_digest=first["target_digest"],
                    manifest_digest=first["manifest_digest"], layers=layers,
                    created=min(r["created"] for r in group)))
            return out

        return await self.db.run(q)
