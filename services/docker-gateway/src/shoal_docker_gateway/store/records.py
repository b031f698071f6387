"""The gateway's own records (SQLite, `<state_root>/docker-gateway/docker.db`): what Docker
keeps that the CRI does not — container names (unique, renameable), the create request as
the client sent it, restart policies, named volumes. Each group's queries are in its own
module under store/; the schema is here, one migration list."""

from __future__ import annotations

from typing import ClassVar

from shoal_common.sqlite import SqliteStore

SCHEMA_V1 = """
CREATE TABLE containers (
    id TEXT PRIMARY KEY,          -- Docker's id: 64 hex, chosen here, kept across restarts
    name TEXT NOT NULL UNIQUE,    -- without the leading /
    pod_id TEXT NOT NULL DEFAULT '',
    cri_id TEXT NOT NULL DEFAULT '',  -- the CRI container running it now ('' before create)
    image TEXT NOT NULL,          -- as the client named it
    image_id TEXT NOT NULL DEFAULT '',
    config TEXT NOT NULL,         -- the create body (JSON), as the client sent it
    state TEXT NOT NULL,          -- creating, created, running, exited, removing
    created REAL NOT NULL,
    started_at REAL NOT NULL DEFAULT 0,
    finished_at REAL NOT NULL DEFAULT 0,
    exit_code INTEGER NOT NULL DEFAULT 0,
    restart_count INTEGER NOT NULL DEFAULT 0,
    labels TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE volumes (
    name TEXT PRIMARY KEY,
    driver TEXT NOT NULL DEFAULT 'local',
    labels TEXT NOT NULL DEFAULT '{}',
    options TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
CREATE TABLE build_cache (
    key TEXT PRIMARY KEY,         -- sha256 of (parent image id, instruction, its inputs)
    image_id TEXT NOT NULL,       -- the image the step made
    created REAL NOT NULL
);
"""

# Docker's user networks: each is a Shoal network of the executor (`shoal_name`, a DNS
# label made from the Docker name); what Docker shows and Shoal does not keep is here.
SCHEMA_NETWORKS = """
CREATE TABLE networks (
    id TEXT PRIMARY KEY,          -- Docker's id: 64 hex, chosen here
    name TEXT NOT NULL UNIQUE,    -- Docker's name, as the client gave it
    shoal_name TEXT NOT NULL UNIQUE,
    driver TEXT NOT NULL,         -- bridge, macvlan, ipvlan
    attachable INTEGER NOT NULL DEFAULT 0,
    labels TEXT NOT NULL DEFAULT '{}',
    options TEXT NOT NULL DEFAULT '{}',
    ipam TEXT NOT NULL DEFAULT '{}',  -- IPAM as asked for (Config: Subnet, Gateway)
    created REAL NOT NULL
);
"""


class Records(SqliteStore):
    migrations: ClassVar[list[str]] = [SCHEMA_V1, SCHEMA_NETWORKS]
