"""Storage of the gateway: CRI pod and container metadata (SQLite)."""
